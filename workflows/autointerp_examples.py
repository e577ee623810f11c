"""Auto-interp examples: one pass of the windows through the model and the SAE, then per latent the
examples shown to the explainer, the held-out firing examples and the negatives (see workflows/autointerp.py).

Candidate latents are tracked with the dashboard's mergeable statistics (workflows/dashboard.py
``batch_states`` / ``merge``: top activations and a uniform sample of firing tokens, with contexts) plus
every firing location (to find negatives). Random directions for the control are projected in the same pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workflows.corpus import Windows
from workflows.dashboard import FeatureStates, batch_states, empty_states, merge
from workflows.dashboard_html import Example, make_example
from workflows.errors import UserError
from workflows.hooks import run_with_hooks

SCORINGS = ("auto", "likelihood", "questions")


@dataclass(kw_only=True)
class AutoInterpConfig:
    """How many latents and examples, how they are shown, and the seeds."""

    n_latents: int = 16
    """Latents explained and scored (fewer when fewer fire often enough)."""
    n_explain_top: int = 6
    """Top-activating examples shown to the explainer."""
    n_explain_quantile: int = 2
    """Sampled examples at evenly spaced activation quantiles shown to the explainer."""
    n_positives: int = 10
    """Held-out firing examples per latent for the scorers."""
    positive_quantile: float = 0.8
    """Held-out positives are drawn from the sampled firing tokens whose activation is at least this
    quantile of the sampled activations (0: any firing token). Weak firings of a briefly trained SAE are
    mostly noise that no explanation predicts; the random directions of the control get the same rule."""
    n_negatives: int = 10
    """Contexts where the latent fires nowhere, per latent (detection)."""
    top_k: int = 20
    """Top activations tracked per candidate latent."""
    n_samples: int = 80
    """Uniformly sampled firing tokens tracked per candidate latent."""
    left: int = 6
    """Tokens shown before an example's firing token."""
    right: int = 2
    """Tokens shown after it."""
    mark_fraction: float = 0.3
    """A token is marked active when its activation is at least this fraction of the context's maximum."""
    max_density: float = 0.1
    """Latents firing on more than this fraction of tokens are not sampled (no clean negatives)."""
    max_new_tokens: int = 16
    """Explanation length limit (tokens)."""
    n_bootstrap: int = 2000
    """Bootstrap resamples for the intervals."""
    batch_size: int = 8
    """Windows per model forward in the example pass."""
    n_tokens: int | None = None
    """Scan only the first windows holding this many kept tokens (None: every window given)."""
    control: bool = True
    """Also score random directions and report the margin of the trained latents over them."""
    scoring: str = "auto"
    """How the scorer judges: ``likelihood`` (how much the explanation raises the scorer LM's log-probability
    of the example's tokens; needs a local scorer model), ``questions`` (Yes/No detection and fuzzing
    questions; any judge, an endpoint included), ``auto``: likelihood for a local scorer, else questions."""
    shuffled: bool = True
    """Also score the trained latents with each other's explanations (a scorer that reads the explanation
    drops to chance there) and report the margin over that."""
    seed: int = 0
    """Seeds the latent sample, example splits, negatives, fuzzing marks, random directions, bootstrap."""

    def __post_init__(self) -> None:
        for name in (
            "n_latents",
            "n_explain_top",
            "n_positives",
            "n_negatives",
            "top_k",
            "n_samples",
            "max_new_tokens",
            "n_bootstrap",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"autointerp {name} must be at least 1, got {getattr(self, name)}")
        if self.n_explain_top > self.top_k:
            raise UserError(f"autointerp n_explain_top ({self.n_explain_top}) exceeds top_k ({self.top_k})")
        if self.n_explain_quantile + self.n_positives > self.n_samples:
            raise UserError("autointerp n_explain_quantile + n_positives exceeds n_samples; raise n_samples")
        if self.scoring not in SCORINGS:
            raise UserError(f"autointerp scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not 0 <= self.positive_quantile < 1:
            raise UserError(f"autointerp positive_quantile must be in [0, 1), got {self.positive_quantile}")
        if not 0 < self.mark_fraction <= 1 or not 0 < self.max_density <= 1:
            raise UserError("autointerp mark_fraction and max_density must be in (0, 1]")

    @classmethod
    def from_options(cls, options: dict[str, Any], **defaults: Any) -> AutoInterpConfig:
        """From a dict (``sae bench --option autointerp.KEY=V``); keys that are not fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**defaults, **{k: v for k, v in options.items() if k in names}})


# -- the example pass -----------------------------------------------------------------------------
Encoder = Callable[[Tensor], Tensor]
"""Activations [N, D] -> the tracked latents' activations [N, F]."""


@dataclass(kw_only=True)
class Tracked:
    """Statistics of one set of tracked latents over the pass."""

    states: FeatureStates
    fire_loc: np.ndarray
    """[M] int64 token locations (window * T + position) of every firing event."""
    fire_row: np.ndarray
    """[M] int64 row (in ``states.features``) of each event."""


def hook_batches(
    model: Any, hook: str, windows: Windows, batch_size: int
) -> Iterator[tuple[Tensor, np.ndarray, np.ndarray]]:
    """(activations [B, T, D] float32, keep [B, T], window ids [B]) batch by batch."""
    device = next(model.parameters()).device
    for start in range(0, len(windows.token_ids), batch_size):
        ids = torch.from_numpy(windows.token_ids[start : start + batch_size].astype(np.int64)).to(device)
        with torch.no_grad():
            acts = run_with_hooks(model, ids, capture=[hook]).activations[hook].float()
        yield (
            acts,
            np.asarray(windows.keep[start : start + batch_size], bool),
            np.arange(start, start + len(ids)),
        )


def track(
    latents_BTF: Tensor,
    keep_BT: np.ndarray,
    window_ids: np.ndarray,
    features: np.ndarray,
    cfg: AutoInterpConfig,
) -> Tracked:
    """The dashboard's state of one batch plus its firing locations."""
    states = batch_states(
        latents_BTF,
        keep_BT,
        window_ids,
        features,
        k=cfg.top_k,
        s=cfg.n_samples,
        left=cfg.left,
        right=cfg.right,
    )
    lat = latents_BTF.detach().float().cpu().numpy() * keep_BT[:, :, None]
    b, t, f = np.nonzero(lat > 0)
    return Tracked(states=states, fire_loc=window_ids[b] * lat.shape[1] + t, fire_row=f.astype(np.int64))


def merge_tracked(parts: list[Tracked]) -> Tracked:
    return Tracked(
        states=merge([p.states for p in parts]),
        fire_loc=np.concatenate([p.fire_loc for p in parts]),
        fire_row=np.concatenate([p.fire_row for p in parts]),
    )


def scan(
    batches: Iterable[tuple[Tensor, np.ndarray, np.ndarray]],
    encoder: Encoder,
    features: np.ndarray,
    cfg: AutoInterpConfig,
    directions_DR: Tensor | None = None,
) -> tuple[Tracked, np.ndarray | None]:
    """One pass: the tracked latents' statistics, and the projections [W, T, R] on ``directions_DR`` (or None)."""
    part = Tracked(
        states=empty_states(features, cfg.top_k, cfg.n_samples, cfg.left + 1 + cfg.right),
        fire_loc=np.zeros(0, np.int64),
        fire_row=np.zeros(0, np.int64),
    )
    projections = []
    for acts_BTD, keep_BT, window_ids in batches:
        B, T, D = acts_BTD.shape
        with torch.no_grad():
            latents = encoder(acts_BTD.reshape(B * T, D)).reshape(B, T, -1)
            if directions_DR is not None:
                projections.append((acts_BTD @ directions_DR.to(acts_BTD)).cpu().numpy())
        part = merge_tracked([part, track(latents, keep_BT, window_ids, features, cfg)])
    return part, (np.concatenate(projections) if projections else None)


def random_directions(d: int, n: int, seed: int) -> Tensor:
    """[d, n] unit directions, Gaussian then normalised."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(d, n, generator=g)
    return dirs / dirs.norm(dim=0, keepdim=True)


def threshold_projections(proj_WTR: np.ndarray, keep_WT: np.ndarray, densities: np.ndarray) -> np.ndarray:
    """ReLU(projection - threshold) with each direction's threshold at its (1 - density) quantile."""
    kept = proj_WTR[keep_WT]
    thresholds = np.array([np.quantile(kept[:, r], 1.0 - densities[r]) for r in range(proj_WTR.shape[2])])
    return np.maximum(proj_WTR - thresholds, 0.0).astype(np.float32)


# -- examples of one latent -----------------------------------------------------------------------
@dataclass(kw_only=True)
class LatentExamples:
    latent: int
    """Latent id (a column of the SAE, or a random direction's index)."""
    density: float
    explain: list[Example]
    positives: list[Example]
    negatives: list[Example]


class TokenStrings:
    """Raw text of single tokens for prompts (a newline shown as ``\\n``, so a snippet stays one line)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = (
                self.tokenizer.decode([int(token_id)]).replace("\n", "\\n").replace("\t", " ")
            )
        return self.cache[token_id]


def example(
    windows: Windows, loc: int, ctx: np.ndarray, act: float, left: int, text: TokenStrings
) -> Example:
    """The dashboard's example, cut to the kept tokens of the firing token's document around it (no BOS,
    separator or text of another document)."""
    ex = make_example(windows, loc, ctx, act, left, text)
    w, t = ex.window, ex.position
    ok = [
        bool(windows.keep[w, t + i - ex.peak])
        and windows.doc_ids[w, t + i - ex.peak] == windows.doc_ids[w, t]
        for i in range(len(ex.tokens))
    ]
    lo, hi = ex.peak, ex.peak + 1
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(ok) and ok[hi]:
        hi += 1
    return dataclasses.replace(ex, tokens=ex.tokens[lo:hi], acts=ex.acts[lo:hi], peak=ex.peak - lo)


def _overlaps(loc: int, taken: list[int], T: int, span: int) -> bool:
    w, t = divmod(int(loc), T)
    return any(w == tw and abs(t - tt) <= span for tw, tt in (divmod(int(x), T) for x in taken))


def _negatives(
    fired: set[int],
    windows: Windows,
    n: int,
    cfg: AutoInterpConfig,
    rng: np.random.Generator,
    text: TokenStrings,
) -> list[Example]:
    """``n`` random contexts (kept centre token) where the latent fires on no token."""
    W, T = windows.token_ids.shape
    out: list[Example] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        w, t = int(rng.integers(W)), int(rng.integers(cfg.left, T - cfg.right))
        if not windows.keep[w, t] or any(w * T + p in fired for p in range(t - cfg.left, t + cfg.right + 1)):
            continue
        if _overlaps(w * T + t, [e.window * T + e.position for e in out], T, cfg.left + cfg.right):
            continue
        ctx = np.zeros(cfg.left + 1 + cfg.right, np.float16)
        out.append(example(windows, w * T + t, ctx, 0.0, cfg.left, text))
    return out


def select_examples(
    tracked: Tracked,
    row: int,
    windows: Windows,
    cfg: AutoInterpConfig,
    rng: np.random.Generator,
    text: TokenStrings,
) -> LatentExamples | None:
    """Explainer, positive and negative examples of ``tracked`` row ``row``; None when too few exist."""
    st, T, span = tracked.states, windows.token_ids.shape[1], cfg.left + cfg.right
    tops = [j for j in range(cfg.top_k) if np.isfinite(st.top_act[row, j])][: cfg.n_explain_top]
    taken = [int(st.top_loc[row, j]) for j in tops]
    sampled = [
        j
        for j in np.flatnonzero(np.isfinite(st.sample_key[row]))
        if not _overlaps(st.sample_loc[row, j], taken, T, span)
    ]
    strong = np.quantile(st.sample_act[row, sampled], cfg.positive_quantile) if sampled else 0.0
    pos: list[int] = []
    for j in rng.permutation(sampled):
        if st.sample_act[row, j] < strong:
            continue
        if len(pos) < cfg.n_positives and not _overlaps(
            st.sample_loc[row, j], [st.sample_loc[row, i] for i in pos], T, span
        ):
            pos.append(int(j))
    rest = [
        j
        for j in sampled
        if not _overlaps(st.sample_loc[row, j], [st.sample_loc[row, i] for i in pos], T, span)
    ]
    rest.sort(key=lambda j: float(st.sample_act[row, j]))
    quant = (
        [rest[int(i)] for i in np.linspace(0, len(rest) - 1, cfg.n_explain_quantile).round()] if rest else []
    )
    fired = set(tracked.fire_loc[tracked.fire_row == row].tolist())
    negatives = _negatives(fired, windows, cfg.n_negatives, cfg, rng, text)
    if len(tops) < cfg.n_explain_top or len(pos) < cfg.n_positives or len(negatives) < cfg.n_negatives:
        return None
    explain = [
        example(windows, st.top_loc[row, j], st.top_ctx[row, j], st.top_act[row, j], cfg.left, text)
        for j in tops
    ]
    explain += [
        example(windows, st.sample_loc[row, j], st.sample_ctx[row, j], st.sample_act[row, j], cfg.left, text)
        for j in dict.fromkeys(quant)
    ]
    positives = [
        example(windows, st.sample_loc[row, j], st.sample_ctx[row, j], st.sample_act[row, j], cfg.left, text)
        for j in pos
    ]
    return LatentExamples(
        latent=int(st.features[row]),
        density=float(st.count[row]) / max(st.n_tokens, 1),
        explain=explain,
        positives=positives,
        negatives=negatives,
    )


def choose_latents(
    tracked: Tracked, windows: Windows, cfg: AutoInterpConfig, rng: np.random.Generator, text: TokenStrings
) -> list[LatentExamples]:
    """The first ``n_latents`` tracked rows (in their seeded order) with enough examples and density <= max."""
    need = cfg.n_explain_top + cfg.n_positives
    chosen: list[LatentExamples] = []
    for row in range(len(tracked.states.features)):
        count = int(tracked.states.count[row])
        if count < need or count > cfg.max_density * tracked.states.n_tokens:
            continue
        examples = select_examples(tracked, row, windows, cfg, rng, text)
        if examples is not None:
            chosen.append(examples)
        if len(chosen) == cfg.n_latents:
            break
    return chosen


# -- marks on an example (what the explainer is shown, what fuzzing scores) --------------------------
def active_marks(ex: Example, fraction: float) -> set[int]:
    """Tokens whose activation is at least ``fraction`` of the context's maximum (and positive)."""
    acts = np.asarray(ex.acts, float)
    top = acts.max(initial=0.0)
    return set(np.flatnonzero((acts > 0) & (acts >= fraction * top)).tolist()) if top > 0 else set()


def fuzz_pairs(
    ex: Example, cfg: AutoInterpConfig, rng: np.random.Generator
) -> tuple[set[int], set[int]] | None:
    """(correct marks, as many random inactive tokens); None when too few inactive tokens exist."""
    right = active_marks(ex, cfg.mark_fraction)
    inactive = [i for i, a in enumerate(ex.acts) if a <= 0]
    if not right or len(inactive) < len(right):
        return None
    return right, set(rng.choice(inactive, size=len(right), replace=False).tolist())
