"""Feature absorption (Chanin et al. 2024, "A is for Absorption"), computed as SAEBench computes it.

1. Words: the tokenizer's single-token alphabetic vocabulary (a leading space allowed), a seeded sample.
2. Prompts: ``n_icl`` in-context examples ``"<word> has the first letter: <L>"`` then ``"<word> has the first
   letter:"``; the activation at the word's token (at the SAE's hook) is what is probed.
3. A one-vs-rest logistic probe per first letter on those activations (train split) is the ground truth;
   letters whose probe reaches F1 < ``min_probe_f1`` on the test split, or with fewer than
   ``min_true_positives`` test words the probe finds, are not evaluated.
4. k-sparse probing: an L1 probe on the SAE latents ranks latents per letter; for k = 1..``max_k`` a logistic
   probe on the top-k latents is fitted, and the *main latents* of a letter are the top-k while each k
   raises the test F1 by more than ``f1_jump`` (SAEBench's feature-splitting rule).
5. For every test word of the letter that the ground-truth probe detects (a probe true positive), with
   p the unit probe direction, a the activation and f_i d_i the latents' contributions to the
   reconstruction (d_i the decoder row): probe projection ``P = a . p``, a latent's projection
   ``f_i (d_i . p)``.
   - *full absorption* (one absorbing latent): no main latent fires, the top-projecting latent has
     cos(d_i, p) >= 0.025, P > 0 and its projection is >= 0.4 P;
   - *absorption fraction* (partial, up to 3 absorbers with cos >= 0.1 and positive projection): the part of
     P not carried by the main latents that those absorbers carry, as a fraction of (absorbers + main); 0
     when the main latents carry P or the absorbers carry < 0.4 P, 1 when the main latents carry nothing.
   Per letter: ``full_absorption_rate`` and ``mean_absorption_fraction`` are sums over the probe's true
   positives divided by their number; the metric means them over the evaluated letters.

Differences from SAEBench, on purpose: one seeded word sample (``max_words``) instead of the whole
vocabulary (CPU budgets); a latent's projection uses its decoder row as it is (SAEBench uses the cosine,
the same for the unit-norm rows of saved SAEs); probes are torch logistic regressions, not sklearn.
"""

from __future__ import annotations

import json
import logging
import random
import string
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workflows.bench import BenchContext, BenchResult
from workflows.errors import UserError
from workflows.linear_probe import Probe, f1_score, fit_binary, fit_l1_ovr, fit_ovr

logger = logging.getLogger(__name__)

LETTERS = string.ascii_lowercase
DEFAULTS: dict[str, Any] = {
    "max_words": 1500, "n_icl": 5, "test_fraction": 0.3, "max_k": 10, "f1_jump": 0.03, "min_probe_f1": 0.6,
    "min_true_positives": 5, "batch_size": 32, "template": " has the first letter:",
    "full_cos": 0.025, "fraction_cos": 0.1, "projection_share": 0.4, "max_absorbers": 3,
}
EPS = 1e-8


@dataclass
class LetterData:
    """Probe-ready activations of the words at the hook: SAE-independent, shared across SAEs of a hook."""

    words_train: list[str]
    words_test: list[str]
    acts_train: Tensor  # [N, D]
    acts_test: Tensor
    y_train: Tensor  # [N] letter index
    y_test: Tensor
    probe: Probe


# -- words and prompts ------------------------------------------------------------------------------
def alpha_vocab(tokenizer: Any) -> list[tuple[int, str]]:
    """(token id, text) of every single token that is letters only, after an optional leading space."""
    out = []
    for token_id in sorted(tokenizer.get_vocab().values()):
        text = tokenizer.decode([token_id])
        word = text[1:] if text.startswith(" ") else text
        if word and word.isascii() and word.isalpha():
            out.append((token_id, text))
    return out


def build_prompts(tokenizer: Any, words: list[tuple[int, str]], pool: list[tuple[int, str]], *, n_icl: int,
                  template: str, seed: int) -> tuple[list[list[int]], list[int]]:
    """(token ids per prompt, index of the word's token in it): BOS, ``n_icl`` answered examples drawn from
    ``pool``, then the word and the template. Words are placed by token id, so each is exactly one token."""
    suffix = tokenizer.encode(template, add_special_tokens=False)
    sep = tokenizer.encode("\n", add_special_tokens=False)
    answers = {c: tokenizer.encode(f" {c.upper()}", add_special_tokens=False) for c in LETTERS}
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rng = random.Random(seed)
    prompts, positions = [], []
    for token_id, _ in words:
        ids = list(bos)
        for ex_id, ex_text in rng.sample(pool, min(n_icl, len(pool))):
            ids += [ex_id, *suffix, *answers[first_letter(ex_text)], *sep]
        positions.append(len(ids))
        prompts.append([*ids, token_id, *suffix])
    return prompts, positions


