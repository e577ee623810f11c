"""The correct-L0 diagnostic of "Sparse but Wrong" (Chanin & Garriga-Alonso 2025, arXiv:2508.16560).

The paper's finding: an SAE whose L0 is below the data's true L0 mixes correlated features into its
latents to lower its reconstruction error, and one whose L0 is above it finds degenerate solutions
that also mix features; both show up in the decoder. Its decoder-based metrics, as pure functions of
the weights and a sample of activations:

- ``decoder_cosine`` (the paper's c_dec): the mean absolute cosine similarity over all pairs of
  decoder rows, mean_{i<j} |cos(W_dec[i], W_dec[j])|. Mixed latents share directions, so it is
  smallest near the correct L0 (a U over a sweep of L0).
- ``decoder_projection`` (the paper's s_n^dec, n = d_sae // 4 by default): project N inputs (after
  subtracting b_dec) onto every unit decoder row and sort the N x d_sae values in decreasing order;
  s_n^dec is the value at index n * N, i.e. the projection that on average only n latents per input
  exceed. With n above the true L0 it measures how strongly inputs project onto latents whose feature
  is absent, which mixing raises; also smallest near the correct L0.

:func:`pick_l0` reads a sweep over L0 (one architecture and width) and returns the L0 at the metric's
minimum, refined by a parabola through its neighbours in log L0, with the bracketing interval and a
confidence. Where it fails: a minimum at either end of the sweep says only "further that way"
(confidence 0: extend the sweep); an under-trained SAE has mixed latents at every L0, which flattens
the U; TopK (a fixed k per token) on data whose number of active features varies a lot per token
places the minimum above the mean true L0 (tokens with more than k features force mixing), while
BatchTopK, JumpReLU and the penalty architectures follow the mean; with many more latents than
features, or features far from orthogonal, c_dec has a floor that hides a shallow minimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sae_core.architectures.base import SparseAutoencoder

MAX_COSINE_LATENTS = 4096
"""c_dec averages over pairs of at most this many latents (a seeded sample of wider dictionaries)."""
METRICS = ("decoder_cosine", "decoder_projection")
"""The diagnostic's metric names, as :func:`diagnostic_metrics` returns them."""


def unit_decoder_rows(sae: SparseAutoencoder) -> Tensor:
    """The decoder rows [F, D_out] at unit norm (a crosscoder's rows are its S sources concatenated)."""
    W_dec = sae.W_dec.detach().float()
    return torch.nn.functional.normalize(W_dec.reshape(W_dec.shape[0], -1), dim=1)


@torch.no_grad()
def decoder_cosine(W_dec_FD: Tensor, max_latents: int = MAX_COSINE_LATENTS, seed: int = 0) -> float:
    """c_dec: mean over pairs i < j of |cos(W_dec[i], W_dec[j])|; rows of zero norm are left out."""
    rows_FD = W_dec_FD.detach().float().reshape(W_dec_FD.shape[0], -1)
    rows_FD = rows_FD[rows_FD.norm(dim=1) > 0]
    if len(rows_FD) > max_latents:
        pick = torch.randperm(len(rows_FD), generator=torch.Generator().manual_seed(seed))[:max_latents]
        rows_FD = rows_FD[pick.to(rows_FD.device)]
    n = len(rows_FD)
    if n < 2:
        return float("nan")
    unit_FD = torch.nn.functional.normalize(rows_FD, dim=1)
    total = 0.0
    for start in range(0, n, 1024):  # [1024, F] blocks keep memory linear in F
        total += float((unit_FD[start : start + 1024] @ unit_FD.T).abs().sum())
    return (total - n) / (n * (n - 1))  # the diagonal holds n ones


