"""The causal check of attribution graphs over a few prompts, and the replacement model's agreement.

Per prompt the check needs one row of the graph, not the whole graph: the direct effects of every active
feature on the model's top logit (one backward pass through the local replacement model of
workflows/circuit.py, instead of one per 32 features; with every layer of SmolLM2 covered a prompt has
thousands of active features). It zeroes the ``k`` features with the largest direct effect and compares

- *predicted*: the graph's prediction along every path: the local replacement model (attention patterns and
  norm denominators frozen at the prompt's) with every active feature responding with slope 1 (its
  activation is its pre-activation) and the ablated ones at zero. The model is linear in the features, so
  this forward pass is the sum over all of the graph's paths (``circuit.path_effect`` on the whole graph;
  a test checks the two agree);
- *measured*: the logit's change in the real model with every member spliced and each layer's error term
  (the true MLP output minus the transcoder's on the clean prompt) added back as a constant; attention,
  norms and every transcoder feature (through its activation function) live. On the clean prompt this model
  reproduces the real logits (``base_error``), so the change is the ablation's and nothing else's;
- *measured_frozen*: the same with attention and norms frozen (the local replacement model run forward):
  it differs from *predicted* only where a feature crosses its threshold.

The check passes when *measured* has the predicted sign and ``lo <= measured / predicted <= hi``. It tests
what the graph leaves out (attention and norms responding) only when the set covers every layer: an uncovered
MLP is a constant error node in the graph but responds in the live model (``covered`` says how many layers
the set holds). ``replacement_top`` is the top token of the replacement model: every member spliced and no
error terms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from workflows.attribution import direct_effects
from workflows.circuit import (
    Features,
    Prompt,
    active_features,
    graph_sources,
    linear_fn,
    spliced_logits,
    tokenize,
    transcoder_out,
)
from workflows.errors import UserError
from workflows.replacement import DecoderRunner, Trace

RATIO_RANGE = (0.5, 2.0)
"""``measured / predicted`` of a passing prompt: the predicted direction and roughly the predicted amount."""


@dataclass
class LogitRow:
    """The graph's edges into the top logit of a prompt (``prompt``, ``trace`` and ``feats`` as in an
    :class:`~workflows.circuit.Attribution`, so :func:`~workflows.circuit.spliced_logits` runs on it)."""

    prompt: Prompt
    trace: Trace
    feats: Features
    logit_id: int
    effects_F: Tensor
    """Direct effect of every active feature on the logit."""
    completeness_error: float
    """|the logit's direct effects (every source) + its bias share - the real model's logit|."""


def logit_row(runner: DecoderRunner, tokenizer: Any, members: dict[int, Any], text: str) -> LogitRow:
    prompt = tokenize(tokenizer, text)
    trace = runner.trace(prompt.ids_T)
    logit_id = int(trace.logits_TV[-1].argmax())
    feats = active_features(members, trace, prompt.keep_T)
    fn = linear_fn(runner, members, trace, feats, prompt.keep_T, torch.tensor([logit_id]))
    effects = direct_effects(lambda src: fn(src)[:, -1:], graph_sources(runner, prompt, feats), batch=1)
    T, F = len(prompt.ids_T), len(feats.act_N)
    error = float((effects.A[0].sum() + effects.bias[0] - trace.logits_TV[-1, logit_id]).abs())
    return LogitRow(prompt, trace, feats, logit_id, effects.A[0, T : T + F], error)


@torch.no_grad()
def linear_logit(runner: DecoderRunner, members: dict[int, Any], row: LogitRow, drop_N: Tensor) -> float:
    """The logit of the local replacement model with every active feature linear (its pre-activation) except
    ``drop_N``, which are zero; inactive features stay zero."""
    feats, keep = row.feats, row.prompt.keep_T

    def mlp(layer: int, m: Tensor) -> Tensor:
        if layer not in members:
            return feats.error_LTD[layer]
        tc, sel = members[layer], (feats.layer_N == layer) & ~drop_N
        pre = tc.pre_acts(m)
        acts = torch.zeros_like(pre)
        acts[:, feats.pos_N[sel], feats.feature_N[sel]] = pre[:, feats.pos_N[sel], feats.feature_N[sel]]
        return transcoder_out(tc, m, acts, keep) + feats.error_LTD[layer]

    logits = runner.run(runner.embed(row.prompt.ids_T), mlp=mlp, frozen=row.trace, last=True)
    return float(logits[0, -1, row.logit_id])


def predicted_change(runner: DecoderRunner, members: dict[int, Any], row: LogitRow, ablate: Tensor) -> float:
    """The graph's prediction along every path for zeroing the ``ablate`` features (see the module docstring)."""
    drop = torch.zeros(len(row.feats.act_N), dtype=torch.bool)
    drop[ablate] = True
    clean = linear_logit(runner, members, row, torch.zeros_like(drop))
    return linear_logit(runner, members, row, drop) - clean