def first_letter(text: str) -> str:
    return text.strip()[0].lower()


@torch.no_grad()
def word_activations(ctx: BenchContext, prompts: list[list[int]], positions: list[int], batch_size: int) -> Tensor:
    """[N, D] activations at the hook at each prompt's word token (prompts of one length batched together)."""
    out: dict[int, Tensor] = {}
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for idx in by_length.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            acts = ctx.activations(torch.tensor([prompts[i] for i in chunk]))
            for row, i in enumerate(chunk):
                out[i] = acts[row, positions[i]].cpu()
    return torch.stack([out[i] for i in range(len(prompts))])


def letter_data(ctx: BenchContext, o: dict[str, Any]) -> LetterData:
    """The words' activations and the ground-truth probe, cached in ``ctx.shared`` per hook and options."""
    key = "absorption/" + json.dumps({"hook": ctx.hook, **{k: o[k] for k in ("max_words", "n_icl", "test_fraction",
                                                                           "template")}, "seed": ctx.seed})
    if key not in ctx.shared:
        vocab = alpha_vocab(ctx.loaded.tokenizer)
        if len(vocab) < 4 * len(LETTERS):
            raise UserError(f"the tokenizer has only {len(vocab)} alphabetic tokens; absorption needs a word vocabulary")
        rng = random.Random(ctx.seed)
        words = rng.sample(vocab, min(o["max_words"], len(vocab)))
        prompts, positions = build_prompts(ctx.loaded.tokenizer, words, vocab, n_icl=o["n_icl"],
                                           template=o["template"], seed=ctx.seed)
        acts = word_activations(ctx, prompts, positions, o["batch_size"])
        labels = torch.tensor([LETTERS.index(first_letter(t)) for _, t in words])
        ctx.shared[key] = split_and_probe([t for _, t in words], acts, labels, o["test_fraction"], ctx.seed)
    return ctx.shared[key]


def split_and_probe(words: list[str], acts: Tensor, labels: Tensor, test_fraction: float, seed: int) -> LetterData:
    """Seeded train/test split of the words and the one-vs-rest first-letter probe on the train split."""
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * len(words))))
    test, train = order[:n_test], order[n_test:]
    Y = torch.nn.functional.one_hot(labels[train], len(LETTERS))
    probe = fit_ovr(acts[train], Y)
    return LetterData([words[i] for i in train], [words[i] for i in test], acts[train], acts[test],
                      labels[train], labels[test], probe)


# -- the metric -------------------------------------------------------------------------------------
def absorption(ctx: BenchContext) -> BenchResult:
    o = {**DEFAULTS, **ctx.opts("absorption")}
    return absorption_scores(ctx.sae, letter_data(ctx, o), o, seed=ctx.seed)


@torch.no_grad()
def encode(sae: Any, x_ND: Tensor, batch: int = 1024) -> Tensor:
    device = next(iter(sae.parameters())).device
    return torch.cat([sae.encode(x_ND[s : s + batch].to(device)).float().cpu() for s in range(0, len(x_ND), batch)])