@torch.no_grad()
def decoder_projection(sae: SparseAutoencoder, x_ND: Tensor, n: int | None = None,
                       scaling_factor: float = 1.0) -> float:
    """s_n^dec on inputs ``x_ND`` (raw activations; ``scaling_factor`` is the trainer's input scale):
    the (n * N)-th largest of (x * scale - b_dec) . W_dec[i] / |W_dec[i]| over all inputs and latents."""
    unit_FD = unit_decoder_rows(sae)
    n = max(1, unit_FD.shape[0] // 4) if n is None else n
    if not 0 <= n < unit_FD.shape[0]:
        raise ValueError(f"n must be in [0, d_sae={unit_FD.shape[0]}), got {n}")
    x = x_ND.to(unit_FD.device, torch.float32) * scaling_factor
    centred_ND = (x - sae.b_dec.detach().float()).reshape(len(x), -1)
    projections = (centred_ND @ unit_FD.T).flatten()
    return float(projections.kthvalue(projections.numel() - n * len(x)).values)


def diagnostic_metrics(sae: SparseAutoencoder, sample_ND: Tensor, scaling_factor: float = 1.0) -> dict[str, float]:
    """Both decoder metrics of one SAE, to log with the held-out metrics (``final/<name>``) so a sweep
    over L0 can be read by :func:`pick_l0`. ``sample_ND``: a few thousand raw held-out activations
    (a transcoder's inputs); the metrics do not depend on the activation (they read W_dec and b_dec)."""
    rows = sample_ND[:8192]
    return {"decoder_cosine": decoder_cosine(sae.W_dec),
            "decoder_projection": decoder_projection(sae, rows, scaling_factor=scaling_factor)}


@dataclass(kw_only=True)
class L0Pick:
    """The L0 a sweep's diagnostic points at."""

    l0: float
    """The picked L0: the metric's minimum, refined through its neighbours (in log L0)."""
    low: float
    """Lower end of the L0 interval the minimum lies in (the neighbouring trial's L0)."""
    high: float
    """Upper end of that interval."""
    confidence: float
    """In [0, 1]: the smaller of how far the metric rises on both sides of the minimum (as a fraction of its
    range over the sweep) and four times how far it rises at the nearer neighbour (a U sampled at equal
    steps rises a quarter of its range there); 0 when the minimum is at an end of the sweep."""
    at_edge: str | None
    """"low" or "high" when the minimum is the sweep's lowest or highest L0 (extend the sweep that way)."""
    metric: str
    """The metric read."""


def pick_l0(points: Sequence[tuple[float, float]], metric: str = "decoder_cosine") -> L0Pick | None:
    """The L0 where a sweep's diagnostic (``points``: (l0, metric value) per trial, one architecture and
    width, lower is better) is smallest; None with fewer than two finite points. Trials at the same L0
    (repeats) are averaged first."""
    by_l0: dict[float, list[float]] = {}
    for l0, value in points:
        if math.isfinite(l0) and math.isfinite(value) and l0 > 0:
            by_l0.setdefault(float(l0), []).append(float(value))
    if len(by_l0) < 2:
        return None
    xs = sorted(by_l0)
    ys = [sum(by_l0[x]) / len(by_l0[x]) for x in xs]
    best = min(range(len(xs)), key=lambda i: ys[i])
    span = max(ys) - ys[best]
    if best in (0, len(xs) - 1):
        edge = "low" if best == 0 else "high"
        neighbour = xs[1] if best == 0 else xs[-2]
        return L0Pick(l0=xs[best], low=min(xs[best], neighbour), high=max(xs[best], neighbour),
                      confidence=0.0, at_edge=edge, metric=metric)
    rise = min(max(ys[:best]), max(ys[best + 1 :])) - ys[best]
    # A parabola sampled at equal steps either side of a central minimum rises a quarter of its range at
    # the minimum's neighbours: a flatter bottom means the neighbours are nearly as good a pick.
    local = 4 * (min(ys[best - 1], ys[best + 1]) - ys[best])
    confidence = 0.0 if span <= 0 else min(1.0, rise / span, local / span)
    return L0Pick(l0=refine(xs[best - 1 : best + 2], ys[best - 1 : best + 2]), low=xs[best - 1],
                  high=xs[best + 1], confidence=confidence, at_edge=None, metric=metric)


def refine(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The vertex of the parabola through three points (x in log space), kept inside [xs[0], xs[2]]."""
    (a, b, c), (fa, fb, fc) = [math.log(x) for x in xs], ys
    denominator = (b - a) * (fb - fc) - (b - c) * (fb - fa)
    if denominator == 0:
        return xs[1]
    vertex = b - 0.5 * ((b - a) ** 2 * (fb - fc) - (b - c) ** 2 * (fb - fa)) / denominator
    return math.exp(min(max(vertex, a), c))
