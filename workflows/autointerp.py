"""Auto-interpretation: an explainer LLM explains SAE latents, a scorer LLM is scored on held-out examples.

1. **Examples** (:func:`scan`, :func:`select_examples`): one pass of the windows through the model; the
   dashboard's mergeable statistics (:func:`workflows.dashboard.batch_states` / ``merge``) keep, for a
   seeded set of candidate latents, the top activations and a uniform sample of firing tokens with their
   contexts, plus every firing location. Latents firing on fewer tokens than the examples need, or on
   more than ``max_density`` of tokens, are skipped; the first ``n_latents`` others in seeded order are
   kept. Per latent: the explainer sees the top ``n_explain_top`` examples plus ``n_explain_quantile``
   from the sample at evenly spaced activation quantiles; the scorers see ``n_positives`` other sampled
   examples (a uniform draw of firing tokens, none overlapping an explainer example) and ``n_negatives``
   random contexts where the latent fires nowhere.
2. **Explanations**: greedy, one line, from the marked examples (workflows/autointerp_prompts.py).
3. **Scores**: detection (is this text one where the latent fires? positives vs negatives) and fuzzing
   (are the marked tokens the active ones? each positive once marked correctly, once with as many
   random inactive tokens marked). A question's score is log P(Yes) - log P(No) of the scorer's first
   answer token; per latent, AUROC of positives against the others (threshold-free, so the judge's bias
   towards Yes or No cancels). Balanced accuracy uses the median score of all that SAE's questions as
   the threshold (half the questions are positives). ``score`` is the mean of the two AUROCs.
   Intervals: 95% percentile bootstrap over latents.
4. **Control**: the same number of random unit directions in activation space, each thresholded at the
   quantile that gives it the firing density of one of the chosen latents, go through the same steps on
   the same windows. A pipeline that measures something scores trained latents above them; the margin
   is the difference of mean scores, with a bootstrap interval.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workflows import autointerp_prompts as prompts
from workflows.corpus import Windows
from workflows.dashboard import FeatureStates, batch_states, empty_states, merge
from workflows.dashboard_html import Example, make_example
from workflows.errors import UserError
from workflows.hooks import run_with_hooks
from workflows.judges import Judge
from workflows.autointerp_stats import auroc, balanced_accuracy, bootstrap_ci, difference_ci

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class AutoInterpConfig:
    """How many latents and examples, how they are shown, and the seeds."""

    n_latents: int = 16
    """Latents explained and scored (fewer when fewer fire often enough)."""
    n_explain_top: int = 6
    """Top-activating examples shown to the explainer."""
    n_explain_quantile: int = 2
    """Sampled examples at evenly spaced activation quantiles shown to the explainer."""
    n_positives: int = 5
    """Held-out firing examples per latent for the scorers."""
    n_negatives: int = 5
    """Contexts where the latent fires nowhere, per latent (detection)."""
    top_k: int = 20
    """Top activations tracked per candidate latent."""
    n_samples: int = 40
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
    seed: int = 0
    """Seeds the latent sample, example splits, negatives, fuzzing marks, random directions, bootstrap."""

    def __post_init__(self) -> None:
        for name in ("n_latents", "n_explain_top", "n_positives", "n_negatives", "top_k", "n_samples",
                     "max_new_tokens", "n_bootstrap", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"autointerp {name} must be at least 1, got {getattr(self, name)}")
        if self.n_explain_top > self.top_k:
            raise UserError(f"autointerp n_explain_top ({self.n_explain_top}) exceeds top_k ({self.top_k})")
        if self.n_explain_quantile + self.n_positives > self.n_samples:
            raise UserError("autointerp n_explain_quantile + n_positives exceeds n_samples; raise n_samples")
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


def hook_batches(model: Any, hook: str, windows: Windows, batch_size: int) -> Iterator[tuple[Tensor, np.ndarray, np.ndarray]]:
    """(activations [B, T, D] float32, keep [B, T], window ids [B]) batch by batch."""
    device = next(model.parameters()).device
    for start in range(0, len(windows.token_ids), batch_size):
        ids = torch.from_numpy(windows.token_ids[start : start + batch_size].astype(np.int64)).to(device)
        with torch.no_grad():
            acts = run_with_hooks(model, ids, capture=[hook]).activations[hook].float()
        yield acts, np.asarray(windows.keep[start : start + batch_size], bool), np.arange(start, start + len(ids))


def track(latents_BTF: Tensor, keep_BT: np.ndarray, window_ids: np.ndarray, features: np.ndarray,
          cfg: AutoInterpConfig) -> Tracked:
    """The dashboard's state of one batch plus its firing locations."""
    states = batch_states(latents_BTF, keep_BT, window_ids, features, k=cfg.top_k, s=cfg.n_samples,
                          left=cfg.left, right=cfg.right)
    lat = latents_BTF.detach().float().cpu().numpy() * keep_BT[:, :, None]
    b, t, f = np.nonzero(lat > 0)
    return Tracked(states=states, fire_loc=window_ids[b] * lat.shape[1] + t, fire_row=f.astype(np.int64))


