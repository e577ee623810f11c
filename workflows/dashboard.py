"""Feature dashboards: one pass of a corpus through the model and the SAE on Ray Data, then a static site.

Each Ray Data actor (:class:`DashboardMapper`) holds the frozen model and the SAE and turns a batch of
context windows into a :class:`FeatureStates` for the tracked features: the firing count and a
log-binned activation histogram per feature, the top ``k`` activations (a bounded top-k buffer per
feature row, the vectorised form of a size-k min-heap) and a uniform sample of ``n_samples`` firing
tokens (a bottom-k sketch: each firing event gets a pseudo-random key hashed from its location and the
feature, and the smallest keys are kept). Each kept example carries the feature's activations on the
``left + 1 + right`` tokens around it. The driver folds the per-batch states together with the pure
:func:`merge`; ties are broken by token location, so any split of the windows over workers gives the
same result as one pass over all of them.

A token location is ``window_id * context_size + position``; the driver rebuilds the text from the
windows it packed. BOS, separators and padding never count (their latents are zeroed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae_core.io import load_sae, read_cfg
from workflows.corpus import DEFAULT_CORPUS, Windows, iter_documents, pack_windows
from workflows.errors import UserError
from workflows.hooks import parse_hook, run_with_hooks
from workflows.models import DEFAULT_MODEL, load_config, load_model
from workflows.options import DEFAULT_CONTEXT_SIZE
from workflows.raysession import ensure_ray

logger = logging.getLogger(__name__)

# Histogram bins: [0, 1e-4), then 10 log-spaced bins per decade up to 1e4, then [1e4, inf).
HIST_EDGES = np.round(10.0 ** np.linspace(-4, 4, 81), 12)
N_BINS = len(HIST_EDGES) + 1


@dataclass(kw_only=True)
class DashboardConfig:
    """What to run, on which text, which features, and where the site goes."""

    sae: str
    """SAE folder (SAELens layout, see sae_core/io.py)."""
    n_tokens: int
    """Tokens to scan (whole windows; BOS and separators are not counted)."""
    out: str
    """Output folder of the static site."""
    hook: str | None = None
    """Hook the SAE reads; default: the ``hook_name`` in the SAE's cfg.json metadata."""
    model: str | None = None
    """Model spec; default: the SAE's ``model_name`` metadata, else the built-in SmolLM2."""
    corpus: str = DEFAULT_CORPUS
    """Corpus spec (see workflows/corpus.py)."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet, hf) holding the text."""
    context_size: int | None = None
    """Tokens per window, BOS included; default: the SAE's ``context_size`` metadata, else DEFAULT_CONTEXT_SIZE."""
    features: list[int] | None = None
    """Feature ids to report; None with ``top_density`` None means the first 100."""
    top_density: int | None = None
    """Report the this-many features of highest firing density instead (tracks every feature)."""
    top_k: int = 20
    """Top-activating examples kept per feature."""
    n_samples: int = 40
    """Uniformly sampled firing tokens kept per feature (the quantile examples come from these)."""
    left: int = 12
    """Context tokens shown before an example's token."""
    right: int = 4
    """Context tokens shown after it."""
    workers: int = 1
    """Actors in the Ray Data pool, each with its own model and SAE."""
    batch_size: int = 16
    """Windows per forward pass."""
    threads: int | None = None
    """Torch threads per actor; default: the node's cores divided by ``workers``."""
    cache_dir: str | None = None
    """Model cache folder."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "top_k", "n_samples", "workers", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.left < 0 or self.right < 0:
            raise UserError("context left/right must be >= 0")
        if self.features is not None and self.top_density is not None:
            raise UserError("give --features or --top-density, not both")
        if self.top_density is not None and self.top_density < 1:
            raise UserError(f"--top-density must be at least 1, got {self.top_density}")
        if self.features is not None and not self.features:
            raise UserError("--features selects no feature")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_features(spec: str) -> list[int]:
    """``"0-99,120,200-210"`` -> sorted unique ids; a UserError names a bad part."""
    ids: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"--features part {part!r} is not N or N-M")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise UserError(f"--features range {part!r} is empty")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


# -- the mergeable state --------------------------------------------------------------------------
@dataclass(kw_only=True)
class FeatureStates:
    """Bounded statistics of the tracked features; row ``i`` is feature ``features[i]``. Picklable.

    Empty top slots have activation -inf and location -1; empty sample slots have key +inf.
    Context arrays hold the feature's activation at offsets ``-left..right`` (NaN outside the window).
    """

    features: np.ndarray  # [F] int64
    n_tokens: int
    count: np.ndarray  # [F] int64, firing tokens
    hist: np.ndarray  # [F, N_BINS] int64
    top_act: np.ndarray  # [F, K] float32, descending
    top_loc: np.ndarray  # [F, K] int64
    top_ctx: np.ndarray  # [F, K, C] float16
    sample_key: np.ndarray  # [F, S] float64, ascending
    sample_act: np.ndarray  # [F, S] float32
    sample_loc: np.ndarray  # [F, S] int64
    sample_ctx: np.ndarray  # [F, S, C] float16


def empty_states(features: np.ndarray, k: int, s: int, c: int) -> FeatureStates:
    n = len(features)
    return FeatureStates(
        features=np.asarray(features, dtype=np.int64), n_tokens=0, count=np.zeros(n, np.int64),
        hist=np.zeros((n, N_BINS), np.int64),
        top_act=np.full((n, k), -np.inf, np.float32), top_loc=np.full((n, k), -1, np.int64),
        top_ctx=np.full((n, k, c), np.nan, np.float16),
        sample_key=np.full((n, s), np.inf), sample_act=np.zeros((n, s), np.float32),
        sample_loc=np.full((n, s), -1, np.int64), sample_ctx=np.full((n, s, c), np.nan, np.float16),
    )


def sample_keys(locs: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) keys hashed (splitmix64) from (location, feature): the same on every worker."""
    with np.errstate(over="ignore"):
        z = locs.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + features.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _rank_in_group(group: np.ndarray, primary: np.ndarray, secondary: np.ndarray, limit: int):
    """Entries ordered by (group, primary, secondary); returns (indices, rank) of the first ``limit`` per group."""
    order = np.lexsort((secondary, primary, group))
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    keep = rank < limit
    return order[keep], rank[keep]


