"""Sparse probing (Gurnee et al. 2023; SAEBench's ``sparse_probing``): can a few SAE latents carry a labelled
property of text as well as a probe on the model's own activations?

For every task (a labelled text dataset) and every class of it, a balanced one-vs-rest binary problem:
each text's activations at the hook are mean-pooled over its tokens (BOS excluded), and so are its SAE
latents (encoded per token, then pooled). On a seeded train/test split we fit
- ``llm``: a logistic probe on the pooled activations (the ceiling),
- ``sae``: a logistic probe on all pooled latents,
- ``top_<k>``: for each k, the k latents whose train means differ most between the classes, and a
  logistic probe on just those,
and report test accuracies, averaged over classes and tasks.

Tasks: ``*.jsonl`` / ``*.parquet`` (fields ``text`` and ``label``, renamed with options ``text_field`` /
``label_field``), ``hf:NAME[:CONFIG][:SPLIT]`` (needs the ``datasets`` package), or the two built-in
offline tasks (see :mod:`workflows.probing_tasks`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workflows.bench import BenchContext, BenchResult
from workflows.errors import UserError
from workflows.linear_probe import accuracy, fit_binary, fit_ovr

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "tasks": ["builtin:stdlib-packages", "builtin:shakespeare-speakers"], "ks": [1, 2, 5, 10, 20],
    "max_per_class": 120, "max_classes": 4, "test_fraction": 0.3, "max_tokens": 64, "batch_size": 16,
    "text_field": "text", "label_field": "label",
}


@dataclass
class Pooled:
    """Mean-pooled activations of a task's texts (SAE-independent, shared across SAEs of a hook), with the
    token-level activations kept so each SAE can encode them."""

    labels: list[str]
    acts_ND: Tensor  # pooled activations
    tokens_TD: Tensor  # every kept token's activation, all texts concatenated
    offsets: list[int]  # text i owns tokens offsets[i]:offsets[i+1]


# -- the metric -------------------------------------------------------------------------------------
def sparse_probing(ctx: BenchContext) -> BenchResult:
    o = {**DEFAULTS, **ctx.opts("sparse_probing")}
    tasks = o["tasks"] if isinstance(o["tasks"], list) else str(o["tasks"]).split(",")
    per_task = {}
    for spec in tasks:
        pooled = pooled_task(ctx, spec, o)
        latents = pool_latents(ctx.sae, pooled)
        per_task[spec] = probe_task(pooled.acts_ND, latents, pooled.labels, o, seed=ctx.seed)
    return summarise(per_task, o["ks"])


def summarise(per_task: dict[str, dict[str, Any]], ks: list[int]) -> BenchResult:
    keys = ["llm_accuracy", "sae_accuracy", *(f"top_{k}_accuracy" for k in ks)]
    metrics = {k: sum(t["mean"][k] for t in per_task.values()) / len(per_task) for k in keys}
    return BenchResult(metrics=metrics, details={"tasks": per_task})


def probe_task(acts_ND: Tensor, latents_NF: Tensor, labels: list[str], o: dict[str, Any], *, seed: int = 0) -> dict:
    """Per class of ``labels``: balanced one-vs-rest train/test split, then llm / sae / top-k accuracies."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UserError(f"a probing task needs at least two labels, got {classes}")
    binary = [classes[1]] if len(classes) == 2 else classes
    rows = {}
    for c in binary:
        train, test = balanced_split(labels, c, o["max_per_class"], o["test_fraction"], seed)
        y = torch.tensor([labels[i] == c for i in range(len(labels))])
        rows[c] = probe_scores(acts_ND[train], y[train], acts_ND[test], y[test], latents_NF[train], latents_NF[test],
                               o["ks"])
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in next(iter(rows.values())) if k != "top_latents"}
    return {"classes": classes, "per_class": rows, "mean": mean}