def merge_tracked(parts: list[Tracked]) -> Tracked:
    return Tracked(states=merge([p.states for p in parts]), fire_loc=np.concatenate([p.fire_loc for p in parts]),
                   fire_row=np.concatenate([p.fire_row for p in parts]))


def scan(batches: Iterable[tuple[Tensor, np.ndarray, np.ndarray]], encoder: Encoder, features: np.ndarray,
         cfg: AutoInterpConfig, directions_DR: Tensor | None = None) -> tuple[Tracked, np.ndarray | None]:
    """One pass: the tracked latents' statistics, and the projections [W, T, R] on ``directions_DR`` (or None)."""
    part = Tracked(states=empty_states(features, cfg.top_k, cfg.n_samples, cfg.left + 1 + cfg.right),
                   fire_loc=np.zeros(0, np.int64), fire_row=np.zeros(0, np.int64))
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
            self.cache[token_id] = self.tokenizer.decode([int(token_id)]).replace("\n", "\\n").replace("\t", " ")
        return self.cache[token_id]


def example(windows: Windows, loc: int, ctx: np.ndarray, act: float, left: int, text: TokenStrings) -> Example:
    """The dashboard's example, cut to the kept tokens of the firing token's document around it (no BOS,
    separator or text of another document)."""
    ex = make_example(windows, loc, ctx, act, left, text)
    w, t = ex.window, ex.position
    ok = [bool(windows.keep[w, t + i - ex.peak]) and windows.doc_ids[w, t + i - ex.peak] == windows.doc_ids[w, t]
          for i in range(len(ex.tokens))]
    lo, hi = ex.peak, ex.peak + 1
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(ok) and ok[hi]:
        hi += 1
    return dataclasses.replace(ex, tokens=ex.tokens[lo:hi], acts=ex.acts[lo:hi], peak=ex.peak - lo)


def _overlaps(loc: int, taken: list[int], T: int, span: int) -> bool:
    w, t = divmod(int(loc), T)
    return any(w == tw and abs(t - tt) <= span for tw, tt in (divmod(int(x), T) for x in taken))


def _negatives(fired: set[int], windows: Windows, n: int, cfg: AutoInterpConfig, rng: np.random.Generator,
               text: TokenStrings) -> list[Example]:
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


def select_examples(tracked: Tracked, row: int, windows: Windows, cfg: AutoInterpConfig, rng: np.random.Generator,
                    text: TokenStrings) -> LatentExamples | None:
    """Explainer, positive and negative examples of ``tracked`` row ``row``; None when too few exist."""
    st, T, span = tracked.states, windows.token_ids.shape[1], cfg.left + cfg.right
    tops = [j for j in range(cfg.top_k) if np.isfinite(st.top_act[row, j])][: cfg.n_explain_top]
    taken = [int(st.top_loc[row, j]) for j in tops]
    sampled = [j for j in np.flatnonzero(np.isfinite(st.sample_key[row])) if not _overlaps(st.sample_loc[row, j], taken, T, span)]
    pos: list[int] = []
    for j in rng.permutation(sampled):
        if len(pos) < cfg.n_positives and not _overlaps(st.sample_loc[row, j], [st.sample_loc[row, i] for i in pos], T, span):
            pos.append(int(j))
    rest = [j for j in sampled if not _overlaps(st.sample_loc[row, j], [st.sample_loc[row, i] for i in pos], T, span)]
    rest.sort(key=lambda j: float(st.sample_act[row, j]))
    quant = [rest[int(i)] for i in np.linspace(0, len(rest) - 1, cfg.n_explain_quantile).round()] if rest else []
    fired = set(tracked.fire_loc[tracked.fire_row == row].tolist())
    negatives = _negatives(fired, windows, cfg.n_negatives, cfg, rng, text)
    if len(tops) < cfg.n_explain_top or len(pos) < cfg.n_positives or len(negatives) < cfg.n_negatives:
        return None
    explain = [example(windows, st.top_loc[row, j], st.top_ctx[row, j], st.top_act[row, j], cfg.left, text)
               for j in tops]
    explain += [example(windows, st.sample_loc[row, j], st.sample_ctx[row, j], st.sample_act[row, j],
                             cfg.left, text) for j in dict.fromkeys(quant)]
    positives = [example(windows, st.sample_loc[row, j], st.sample_ctx[row, j], st.sample_act[row, j],
                              cfg.left, text) for j in pos]
    return LatentExamples(latent=int(st.features[row]), density=float(st.count[row]) / max(st.n_tokens, 1),
                          explain=explain, positives=positives, negatives=negatives)