@dataclass(kw_only=True)
class PromptCheck:
    """One prompt's row of the check (the module docstring defines the columns)."""

    prompt: str
    covered: str
    """Layers the set covers, of the model's (``30/30``)."""
    model_top: str
    replacement_top: str
    top_token_agrees: bool
    features_active: int
    completeness_error: float
    base_error: float
    """Max |logit difference| between the spliced model with errors held and the real model, clean prompt."""
    ablated: list[str]
    predicted_direct: float
    """Minus the ablated features' direct effects alone."""
    predicted: float
    measured_frozen: float
    measured: float
    ratio: float
    passes: bool


def agrees(predicted: float, measured: float, ratio_range: tuple[float, float] = RATIO_RANGE) -> bool:
    """The predicted direction and roughly the predicted amount: ``measured / predicted`` in the range."""
    lo, hi = ratio_range
    return predicted != 0 and lo <= measured / predicted <= hi


@torch.no_grad()
def check_prompt(
    runner: DecoderRunner,
    tokenizer: Any,
    members: dict[int, Any],
    prompt: str,
    *,
    k: int = 5,
    below: int | None = None,
    ratio_range: tuple[float, float] = RATIO_RANGE,
) -> PromptCheck:
    """``below``: rank only features of layers below it (the last layer's features reach the logit through the
    final norm alone, so ablating them tests little of the graph)."""
    with torch.enable_grad():
        row = logit_row(runner, tokenizer, members, prompt)
    effects = (
        row.effects_F.masked_fill(row.feats.layer_N >= below, 0.0) if below is not None else row.effects_F
    )
    top = torch.argsort(effects, descending=True)[:k]
    top = top[effects[top] > 0]
    if len(top) == 0:
        raise UserError(f"no feature has a positive direct effect on the top logit of {prompt!r}")
    real = row.trace.logits_TV[-1]
    base = spliced_logits(runner, members, row)
    base_frozen = spliced_logits(runner, members, row, frozen=True)
    ablated = spliced_logits(runner, members, row, ablate=top)
    ablated_frozen = spliced_logits(runner, members, row, ablate=top, frozen=True)
    replacement = spliced_logits(runner, members, row, with_errors=False)
    predicted = predicted_change(runner, members, row, top)
    measured = float(ablated[row.logit_id] - base[row.logit_id])
    f = row.feats
    return PromptCheck(
        prompt=prompt,
        covered=f"{len(members)}/{runner.n_layers}",
        model_top=tokenizer.decode([row.logit_id]),
        replacement_top=tokenizer.decode([int(replacement.argmax())]),
        top_token_agrees=int(replacement.argmax()) == row.logit_id,
        features_active=len(f.act_N),
        completeness_error=row.completeness_error,
        base_error=float((base - real).abs().max()),
        ablated=[f"F_{int(f.layer_N[i])}_{int(f.pos_N[i])}_{int(f.feature_N[i])}" for i in top],
        predicted_direct=-float(row.effects_F[top].sum()),
        predicted=predicted,
        measured_frozen=float(ablated_frozen[row.logit_id] - base_frozen[row.logit_id]),
        measured=measured,
        ratio=measured / predicted if predicted else float("nan"),
        passes=agrees(predicted, measured, ratio_range),
    )


def check_prompts(
    runner: DecoderRunner,
    tokenizer: Any,
    members: dict[int, Any],
    prompts: list[str],
    *,
    k: int = 5,
    below: int | None = None,
) -> list[PromptCheck]:
    return [check_prompt(runner, tokenizer, members, p, k=k, below=below) for p in prompts]


def markdown_table(rows: list[PromptCheck]) -> str:
    head = (
        "| prompt | model's top | replacement's | features | completeness | ablated (layers) | predicted | frozen "
        "| measured | measured/predicted | passes |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r.prompt} | {r.model_top!r} | {r.replacement_top!r} | {r.features_active} | "
        f"{r.completeness_error:.1e} | {ablated_layers(r)} | {r.predicted:+.3f} | {r.measured_frozen:+.3f} | "
        f"{r.measured:+.3f} | {r.ratio:.2f} | {'yes' if r.passes else 'no'} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def ablated_layers(row: PromptCheck) -> str:
    return ",".join(sorted({name.split("_")[1] for name in row.ablated}, key=int))


def as_dicts(rows: list[PromptCheck]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