def _contexts(lat_BTF: np.ndarray, b: np.ndarray, t: np.ndarray, f: np.ndarray, left: int, right: int) -> np.ndarray:
    offsets = np.arange(-left, right + 1)
    pos = t[:, None] + offsets[None, :]
    inside = (pos >= 0) & (pos < lat_BTF.shape[1])
    vals = lat_BTF[b[:, None], np.clip(pos, 0, lat_BTF.shape[1] - 1), f[:, None]]
    return np.where(inside, vals, np.nan).astype(np.float16)


def batch_states(latents_BTF: Tensor, keep_BT: np.ndarray, window_ids_B: np.ndarray, features: np.ndarray, *,
                 k: int, s: int, left: int, right: int) -> FeatureStates:
    """The state of one batch: ``latents_BTF`` holds the tracked features' activations (columns = ``features``)."""
    lat = latents_BTF.detach().float().cpu().numpy() * keep_BT[:, :, None]
    B, T, F = lat.shape
    state = empty_states(features, k, s, left + 1 + right)
    state.n_tokens = int(keep_BT.sum())
    b, t, f = np.nonzero(lat > 0)
    if len(b) == 0:
        return state
    act = lat[b, t, f]
    loc = np.asarray(window_ids_B, dtype=np.int64)[b] * T + t
    state.count = np.bincount(f, minlength=F).astype(np.int64)
    bins = np.searchsorted(HIST_EDGES, act, side="right")
    state.hist = np.bincount(f * N_BINS + bins, minlength=F * N_BINS).reshape(F, N_BINS).astype(np.int64)
    idx, rank = _rank_in_group(f, -act, loc, k)
    state.top_act[f[idx], rank], state.top_loc[f[idx], rank] = act[idx], loc[idx]
    state.top_ctx[f[idx], rank] = _contexts(lat, b[idx], t[idx], f[idx], left, right)
    key = sample_keys(loc, state.features[f])
    idx, rank = _rank_in_group(f, key, loc, s)
    state.sample_key[f[idx], rank], state.sample_act[f[idx], rank] = key[idx], act[idx]
    state.sample_loc[f[idx], rank] = loc[idx]
    state.sample_ctx[f[idx], rank] = _contexts(lat, b[idx], t[idx], f[idx], left, right)
    return state