def choose_latents(tracked: Tracked, windows: Windows, cfg: AutoInterpConfig, rng: np.random.Generator,
                   text: TokenStrings) -> list[LatentExamples]:
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


# -- explaining and scoring -----------------------------------------------------------------------
def active_marks(ex: Example, fraction: float) -> set[int]:
    """Tokens whose activation is at least ``fraction`` of the context's maximum (and positive)."""
    acts = np.asarray(ex.acts, float)
    top = acts.max(initial=0.0)
    return set(np.flatnonzero((acts > 0) & (acts >= fraction * top)).tolist()) if top > 0 else set()


def explain(judge: Judge, latents: list[LatentExamples], cfg: AutoInterpConfig) -> list[str]:
    chats = [prompts.explain_chat([prompts.render(e.tokens, active_marks(e, cfg.mark_fraction)) for e in lx.explain])
             for lx in latents]
    return [prompts.clean_explanation(t) for t in judge.generate(chats, cfg.max_new_tokens)]


def fuzz_pairs(ex: Example, cfg: AutoInterpConfig, rng: np.random.Generator) -> tuple[set[int], set[int]] | None:
    """(correct marks, as many random inactive tokens); None when too few inactive tokens exist."""
    right = active_marks(ex, cfg.mark_fraction)
    inactive = [i for i, a in enumerate(ex.acts) if a <= 0]
    if not right or len(inactive) < len(right):
        return None
    return right, set(rng.choice(inactive, size=len(right), replace=False).tolist())


def _yes_minus_no(judge: Judge, chats: list) -> np.ndarray:
    lp = judge.option_logprobs(chats, prompts.OPTIONS)
    return lp[:, 0] - lp[:, 1] if len(chats) else np.zeros(0)


