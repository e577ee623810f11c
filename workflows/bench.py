"""The bench metric interface: what every downstream evaluation of ``sae bench`` receives and returns.

A bench metric is a function ``fn(ctx: BenchContext) -> BenchResult`` registered under a name in
:data:`METRICS`. ``sae bench`` builds one context per SAE (on a Ray actor that holds the frozen model),
calls each requested metric, logs ``BenchResult.metrics`` as ``bench/<name>/<key>`` into the SAE's MLflow
run, and writes every result, details included, to ``bench.json`` in the SAE's folder.

SAEs that read the same hook on the same actor share ``ctx.shared`` (a dict living as long as the actor's
model): a metric puts there what does not depend on the SAE (the model's activations on its prompts, a
probe on raw activations), so a second SAE on that hook skips the model pass.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from workflows.corpus import Windows
from workflows.errors import UserError
from workflows.hooks import run_with_hooks
from workflows.models import LoadedModel


class WindowBatch(NamedTuple):
    """One batch of token windows on the context's device."""

    ids_BT: Tensor
    """[B, T] int64 token ids, BOS at position 0."""
    keep_BT: Tensor
    """[B, T] bool: positions the SAE was trained on (not BOS, separators, padding)."""


@dataclass(kw_only=True)
class BenchContext:
    """Everything a bench metric may use. The model and SAE are frozen and in eval mode on ``device``."""

    sae: Any
    """The SAE module (``sae_core`` SparseAutoencoder or InputNormalizedSAE): ``encode``/``decode``/``forward``."""
    sae_dir: Path | None
    """The SAE's folder (SAELens layout) when it has one; metrics may read ``sparsity.safetensors`` etc."""
    loaded: LoadedModel
    """The frozen model (``loaded.model``, a ``*ForCausalLM``) and its tokenizer (``loaded.tokenizer``)."""
    hook: str
    """Hook the SAE reads (``blocks.{L}.hook_resid_post`` ...)."""
    out_hook: str | None = None
    """Transcoders: the hook their output stands in for; None for plain SAEs."""
    windows: Windows
    """Held-out token windows of the corpus (after the tokens training used, when known)."""
    device: str = "cpu"
    """Where the model and SAE live."""
    seed: int = 0
    """Seed for every random choice a metric makes (sampled latents, splits, random controls)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Per-metric options, ``options[metric_name]`` a dict (e.g. ``{"autointerp": {"n_latents": 20}}``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The SAE's cfg.json metadata (model_name, hook_name, context_size, dataset_path, ...)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """SAE-independent results cached per (actor, model, hook): model activations, raw-activation probes."""

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    def opts(self, metric: str) -> dict[str, Any]:
        """The options given for ``metric`` (empty when none)."""
        return dict(self.options.get(metric) or {})

    def batches(self, batch_size: int = 8, windows: Windows | None = None) -> Iterator[WindowBatch]:
        """``windows`` (default: the context's) in batches of ``batch_size`` windows, on the device."""
        windows = self.windows if windows is None else windows
        for start in range(0, len(windows.token_ids), batch_size):
            ids = torch.from_numpy(windows.token_ids[start : start + batch_size].astype(np.int64))
            keep = torch.from_numpy(np.asarray(windows.keep[start : start + batch_size], dtype=bool))
            yield WindowBatch(ids.to(self.device), keep.to(self.device))

    @torch.no_grad()
    def activations(self, ids_BT: Tensor, attention_mask_BT: Tensor | None = None) -> Tensor:
        """[B, T, D] float32 activations at ``hook`` (the forward stops after the hook's block)."""
        run = run_with_hooks(self.loaded.model, ids_BT.to(self.device), capture=[self.hook],
                             attention_mask=None if attention_mask_BT is None else attention_mask_BT.to(self.device))
        return run.activations[self.hook].float()

    @torch.no_grad()
    def latents(self, acts_ND: Tensor) -> Tensor:
        """[N, F] SAE latents of activations [N, D] (any leading shape is flattened first)."""
        return self.sae.encode(acts_ND.reshape(-1, acts_ND.shape[-1]).float().to(self.device))


@dataclass(kw_only=True)
class BenchResult:
    """What a metric returns: flat numbers for MLflow/frontiers, and anything JSON-able for bench.json."""

    metrics: dict[str, float]
    """Logged as ``bench/<metric name>/<key>`` (NaN values are kept in bench.json, not logged)."""
    details: dict[str, Any] = field(default_factory=dict)
    """JSON-able details (per-letter tables, per-k accuracies, examples, explanations)."""

    def __post_init__(self) -> None:
        self.metrics = {str(k): float(v) for k, v in self.metrics.items()}

    def logged(self, name: str) -> dict[str, float]:
        """The MLflow metrics of this result, named ``bench/<name>/<key>``, NaN dropped."""
        return {f"bench/{name}/{k}": v for k, v in self.metrics.items() if not math.isnan(v)}


MetricFn = Callable[[BenchContext], BenchResult]

METRICS: dict[str, str | MetricFn] = {
    "core": "workflows.bench:core",
    "absorption": "workflows.absorption:absorption",
    "sparse_probing": "workflows.probing:sparse_probing",
    "autointerp": "workflows.autointerp:autointerp",
}
"""Metric name -> function, or ``"module:function"`` imported on first use (so a metric's dependencies
load only when it is asked for, and a module missing on this checkout fails only that metric)."""

DEFAULT_METRICS = ("core", "absorption", "sparse_probing")


def register(name: str, fn: MetricFn | str) -> None:
    """Add (or replace) a metric."""
    METRICS[name] = fn


def get_metric(name: str) -> MetricFn:
    """The function of metric ``name``; a UserError names unknown metrics and uninstalled modules."""
    entry = METRICS.get(name)
    if entry is None:
        raise UserError(f"unknown bench metric {name!r}; choose from {', '.join(METRICS)}")
    if callable(entry):
        return entry
    module, _, attr = entry.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise UserError(f"bench metric {name!r} needs {module}, which this checkout lacks") from exc
    METRICS[name] = fn
    return fn


def core(ctx: BenchContext) -> BenchResult:
    """``sae eval``'s metrics on the context's windows: L0, MSE, FVU, dead/dense fractions, CE loss
    (clean, spliced, zero-ablated), CE loss recovered and KL; per-site FVU for SAEs that read several sites."""
    from workflows.evaluate import evaluate_per_site, evaluate_sae

    batch_size = int(ctx.opts("core").get("batch_size", 8))
    if not ctx.sae.wiring.splices:
        hooks = ctx.metadata.get("hook_names") or []
        return BenchResult(metrics=evaluate_per_site(ctx.sae, ctx.loaded.model, hooks, ctx.windows,
                                                     batch_size=batch_size), details={"hooks": hooks})
    result = evaluate_sae(ctx.sae, ctx.loaded.model, ctx.hook, ctx.windows, batch_size=batch_size,
                          out_hook=ctx.out_hook)
    return BenchResult(metrics=result.metrics(), details={"n_tokens": result.n_tokens})


def parse_metrics(spec: str | None) -> list[str]:
    """``"core,absorption"`` -> checked names (default: DEFAULT_METRICS)."""
    names = [n.strip() for n in (spec or ",".join(DEFAULT_METRICS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise UserError(f"unknown bench metric(s) {unknown or [spec]}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))