def _take_rows(order: np.ndarray, limit: int, *arrays: np.ndarray) -> list[np.ndarray]:
    order = order[:, :limit]
    return [np.take_along_axis(a, order if a.ndim == 2 else order[:, :, None], axis=1) for a in arrays]


def merge(states: list[FeatureStates]) -> FeatureStates:
    """Combine states of disjoint token sets (same features): sums, and top-k / bottom-k by (value, location)."""
    if not states:
        raise ValueError("merge needs at least one state")
    first = states[0]
    for other in states[1:]:
        if not np.array_equal(other.features, first.features):
            raise ValueError("states track different features")
    k, s = first.top_act.shape[1], first.sample_key.shape[1]

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(st, name) for st in states], axis=1)

    top_act, top_loc, top_ctx = cat("top_act"), cat("top_loc"), cat("top_ctx")
    order = np.lexsort((top_loc, -top_act), axis=-1)
    top_act, top_loc, top_ctx = _take_rows(order, k, top_act, top_loc, top_ctx)
    keys, s_act, s_loc, s_ctx = cat("sample_key"), cat("sample_act"), cat("sample_loc"), cat("sample_ctx")
    order = np.lexsort((s_loc, keys), axis=-1)
    keys, s_act, s_loc, s_ctx = _take_rows(order, s, keys, s_act, s_loc, s_ctx)
    return FeatureStates(
        features=first.features.copy(), n_tokens=sum(st.n_tokens for st in states),
        count=sum(st.count for st in states), hist=sum(st.hist for st in states),
        top_act=top_act, top_loc=top_loc, top_ctx=top_ctx,
        sample_key=keys, sample_act=s_act, sample_loc=s_loc, sample_ctx=s_ctx,
    )


# -- the Ray Data pass ----------------------------------------------------------------------------
class DashboardMapper:
    """Ray Data callable class: frozen model + SAE; a batch of windows -> one pickled FeatureStates row."""

    def __init__(self, cfg: dict[str, Any], features: list[int]):
        self.cfg = DashboardConfig(**cfg)
        torch.set_num_threads(self.cfg.threads or max(1, (os.cpu_count() or 1) // self.cfg.workers))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model = load_model(self.cfg.model, cache_dir=self.cfg.cache_dir).model
        self.sae = load_sae(self.cfg.sae)
        self.features = np.asarray(features, dtype=np.int64)
        self.columns = torch.from_numpy(self.features)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        token_ids = torch.from_numpy(np.asarray(batch["token_ids"], dtype=np.int64))
        with torch.inference_mode():
            acts_BTD = run_with_hooks(self.model, token_ids, capture=[self.cfg.hook]).activations[self.cfg.hook]
            B, T, D = acts_BTD.shape
            latents_BTF = self.sae.encode(acts_BTD.reshape(B * T, D).float())[:, self.columns].reshape(B, T, -1)
        state = batch_states(latents_BTF, np.asarray(batch["keep"], dtype=bool), np.asarray(batch["window_id"]),
                             self.features, k=self.cfg.top_k, s=self.cfg.n_samples, left=self.cfg.left,
                             right=self.cfg.right)
        return {"state": np.array([pickle.dumps(state, protocol=5)], dtype=object)}


def collect_states(cfg: DashboardConfig, windows: Windows, features: list[int]) -> FeatureStates:
    """One pass over ``windows`` on a Ray Data actor pool; the per-batch states merged on the driver."""
    import ray

    ensure_ray()
    items = [{"window_id": w, "token_ids": windows.token_ids[w], "keep": windows.keep[w]}
             for w in range(len(windows.token_ids))]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.batch_size, 256)))
    mapped = ds.map_batches(DashboardMapper, fn_constructor_kwargs={"cfg": cfg.to_dict(), "features": features},
                            batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.workers),
                            batch_format="numpy", num_cpus=0.5)
    state = empty_states(np.asarray(features), cfg.top_k, cfg.n_samples, cfg.left + 1 + cfg.right)
    for batch in mapped.iter_batches(batch_size=None, batch_format="numpy"):
        # Fold as results arrive, so the driver holds one state plus one block at a time.
        state = merge([state, *(pickle.loads(blob) for blob in batch["state"])])
    return state