def score(judge: Judge, latents: list[LatentExamples], explanations: list[str], cfg: AutoInterpConfig,
          rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per latent: detection and fuzzing question scores and labels, and their AUROCs."""
    det_chats, det_meta, fuzz_chats, fuzz_meta = [], [], [], []
    for i, (lx, expl) in enumerate(zip(latents, explanations)):
        for ex, label in [(e, 1) for e in lx.positives] + [(e, 0) for e in lx.negatives]:
            det_chats.append(prompts.detect_chat(expl, prompts.render(ex.tokens)))
            det_meta.append((i, label))
        for ex in lx.positives:
            pair = fuzz_pairs(ex, cfg, rng)
            for marks, label in zip(pair or (), (1, 0)):
                fuzz_chats.append(prompts.fuzz_chat(expl, prompts.render(ex.tokens, marks)))
                fuzz_meta.append((i, label))
    det, fuzz = _yes_minus_no(judge, det_chats), _yes_minus_no(judge, fuzz_chats)
    rows = []
    for i, (lx, expl) in enumerate(zip(latents, explanations)):
        d = [(s, lab) for s, (j, lab) in zip(det, det_meta) if j == i]
        f = [(s, lab) for s, (j, lab) in zip(fuzz, fuzz_meta) if j == i]
        row = {"latent": lx.latent, "density": lx.density, "explanation": expl,
               "detection_scores": [float(s) for s, _ in d], "detection_labels": [lab for _, lab in d],
               "fuzzing_scores": [float(s) for s, _ in f], "fuzzing_labels": [lab for _, lab in f]}
        row["detection_auroc"] = auroc(np.array(row["detection_scores"]), np.array(row["detection_labels"]))
        row["fuzzing_auroc"] = auroc(np.array(row["fuzzing_scores"]), np.array(row["fuzzing_labels"]))
        row["score"] = float(np.nanmean([row["detection_auroc"], row["fuzzing_auroc"]]))
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], cfg: AutoInterpConfig) -> dict[str, float]:
    """Means with bootstrap intervals over latents, and balanced accuracies at the median threshold."""
    out: dict[str, float] = {"n_latents": float(len(rows))}
    for key in ("detection_auroc", "fuzzing_auroc", "score"):
        values = np.array([r[key] for r in rows], float)
        out[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out[f"{key}_lo"], out[f"{key}_hi"] = bootstrap_ci(values, cfg.n_bootstrap, cfg.seed)
    for kind in ("detection", "fuzzing"):
        scores = np.array([s for r in rows for s in r[f"{kind}_scores"]], float)
        labels = np.array([lab for r in rows for lab in r[f"{kind}_labels"]], bool)
        out[f"{kind}_balanced_accuracy"] = (balanced_accuracy(scores, labels, float(np.median(scores)))
                                            if len(scores) else float("nan"))
    return out


# -- the whole metric -----------------------------------------------------------------------------
@dataclass(kw_only=True)
class AutoInterpReport:
    metrics: dict[str, float]
    """Flat numbers (bench/autointerp/*): scores with ``_lo``/``_hi`` intervals, control margin."""
    latents: list[dict[str, Any]]
    """Per trained latent: explanation, examples shown, question scores, AUROCs."""
    control: list[dict[str, Any]]
    """The same for the random directions (empty without the control)."""

    def details(self) -> dict[str, Any]:
        return {"latents": self.latents, "control": self.control}


def first_windows(windows: Windows, n_tokens: int | None) -> Windows:
    if n_tokens is None:
        return windows
    n = int(np.searchsorted(np.cumsum(windows.keep.sum(axis=1)), n_tokens)) + 1
    return Windows(*(a[:n] for a in windows))


def _with_examples(rows: list[dict[str, Any]], latents: list[LatentExamples], cfg: AutoInterpConfig) -> list[dict]:
    for row, lx in zip(rows, latents):
        row["shown"] = [prompts.render(e.tokens, active_marks(e, cfg.mark_fraction)) for e in lx.explain]
    return rows


def run_autointerp(sae: Any, model: Any, tokenizer: Any, hook: str, windows: Windows, *, explainer: Judge,
                   scorer: Judge, cfg: AutoInterpConfig | None = None) -> AutoInterpReport:
    """Explain and score ``cfg.n_latents`` sampled latents of ``sae`` read at ``hook`` of ``model`` on ``windows``;
    with ``cfg.control``, the same for as many random directions, and the margin between the two."""
    cfg = cfg or AutoInterpConfig()
    windows = first_windows(windows, cfg.n_tokens)
    rng = np.random.default_rng(cfg.seed)
    d_sae = int(sae.cfg.d_sae)
    features = rng.permutation(d_sae)[: min(d_sae, max(8 * cfg.n_latents, 256))]
    columns = torch.from_numpy(features)
    sae_device = next(sae.parameters()).device

    def encoder(x_ND: Tensor) -> Tensor:
        return sae.encode(x_ND.to(sae_device))[:, columns.to(sae_device)]

    d_in = int(sae.cfg.d_in)
    directions = random_directions(d_in, cfg.n_latents, cfg.seed + 1) if cfg.control else None
    tracked, proj = scan(hook_batches(model, hook, windows, cfg.batch_size), encoder, features, cfg, directions)
    text = TokenStrings(tokenizer)
    chosen = choose_latents(tracked, windows, cfg, rng, text)
    if not chosen:
        raise UserError(f"no latent fires on at least {cfg.n_explain_top + cfg.n_positives} of the "
                        f"{tracked.states.n_tokens} tokens scanned (at most {cfg.max_density:.0%}); scan more tokens")
    if len(chosen) < cfg.n_latents:
        logger.warning("only %d latents have enough examples (asked for %d)", len(chosen), cfg.n_latents)
    random_chosen: list[LatentExamples] = []
    if proj is not None:
        lat_WTR = threshold_projections(proj[:, :, : len(chosen)], windows.keep, np.array([c.density for c in chosen]))
        rtracked = track(torch.from_numpy(lat_WTR), windows.keep, np.arange(len(lat_WTR)), np.arange(len(chosen)), cfg)
        random_chosen = choose_latents(rtracked, windows, cfg, rng, text)
    everything = chosen + random_chosen
    explanations = explain(explainer, everything, cfg)
    rows = _with_examples(score(scorer, everything, explanations, cfg, rng), everything, cfg)
    trained, control = rows[: len(chosen)], rows[len(chosen) :]
    metrics = summarize(trained, cfg)
    if control:
        metrics.update(control_metrics(trained, control, cfg))
    return AutoInterpReport(metrics=metrics, latents=trained, control=control)


def control_metrics(trained: list[dict], control: list[dict], cfg: AutoInterpConfig) -> dict[str, float]:
    """The random directions' scores and the trained latents' margin over them, with intervals."""
    out = {f"control_{k}": v for k, v in summarize(control, cfg).items()}
    for key in ("score", "detection_auroc", "fuzzing_auroc"):
        a, b = np.array([r[key] for r in trained], float), np.array([r[key] for r in control], float)
        out[f"margin_{key}"] = float(np.nanmean(a) - np.nanmean(b))
        out[f"margin_{key}_lo"], out[f"margin_{key}_hi"] = difference_ci(a, b, cfg.n_bootstrap, cfg.seed)
    return out


def format_report(metrics: dict[str, float]) -> str:
    """Human-readable lines: scores with intervals, and the control's margin."""
    def ci(key: str) -> str:
        return f"{metrics[key]:.3f} [{metrics[key + '_lo']:.3f}, {metrics[key + '_hi']:.3f}]"

    lines = [f"auto-interp over {int(metrics['n_latents'])} latents: score {ci('score')}, "
             f"detection AUROC {ci('detection_auroc')}, fuzzing AUROC {ci('fuzzing_auroc')}"]
    if "margin_score" in metrics:
        lines.append(f"control ({int(metrics['control_n_latents'])} random directions): score "
                     f"{ci('control_score')}; margin {ci('margin_score')} (detection {ci('margin_detection_auroc')}, "
                     f"fuzzing {ci('margin_fuzzing_auroc')})")
    return "\n".join(lines)


# -- sae bench ------------------------------------------------------------------------------------
ENDPOINT_OPTIONS = ("explainer_url", "explainer_model", "scorer_url", "scorer_model", "api_key_env")


def judges_from_options(options: dict[str, Any], loaded: Any) -> tuple[Judge, Judge]:
    """(explainer, scorer): OpenAI-compatible endpoints when their URLs are given, else ``loaded`` locally
    (one LocalJudge for both, so its model is shared)."""
    from workflows.judges import LocalJudge, make_judge

    local = LocalJudge(loaded.model, loaded.tokenizer)
    key_env = str(options.get("api_key_env") or "OPENAI_API_KEY")
    explainer = (make_judge(options["explainer_url"], options.get("explainer_model"), local=loaded,
                            api_key_env=key_env, what="explainer") if options.get("explainer_url") else local)
    scorer = (make_judge(options["scorer_url"], options.get("scorer_model"), local=loaded, api_key_env=key_env,
                         what="scorer") if options.get("scorer_url") else local)
    return explainer, scorer


def autointerp(ctx: Any) -> Any:
    """The ``sae bench`` metric (``ctx``: workflows.bench.BenchContext): options are AutoInterpConfig's
    fields plus ENDPOINT_OPTIONS, e.g. ``--option autointerp.n_latents=32``."""
    from workflows.bench import BenchResult

    options = ctx.opts("autointerp")
    unknown = set(options) - {f.name for f in dataclasses.fields(AutoInterpConfig)} - set(ENDPOINT_OPTIONS)
    if unknown:
        raise UserError(f"unknown autointerp option(s) {sorted(unknown)}; known: "
                        f"{sorted([f.name for f in dataclasses.fields(AutoInterpConfig)] + list(ENDPOINT_OPTIONS))}")
    cfg = AutoInterpConfig.from_options(options, seed=ctx.seed)
    explainer, scorer = judges_from_options(options, ctx.loaded)
    report = run_autointerp(ctx.sae, ctx.loaded.model, ctx.loaded.tokenizer, ctx.hook, ctx.windows,
                            explainer=explainer, scorer=scorer, cfg=cfg)
    logger.info("%s", format_report(report.metrics))
    return BenchResult(metrics=report.metrics, details={**report.details(), "config": dataclasses.asdict(cfg)})


def add_autointerp_flags(parser: Any) -> None:
    """``--explainer-url/--explainer-model/--scorer-url/--scorer-model/--api-key-env/--n-latents`` on a parser."""
    group = parser.add_argument_group("auto-interp (metric autointerp)")
    group.add_argument("--explainer-url", help="OpenAI-compatible endpoint (http://host:port/v1) writing the "
                       "explanations; default: the SAE's own model, run locally")
    group.add_argument("--explainer-model", help="model name to ask the explainer endpoint for")
    group.add_argument("--scorer-url", help="OpenAI-compatible endpoint answering the scoring questions "
                       "(needs logprobs); default: the SAE's own model, run locally")
    group.add_argument("--scorer-model", help="model name to ask the scorer endpoint for")
    group.add_argument("--api-key-env", help="environment variable holding the endpoints' API key "
                       "(default OPENAI_API_KEY)")
    group.add_argument("--n-latents", type=int, help="latents explained and scored per SAE (default 16)")


def autointerp_options(args: Any) -> dict[str, Any]:
    """The options those flags set (``options["autointerp"]`` of a BenchContext)."""
    keys = (*ENDPOINT_OPTIONS, "n_latents")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