def balanced_split(labels: list[str], positive: str, max_per_class: int, test_fraction: float,
                   seed: int) -> tuple[list[int], list[int]]:
    """As many negatives (from every other class) as positives, at most ``max_per_class`` each; seeded."""
    rng = random.Random(f"{seed}/{positive}")
    pos = [i for i, label in enumerate(labels) if label == positive]
    neg = [i for i, label in enumerate(labels) if label != positive]
    n = min(len(pos), len(neg), max_per_class)
    pos, neg = rng.sample(pos, n), rng.sample(neg, n)
    n_test = max(1, int(round(test_fraction * n)))
    return pos[n_test:] + neg[n_test:], pos[:n_test] + neg[:n_test]


def probe_scores(acts_train: Tensor, y_train: Tensor, acts_test: Tensor, y_test: Tensor, lat_train: Tensor,
                 lat_test: Tensor, ks: list[int]) -> dict[str, Any]:
    """Test accuracies of the raw-activation probe, the all-latents probe and the top-k latent probes."""
    out: dict[str, Any] = {}
    for name, train, test in (("llm", acts_train, acts_test), ("sae", lat_train, lat_test)):
        probe = fit_ovr(train, y_train[:, None].float(), steps=100)
        out[f"{name}_accuracy"] = accuracy(probe.score(test)[:, 0] > 0, y_test)
    diff_F = lat_train[y_train].mean(0) - lat_train[~y_train].mean(0)
    ranked = torch.argsort(diff_F.abs(), descending=True)
    for k in ks:
        feats = ranked[:k]
        probe = fit_binary(lat_train[:, feats], y_train)
        out[f"top_{k}_accuracy"] = accuracy(probe.score(lat_test[:, feats])[:, 0] > 0, y_test)
    out["top_latents"] = ranked[: max(ks)].tolist()
    return out


# -- data -------------------------------------------------------------------------------------------
def pooled_task(ctx: BenchContext, spec: str, o: dict[str, Any]) -> Pooled:
    """Tokenise, run the model once per text batch and pool; cached in ``ctx.shared`` per hook and task."""
    from workflows.probing_tasks import load_task

    key = "sparse_probing/" + json.dumps({"hook": ctx.hook, "task": spec, "seed": ctx.seed,
                                          **{k: o[k] for k in ("max_per_class", "max_classes", "max_tokens")}})
    if key not in ctx.shared:
        texts, labels = load_task(spec, o, seed=ctx.seed)
        ctx.shared[key] = pool_activations(ctx, texts, labels, o["max_tokens"], o["batch_size"])
    return ctx.shared[key]


@torch.no_grad()
def pool_activations(ctx: BenchContext, texts: list[str], labels: list[str], max_tokens: int,
                     batch_size: int) -> Pooled:
    tok = ctx.loaded.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = [bos + tok.encode(t, add_special_tokens=False)[: max_tokens] for t in texts]
    pooled, tokens, offsets = [], [], [0]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(x) for x in chunk)
        # Right padding: causal attention never lets a real token see the padding after it.
        batch = torch.tensor([x + [pad] * (width - len(x)) for x in chunk])
        acts_BTD = ctx.activations(batch).cpu()
        for row, x in enumerate(chunk):
            kept = acts_BTD[row, len(bos) : len(x)]
            tokens.append(kept)
            pooled.append(kept.mean(0))
            offsets.append(offsets[-1] + len(kept))
    return Pooled(labels, torch.stack(pooled), torch.cat(tokens), offsets)


@torch.no_grad()
def pool_latents(sae: Any, pooled: Pooled, batch: int = 2048) -> Tensor:
    """[N, F] mean over each text's tokens of the SAE latents."""
    device = next(iter(sae.parameters())).device
    lat = torch.cat([sae.encode(pooled.tokens_TD[s : s + batch].to(device)).float().cpu()
                     for s in range(0, len(pooled.tokens_TD), batch)])
    sums = torch.zeros(len(pooled.labels), lat.shape[1])
    owner = torch.repeat_interleave(torch.arange(len(pooled.labels)), torch.tensor(pooled.offsets).diff())
    sums.index_add_(0, owner, lat)
    return sums / torch.tensor(pooled.offsets).diff().clamp_min(1)[:, None]