def absorption_scores(sae: Any, data: LetterData, o: dict[str, Any] | None = None, *, seed: int = 0) -> BenchResult:
    """The metric on prepared activations (``sae`` needs ``encode`` and ``W_dec`` [F, D])."""
    o = {**DEFAULTS, **(o or {})}
    lat_train, lat_test = encode(sae, data.acts_train), encode(sae, data.acts_test)
    l1_W_FC = fit_l1_ovr(lat_train, torch.nn.functional.one_hot(data.y_train, len(LETTERS)), seed=seed)
    scores_test = data.probe.score(data.acts_test)
    directions = data.probe.directions()
    W_dec_FD = sae.W_dec.detach().float().cpu()
    letters: dict[str, dict[str, Any]] = {}
    for c, letter in enumerate(LETTERS):
        truth = data.y_test == c
        probe_f1 = f1_score(scores_test[:, c] > 0, truth)
        tp = torch.nonzero(truth & (scores_test[:, c] > 0)).flatten()
        row: dict[str, Any] = {"probe_f1": probe_f1, "probe_true_positives": len(tp)}
        letters[letter] = row
        if probe_f1 < o["min_probe_f1"] or len(tp) < o["min_true_positives"]:
            row["skipped"] = True
            continue
        main, f1s = main_latents(lat_train, lat_test, data.y_train == c, truth, l1_W_FC[:, c], o)
        p_D = directions[c] / directions[c].norm()
        per_word = [word_absorption(data.acts_test[i], lat_test[i], W_dec_FD, p_D, main, o) for i in tp.tolist()]
        absorbers: dict[int, int] = {}
        for full, _, top in per_word:
            if full:
                absorbers[top] = absorbers.get(top, 0) + 1
        row.update(main_latents=main, k_sparse_f1=f1s, num_split_features=len(main),
                   full_absorption_rate=sum(w[0] for w in per_word) / len(tp),
                   mean_absorption_fraction=sum(w[1] for w in per_word) / len(tp),
                   absorbing_latents=dict(sorted(absorbers.items(), key=lambda kv: -kv[1])[:10]),
                   absorbed_words=[data.words_test[i] for i, w in zip(tp.tolist(), per_word, strict=True) if w[0]][:20])
    return summarise(letters)


def summarise(letters: dict[str, dict[str, Any]]) -> BenchResult:
    done = [r for r in letters.values() if not r.get("skipped")]
    if not done:
        metrics = {"mean_absorption_fraction": float("nan"), "mean_full_absorption": float("nan"),
                   "mean_num_split_features": float("nan"), "letters_evaluated": 0.0}
    else:
        metrics = {"mean_absorption_fraction": sum(r["mean_absorption_fraction"] for r in done) / len(done),
                   "mean_full_absorption": sum(r["full_absorption_rate"] for r in done) / len(done),
                   "mean_num_split_features": sum(r["num_split_features"] for r in done) / len(done),
                   "letters_evaluated": float(len(done))}
    return BenchResult(metrics=metrics, details={"letters": letters})


def main_latents(lat_train: Tensor, lat_test: Tensor, y_train: Tensor, y_test: Tensor, l1_w_F: Tensor,
                 o: dict[str, Any]) -> tuple[list[int], list[float]]:
    """The letter's main latents by SAEBench's rule: top-k of the L1 probe while each k adds > f1_jump test F1."""
    ranked = torch.argsort(l1_w_F, descending=True)[: o["max_k"]].tolist()
    best, main, f1s = -1.0, [ranked[0]], []
    for k in range(1, len(ranked) + 1):
        feats = ranked[:k]
        probe = fit_binary(lat_train[:, feats], y_train)
        f1 = f1_score(probe.score(lat_test[:, feats])[:, 0] > 0, y_test)
        f1s.append(f1)
        if f1 <= best + o["f1_jump"]:
            break
        best, main = f1, feats
    return main, f1s


def word_absorption(a_D: Tensor, f_F: Tensor, W_dec_FD: Tensor, p_D: Tensor, main: list[int],
                    o: dict[str, Any]) -> tuple[bool, float, int]:
    """(full absorption?, absorption fraction, top-projecting latent) of one probe-detected word."""
    cos_F = torch.nn.functional.cosine_similarity(W_dec_FD, p_D[None], dim=-1)
    proj_F = f_F * (W_dec_FD @ p_D)
    P = float(a_D.float() @ p_D)
    main_proj = float(proj_F[main].sum())
    others = torch.ones_like(proj_F, dtype=torch.bool)
    others[main] = False
    candidates = proj_F[others & (cos_F >= o["fraction_cos"]) & (proj_F > 0)]
    absorbed = float(candidates.topk(min(o["max_absorbers"], len(candidates))).values.sum()) if len(candidates) else 0.0
    if main_proj >= P or P <= 0 or absorbed / P < o["projection_share"]:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        carried = min(absorbed, P - main_proj)
        fraction = min(max(carried / (carried + main_proj), 0.0), 1.0)
    top = int(proj_F.argmax())
    full = (bool((f_F[main] < EPS).all()) and float(cos_F[top]) >= o["full_cos"] and P > 0
            and float(proj_F[top]) / P >= o["projection_share"])
    return full, fraction, top