# -- putting it together --------------------------------------------------------------------------
@dataclass(kw_only=True)
class DashboardResult:
    out: str
    features: list[int]
    n_tokens: int
    seconds: float


def resolve(cfg: DashboardConfig) -> tuple[DashboardConfig, int]:
    """Fill hook/model/context size from the SAE's metadata and check them; returns (cfg, d_sae)."""
    sae_cfg = read_cfg(cfg.sae)
    meta = sae_cfg.get("metadata") or {}
    hook = cfg.hook or meta.get("hook_name")
    if not hook:
        raise UserError(f"{cfg.sae}/cfg.json names no hook_name; pass --hook")
    model = cfg.model or meta.get("model_name") or DEFAULT_MODEL
    context = cfg.context_size or meta.get("context_size") or DEFAULT_CONTEXT_SIZE
    cfg = dataclasses.replace(cfg, hook=hook, model=model, context_size=int(context))
    config = load_config(model, cfg.cache_dir)
    parse_hook(hook, int(getattr(config, "num_hidden_layers", None) or config.n_layer))
    width = int(getattr(config, "hidden_size", None) or config.n_embd)
    if int(sae_cfg["d_in"]) != width:
        raise UserError(f"the SAE reads width {sae_cfg['d_in']}, but {hook} of {model} has width {width}")
    d_sae = int(sae_cfg["d_sae"])
    bad = [f for f in cfg.features or [] if f >= d_sae]
    if bad:
        raise UserError(f"feature(s) {bad[:5]} out of range: the SAE has features 0..{d_sae - 1}")
    return cfg, d_sae


class FeatureScan(NamedTuple):
    """What a dashboard and its exports report: the resolved config, the model, the scanned windows, the
    tracked features' statistics and the rows of ``state`` chosen to report."""

    cfg: DashboardConfig
    loaded: Any
    windows: Windows
    state: FeatureStates
    chosen: list[int]


def scan_features(cfg: DashboardConfig) -> FeatureScan:
    """Resolve ``cfg`` against the SAE, load the model, scan the corpus and pick the features to report."""
    cfg, d_sae = resolve(cfg)
    tracked = cfg.features if cfg.features is not None else (
        list(range(d_sae)) if cfg.top_density else list(range(min(100, d_sae))))
    loaded = load_model(cfg.model, cache_dir=cfg.cache_dir)
    windows = pack_windows(iter_documents(cfg.corpus, text_field=cfg.text_field), loaded.tokenizer,
                           context_size=cfg.context_size, n_tokens=cfg.n_tokens)
    state = collect_states(cfg, windows, tracked)
    return FeatureScan(cfg, loaded, windows, state, select_rows(state, cfg.top_density))


def build_dashboard(cfg: DashboardConfig) -> DashboardResult:
    """Scan the corpus, pick the features, write ``cfg.out`` (index.html + feature-NNNNN.html)."""
    from workflows.dashboard_html import write_site

    start = time.perf_counter()
    cfg, loaded, windows, state, chosen = scan_features(cfg)
    sae = load_sae(cfg.sae)
    write_site(Path(cfg.out), cfg, state, chosen, windows, loaded, sae)
    return DashboardResult(out=cfg.out, features=[int(state.features[i]) for i in chosen], n_tokens=state.n_tokens,
                           seconds=time.perf_counter() - start)


def select_rows(state: FeatureStates, top_density: int | None) -> list[int]:
    """Rows to report: all tracked, or the ``top_density`` most often firing (ties: lower id first)."""
    if top_density is None:
        return list(range(len(state.features)))
    order = np.lexsort((state.features, -state.count))
    return sorted(order[:top_density].tolist(), key=lambda i: int(state.features[i]))
