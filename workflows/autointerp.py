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
   (are these tokens the active ones? the active tokens of each positive against as many random inactive
   ones). ``cfg.scoring`` picks the scorer's task: ``likelihood`` (workflows/autointerp_likelihood.py: how
   much the explanation raises the scorer LM's log-probability of the example's tokens) or ``questions``
   (Yes/No; a question's score is log P(Yes) - log P(No) of the first answer token, fuzzing shows the
   tokens marked). Per latent, AUROC of positives against the others (threshold-free, so the judge's bias
   cancels). Balanced accuracy uses the median score of all that SAE's questions as the threshold.
   ``score`` is the mean of the two AUROCs. Intervals: 95% percentile bootstrap over latents.
4. **Control**: the same number of random unit directions in activation space, each thresholded at the
   quantile that gives it the firing density of one of the chosen latents, go through the same steps on
   the same windows. A pipeline that measures something scores trained latents above them; the margin
   is the difference of mean scores, with a bootstrap interval. With ``cfg.shuffled`` the trained latents
   are scored again with each other's explanations: a scorer that reads the explanation drops to chance.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workflows import autointerp_prompts as prompts
from workflows.autointerp_examples import (
    SCORINGS,
    AutoInterpConfig,
    LatentExamples,
    TokenStrings,
    active_marks,
    choose_latents,
    fuzz_pairs,
    hook_batches,
    random_directions,
    scan,
    threshold_projections,
    track,
)
from workflows.autointerp_likelihood import likelihood_questions
from workflows.autointerp_stats import auroc, balanced_accuracy, bootstrap_ci, difference_ci
from workflows.corpus import Windows
from workflows.errors import UserError
from workflows.judges import Judge

__all__ = [
    "AutoInterpConfig",
    "TokenStrings",
    "choose_latents",
    "hook_batches",
    "scan",
    "run_autointerp",
    "autointerp",
]

logger = logging.getLogger(__name__)


# -- explaining and scoring -----------------------------------------------------------------------
def explain(judge: Judge, latents: list[LatentExamples], cfg: AutoInterpConfig) -> list[str]:
    chats = [
        prompts.explain_chat(
            [prompts.render(e.tokens, active_marks(e, cfg.mark_fraction)) for e in lx.explain]
        )
        for lx in latents
    ]
    return [prompts.clean_explanation(t) for t in judge.generate(chats, cfg.max_new_tokens)]


def _yes_minus_no(judge: Judge, chats: list) -> np.ndarray:
    lp = judge.option_logprobs(chats, prompts.OPTIONS)
    return lp[:, 0] - lp[:, 1] if len(chats) else np.zeros(0)


def question_scores(
    judge: Judge,
    latents: list[LatentExamples],
    explanations: list[str],
    cfg: AutoInterpConfig,
    rng: np.random.Generator,
) -> list[dict[str, list]]:
    """Per latent: the Yes/No detection and fuzzing questions' scores and labels."""
    det_chats, det_meta, fuzz_chats, fuzz_meta = [], [], [], []
    for i, (lx, expl) in enumerate(zip(latents, explanations, strict=True)):
        for ex, label in [(e, 1) for e in lx.positives] + [(e, 0) for e in lx.negatives]:
            det_chats.append(prompts.detect_chat(expl, prompts.render(ex.tokens)))
            det_meta.append((i, label))
        for ex in lx.positives:
            pair = fuzz_pairs(ex, cfg, rng)
            for marks, label in zip(pair or (), (1, 0), strict=False):
                fuzz_chats.append(prompts.fuzz_chat(expl, prompts.render(ex.tokens, marks)))
                fuzz_meta.append((i, label))
    det, fuzz = _yes_minus_no(judge, det_chats), _yes_minus_no(judge, fuzz_chats)
    rows = []
    for i in range(len(latents)):
        d = [(float(s), lab) for s, (j, lab) in zip(det, det_meta, strict=True) if j == i]
        f = [(float(s), lab) for s, (j, lab) in zip(fuzz, fuzz_meta, strict=True) if j == i]
        rows.append(
            {
                "detection_scores": [s for s, _ in d],
                "detection_labels": [lab for _, lab in d],
                "fuzzing_scores": [s for s, _ in f],
                "fuzzing_labels": [lab for _, lab in f],
            }
        )
    return rows


def resolve_scoring(cfg: AutoInterpConfig, scorer: Judge) -> str:
    """``likelihood`` or ``questions``: ``auto`` is likelihood when the scorer exposes token log-probs."""
    if cfg.scoring != "auto":
        return cfg.scoring
    return "likelihood" if hasattr(scorer, "continuation_logprobs") else "questions"


