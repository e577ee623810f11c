"""Pieces several architectures share, written once: groups of config fields with their validation,
the AuxK width rule, the running inference threshold, and the JumpReLU threshold's save form.

An architecture file mixes the field groups into its config (``class TopKConfig(KSparsityFields,
SAEConfig)``); each group validates its own fields after the base config's ``__post_init__``.
This module registers nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_core import kernels
from sae_core.architectures.base import Reducer
from sae_core.config import require


@dataclass(kw_only=True)
class KSparsityFields:
    """Fields of the TopK family: k latents per token (exactly, or on average over a batch) and AuxK."""

    k: int = 32
    """Latents active per token (on average over the batch for batch-wise rules)."""
    aux_k: int | None = None
    """Dead latents the AuxK loss may use per token; None means half the output width."""
    aux_coefficient: float = 1.0 / 32
    """Weight of the AuxK loss on dead latents (Gao et al. use 1/32)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        d_sae = self.d_sae  # type: ignore[attr-defined]
        require(isinstance(self.k, int) and 1 <= self.k <= d_sae, f"k must be in [1, d_sae={d_sae}], got {self.k}")
        require(self.aux_k is None or self.aux_k >= 1, f"aux_k must be >= 1, got {self.aux_k}")
        require(self.aux_coefficient >= 0, f"aux_coefficient must be >= 0, got {self.aux_coefficient}")

    def aux_k_for(self, width: int) -> int:
        """The AuxK budget for an output of ``width`` features."""
        return self.aux_k or max(width // 2, 1)


@dataclass(kw_only=True)
class ThresholdEMAFields:
    """The running estimate of an inference threshold learned from batch-wise selection."""

    threshold_momentum: float = 0.99
    """EMA momentum of the inference threshold: t <- m*t + (1-m)*estimate (the first step sets t)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        m = self.threshold_momentum
        require(0 <= m < 1, f"threshold_momentum must be in [0, 1), got {m}")


@dataclass(kw_only=True)
class JumpReLUFields:
    """JumpReLU's learned per-latent thresholds and their L0 penalty (see jumprelu.py)."""

    l0_coefficient: float = 5e-3
    """Weight of the L0 penalty mean_b sum_i H(h_bi - theta_i) (the paper's lambda)."""
    bandwidth: float = 0.05
    """Width eps of the rectangle kernel of the straight-through estimators, in pre-activation units."""
    init_threshold: float = 0.1
    """Initial threshold of every latent (with ``target_l0`` set, each starts at the target instead: l0.py)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        require(self.l0_coefficient >= 0, f"l0_coefficient must be >= 0, got {self.l0_coefficient}")
        require(self.bandwidth > 0, f"bandwidth must be > 0, got {self.bandwidth}")
        require(self.init_threshold > 0, f"init_threshold must be > 0, got {self.init_threshold}")


SPARSE_PATH_MAX_FRACTION = 0.04
"""A variable-L0 architecture trains on the sparse path while its batch's active fraction (mean active
latents per row / d_sae) is at most this. An estimate, not a timed crossover: the sparse path does about
4 x B x L0 x D multiply-adds in the sparse kernels (4.7 G/s in a quiet profile of the TopK step on the
2-core CPU), the dense one 5 more GEMMs of B x F x D (160 G/s), so they cost about the same at
L0 / F = (5/4) x 4.7 / 160."""
PADDING_SLOT_COST = 0.1
"""What a padding slot of the sparse layout (B x the widest row's count) costs next to an active entry: the
kernels skip it after an index check, but the [B, K] element-wise passes (selection, activation, penalty)
still read it. It weighs the widest row into the fraction, so one dense row (or a few) cannot put a
batch whose mean is low on a layout as large as the dense one."""
DENSITY_SAMPLE_ROWS = 256


class PathChoice:
    """The sparse or the dense training path for an architecture whose number of active latents varies
    (ReLU, JumpReLU, Gated), chosen per step from the previous step's active fraction, measured on the
    selection itself (sparse) or a sample of rows (dense). Starts dense, so the first step measures."""

    def __init__(self) -> None:
        self.fraction = 1.0
        """The previous step's cost share: max(mean active latents per row, PADDING_SLOT_COST x the widest
        row's) / d_sae."""

    def sparse(self) -> bool:
        return self.fraction <= SPARSE_PATH_MAX_FRACTION

    def entries_above(self, h_BF: Tensor, threshold: Tensor | float) -> Tensor:
        """The padded idx_BK of the entries of ``h_BF`` above ``threshold`` (and the measurement for the next
        step)."""
        idx_BK, counts_B = kernels.select_above(h_BF, threshold)
        mean = float(counts_B.sum()) / max(h_BF.shape[0], 1)
        self.fraction = max(mean, PADDING_SLOT_COST * idx_BK.shape[1]) / h_BF.shape[1]
        return idx_BK

    @torch.no_grad()
    def observe(self, latents_BF: Tensor) -> None:
        """Measure a dense step on a sample of its rows (a fraction of one pass over [B, F])."""
        counts_B = (latents_BF[:DENSITY_SAMPLE_ROWS] != 0).float().sum(dim=1)
        if len(counts_B) == 0:
            self.fraction = 1.0
            return
        mean, widest = torch.stack([counts_B.mean(), counts_B.max()]).tolist()
        self.fraction = max(mean, PADDING_SLOT_COST * widest) / latents_BF.shape[1]


@dataclass(kw_only=True)
class L1Fields:
    """The decoder-norm-weighted L1 penalty of ReLU-style latents (relu.py's convention and scale)."""

    l1_coefficient: float = 1.0
    """Weight of the decoder-norm-weighted L1 penalty (relu.py gives the scale); with ``target_l0`` set,
    the starting value the trainer's controller scales."""

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        require(self.l1_coefficient >= 0, f"l1_coefficient must be >= 0, got {self.l1_coefficient}")


def require_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    require(value in choices, f"{name} must be one of {choices}, got {value!r}")


@torch.no_grad()
def update_threshold_ema(threshold_F: Tensor, estimate: Tensor | None, momentum: float, reduce: Reducer) -> None:
    """Fold this step's threshold estimate (the minimum over data-parallel ranks) into ``threshold_F``.

    Every rank calls ``reduce`` even without an estimate (it passes +inf), so collectives stay matched.
    A non-positive or non-finite result leaves the threshold as it is; the first usable one sets it.
    Decided on the device (no host sync): this runs every training step.
    """
    value = estimate.float() if estimate is not None else torch.tensor(float("inf"), device=threshold_F.device)
    value = reduce(value.to(threshold_F.device), "min")
    usable = torch.isfinite(value) & (value > 0)
    first = (threshold_F == 0).all()
    updated_F = torch.where(first, value, threshold_F * momentum + (1 - momentum) * value)
    threshold_F.copy_(torch.where(usable, updated_F, threshold_F))


def log_threshold_to_saved(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens stores JumpReLU's threshold itself: ``log_threshold`` -> ``threshold``."""
    tensors = dict(tensors)
    if "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    return tensors


def saved_to_log_threshold(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`log_threshold_to_saved`; a zero threshold (plain ReLU) becomes the smallest
    positive one."""
    tensors = dict(tensors)
    if "threshold" in tensors:
        tiny = torch.finfo(torch.float32).tiny
        tensors["log_threshold"] = tensors.pop("threshold").float().clamp_min(tiny).log()
    return tensors
