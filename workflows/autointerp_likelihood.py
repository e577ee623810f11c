"""Likelihood scoring of auto-interp explanations: how much the explanation helps an LM predict the text.

For a held-out example (a token context) and a latent's explanation, the scorer LM reads
``PREFIX`` with the explanation, then the example's tokens; the **lift** of a token is its log-probability
there minus its log-probability after the same prefix with a neutral description (``NEUTRAL``). An
explanation that says what the latent responds to makes the tokens it names or implies more likely, so:

- **detection**: an example's score is its largest token lift; AUROC of the firing examples against the
  contexts where the latent fires nowhere;
- **fuzzing**: a firing example's score for a set of tokens is their mean lift; AUROC of the tokens where
  the latent is active against as many random inactive tokens of the same example.

The LM never sees activations: it reads the explanation and the plain text, and the scores only compare
its likelihoods with where the latent fires. This is EleutherAI delphi's surprisal scorer (loss of the
examples given the explanation against a generic one) brought down to tokens; a small LM that answers
Yes/No questions at chance (SmolLM2-135M) still predicts text well, which is all this asks of it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from workflows.autointerp_examples import AutoInterpConfig, Example, LatentExamples, fuzz_pairs
from workflows.corpus import Windows
from workflows.errors import UserError

PREFIX = "Description of a text feature: {explanation}\nA text snippet where the feature appears:\n"
NEUTRAL = "any text"


class LikelihoodJudge(Protocol):
    tokenizer: Any

    def continuation_logprobs(self, prefix: list[int], texts: list[list[int]]) -> list[np.ndarray]: ...


def example_ids(windows: Windows, ex: Example) -> list[int]:
    """The token ids of an example's context (its tokens are the window's, from ``position - peak``)."""
    start = ex.position - ex.peak
    return windows.token_ids[ex.window, start : start + len(ex.tokens)].astype(np.int64).tolist()


def _prefix_ids(judge: LikelihoodJudge, explanation: str) -> list[int]:
    return list(judge.tokenizer(PREFIX.format(explanation=explanation), add_special_tokens=False).input_ids)


def token_lifts(
    judge: LikelihoodJudge, explanations: list[str], texts: list[list[list[int]]]
) -> list[list[np.ndarray]]:
    """Per explanation i and text j of ``texts[i]``: the per-token lift of that explanation over NEUTRAL."""
    if not hasattr(judge, "continuation_logprobs"):
        raise UserError(
            "likelihood scoring needs the scorer model's token log-probabilities, which a chat endpoint "
            "does not return; score with scoring='questions' or a local scorer model"
        )
    flat = [t for group in texts for t in group]
    neutral = iter(judge.continuation_logprobs(_prefix_ids(judge, NEUTRAL), flat))
    base = [[next(neutral) for _ in group] for group in texts]
    return [
        [
            lp - b
            for lp, b in zip(judge.continuation_logprobs(_prefix_ids(judge, e), group), bases, strict=True)
        ]
        for e, group, bases in zip(explanations, texts, base, strict=True)
    ]


def likelihood_questions(
    judge: LikelihoodJudge,
    latents: list[LatentExamples],
    explanations: list[str],
    windows: Windows,
    cfg: AutoInterpConfig,
    rng: np.random.Generator,
) -> list[dict[str, list]]:
    """Per latent: detection and fuzzing scores and labels (see the module docstring)."""
    texts = [[example_ids(windows, e) for e in lx.positives + lx.negatives] for lx in latents]
    rows = []
    for lx, lifts in zip(latents, token_lifts(judge, explanations, texts), strict=True):
        labels = [1] * len(lx.positives) + [0] * len(lx.negatives)
        fuzz_scores, fuzz_labels = [], []
        for ex, lift in zip(lx.positives, lifts, strict=False):
            for marks, label in zip(fuzz_pairs(ex, cfg, rng) or (), (1, 0), strict=False):
                fuzz_scores.append(float(np.mean(lift[sorted(marks)])))
                fuzz_labels.append(label)
        rows.append(
            {
                "detection_scores": [float(lift.max()) for lift in lifts],
                "detection_labels": labels,
                "fuzzing_scores": fuzz_scores,
                "fuzzing_labels": fuzz_labels,
            }
        )
    return rows