def score(
    judge: Judge,
    latents: list[LatentExamples],
    explanations: list[str],
    windows: Windows,
    cfg: AutoInterpConfig,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Per latent: detection and fuzzing scores and labels, and their AUROCs (``cfg.scoring`` picks how)."""
    if resolve_scoring(cfg, judge) == "likelihood":
        parts = likelihood_questions(judge, latents, explanations, windows, cfg, rng)
    else:
        parts = question_scores(judge, latents, explanations, cfg, rng)
    rows = []
    for lx, expl, part in zip(latents, explanations, parts, strict=True):
        row = {"latent": lx.latent, "density": lx.density, "explanation": expl, **part}
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
        out[f"{kind}_balanced_accuracy"] = (
            balanced_accuracy(scores, labels, float(np.median(scores))) if len(scores) else float("nan")
        )
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


def _with_examples(
    rows: list[dict[str, Any]], latents: list[LatentExamples], cfg: AutoInterpConfig
) -> list[dict]:
    for row, lx in zip(rows, latents, strict=True):
        row["shown"] = [prompts.render(e.tokens, active_marks(e, cfg.mark_fraction)) for e in lx.explain]
    return rows


def run_autointerp(
    sae: Any,
    model: Any,
    tokenizer: Any,
    hook: str,
    windows: Windows,
    *,
    explainer: Judge,
    scorer: Judge,
    cfg: AutoInterpConfig | None = None,
) -> AutoInterpReport:
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
    tracked, proj = scan(
        hook_batches(model, hook, windows, cfg.batch_size), encoder, features, cfg, directions
    )
    text = TokenStrings(tokenizer)
    chosen = choose_latents(tracked, windows, cfg, rng, text)
    if not chosen:
        raise UserError(
            f"no latent fires on at least {cfg.n_explain_top + cfg.n_positives} of the "
            f"{tracked.states.n_tokens} tokens scanned (at most {cfg.max_density:.0%}); scan more tokens"
        )
    if len(chosen) < cfg.n_latents:
        logger.warning("only %d latents have enough examples (asked for %d)", len(chosen), cfg.n_latents)
    random_chosen: list[LatentExamples] = []
    if proj is not None:
        lat_WTR = threshold_projections(
            proj[:, :, : len(chosen)], windows.keep, np.array([c.density for c in chosen])
        )
        rtracked = track(
            torch.from_numpy(lat_WTR), windows.keep, np.arange(len(lat_WTR)), np.arange(len(chosen)), cfg
        )
        random_chosen = choose_latents(rtracked, windows, cfg, rng, text)
    everything = chosen + random_chosen
    explanations = explain(explainer, everything, cfg)
    rows = _with_examples(score(scorer, everything, explanations, windows, cfg, rng), everything, cfg)
    trained, control = rows[: len(chosen)], rows[len(chosen) :]
    metrics = {
        **summarize(trained, cfg),
        "scoring_likelihood": float(resolve_scoring(cfg, scorer) == "likelihood"),
    }
    if control:
        metrics.update(control_metrics(trained, control, cfg))
    if cfg.shuffled and len(chosen) > 1:
        metrics.update(
            shuffled_metrics(scorer, chosen, explanations[: len(chosen)], trained, windows, cfg, rng)
        )
    return AutoInterpReport(metrics=metrics, latents=trained, control=control)


def shuffled_metrics(
    scorer: Judge,
    chosen: list[LatentExamples],
    explanations: list[str],
    trained: list[dict],
    windows: Windows,
    cfg: AutoInterpConfig,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Each latent's examples scored with the next latent's explanation: what the scorer gets without it."""
    shuffled = score(scorer, chosen, explanations[1:] + explanations[:1], windows, cfg, rng)
    return control_metrics(trained, shuffled, cfg, prefix="shuffled")


def control_metrics(
    trained: list[dict], control: list[dict], cfg: AutoInterpConfig, prefix: str = "control"
) -> dict[str, float]:
    """The ``control`` rows' scores as ``{prefix}_*`` and the trained latents' margin over them (``margin_*``
    for the random directions, ``{prefix}_margin_*`` otherwise), with intervals."""
    out = {f"{prefix}_{k}": v for k, v in summarize(control, cfg).items()}
    margin = "margin" if prefix == "control" else f"{prefix}_margin"
    for key in ("score", "detection_auroc", "fuzzing_auroc"):
        a, b = np.array([r[key] for r in trained], float), np.array([r[key] for r in control], float)
        out[f"{margin}_{key}"] = float(np.nanmean(a) - np.nanmean(b))
        out[f"{margin}_{key}_lo"], out[f"{margin}_{key}_hi"] = difference_ci(a, b, cfg.n_bootstrap, cfg.seed)
    return out


def format_report(metrics: dict[str, float]) -> str:
    """Human-readable lines: scores with intervals, and the control's margin."""

    def ci(key: str) -> str:
        return f"{metrics[key]:.3f} [{metrics[key + '_lo']:.3f}, {metrics[key + '_hi']:.3f}]"

    how = "likelihood" if metrics.get("scoring_likelihood") else "questions"
    lines = [
        f"auto-interp ({how} scoring) over {int(metrics['n_latents'])} latents: score {ci('score')}, "
        f"detection AUROC {ci('detection_auroc')}, fuzzing AUROC {ci('fuzzing_auroc')}"
    ]
    if "margin_score" in metrics:
        lines.append(
            f"control ({int(metrics['control_n_latents'])} random directions): score "
            f"{ci('control_score')}; margin {ci('margin_score')} (detection {ci('margin_detection_auroc')}, "
            f"fuzzing {ci('margin_fuzzing_auroc')})"
        )
    if "shuffled_margin_score" in metrics:
        lines.append(
            f"shuffled explanations (each latent scored with another's): score {ci('shuffled_score')}; "
            f"margin {ci('shuffled_margin_score')}"
        )
    return "\n".join(lines)


# -- sae bench ------------------------------------------------------------------------------------
ENDPOINT_OPTIONS = ("explainer_url", "explainer_model", "scorer_url", "scorer_model", "api_key_env")


def judges_from_options(options: dict[str, Any], loaded: Any) -> tuple[Judge, Judge]:
    """(explainer, scorer): OpenAI-compatible endpoints when their URLs are given, else ``loaded`` locally
    (one LocalJudge for both, so its model is shared)."""
    from workflows.judges import LocalJudge, make_judge

    local = LocalJudge(loaded.model, loaded.tokenizer)
    key_env = str(options.get("api_key_env") or "OPENAI_API_KEY")

    def judge(who: str) -> Judge:
        url = options.get(f"{who}_url")
        if not url:
            return local
        return make_judge(url, options.get(f"{who}_model"), local=loaded, api_key_env=key_env, what=who)

    return judge("explainer"), judge("scorer")


def autointerp(ctx: Any) -> Any:
    """The ``sae bench`` metric (``ctx``: workflows.bench.BenchContext): options are AutoInterpConfig's
    fields plus ENDPOINT_OPTIONS, e.g. ``--option autointerp.n_latents=32``."""
    from workflows.bench import BenchResult

    options = ctx.opts("autointerp")
    unknown = set(options) - {f.name for f in dataclasses.fields(AutoInterpConfig)} - set(ENDPOINT_OPTIONS)
    if unknown:
        raise UserError(
            f"unknown autointerp option(s) {sorted(unknown)}; known: "
            f"{sorted([f.name for f in dataclasses.fields(AutoInterpConfig)] + list(ENDPOINT_OPTIONS))}"
        )
    cfg = AutoInterpConfig.from_options(options, seed=ctx.seed)
    explainer, scorer = judges_from_options(options, ctx.loaded)
    report = run_autointerp(
        ctx.sae,
        ctx.loaded.model,
        ctx.loaded.tokenizer,
        ctx.hook,
        ctx.windows,
        explainer=explainer,
        scorer=scorer,
        cfg=cfg,
    )
    logger.info("%s", format_report(report.metrics))
    return BenchResult(
        metrics=report.metrics, details={**report.details(), "config": dataclasses.asdict(cfg)}
    )


def add_autointerp_flags(parser: Any) -> None:
    """``--explainer-url/--explainer-model/--scorer-url/--scorer-model/--api-key-env/--n-latents`` on a parser."""
    group = parser.add_argument_group("auto-interp (metric autointerp)")
    group.add_argument(
        "--explainer-url",
        help="OpenAI-compatible endpoint (http://host:port/v1) writing the "
        "explanations; default: the SAE's own model, run locally",
    )
    group.add_argument("--explainer-model", help="model name to ask the explainer endpoint for")
    group.add_argument(
        "--scorer-url",
        help="OpenAI-compatible endpoint answering the scoring questions "
        "(needs logprobs); default: the SAE's own model, run locally",
    )
    group.add_argument("--scorer-model", help="model name to ask the scorer endpoint for")
    group.add_argument(
        "--api-key-env", help="environment variable holding the endpoints' API key (default OPENAI_API_KEY)"
    )
    group.add_argument("--n-latents", type=int, help="latents explained and scored per SAE (default 16)")
    group.add_argument(
        "--scoring",
        choices=SCORINGS,
        help="likelihood (the explanation's lift of the scorer's token log-probs; local scorer), questions "
        "(Yes/No; any judge) or auto (default: likelihood for a local scorer, questions for an endpoint)",
    )


def autointerp_options(args: Any) -> dict[str, Any]:
    """The options those flags set (``options["autointerp"]`` of a BenchContext)."""
    keys = (*ENDPOINT_OPTIONS, "n_latents", "scoring")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
