"""Metrics as pure functions of tensors."""

from __future__ import annotations

import torch
from torch import Tensor

# A latent firing on more than this fraction of tokens is "dense" (usually uninterpretable).
DENSE_THRESHOLD = 0.1


def l0(latents_BF: Tensor) -> Tensor:
    """Mean number of non-zero latents per row."""
    return (latents_BF != 0).float().sum(dim=-1).mean()


def mse(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
    """Mean over elements of the squared error."""
    return (x_hat_BD.float() - x_BD.float()).pow(2).mean()


def fvu(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
    """Fraction of variance unexplained: squared error over the total variance around the batch mean."""
    x = x_BD.float()
    residual = (x - x_hat_BD.float()).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return residual / total.clamp_min(1e-12)


def variance_explained(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
    return 1.0 - fvu(x_hat_BD, x_BD)


def firing_frequency(fire_counts_F: Tensor, n_tokens: int) -> Tensor:
    return fire_counts_F.double() / max(n_tokens, 1)


def dead_fraction(fire_counts_F: Tensor) -> Tensor:
    """Fraction of latents that never fired on the tokens counted."""
    return (fire_counts_F == 0).float().mean()


def dense_fraction(frequency_F: Tensor, threshold: float = DENSE_THRESHOLD) -> Tensor:
    return (frequency_F > threshold).float().mean()


def log_density(frequency_F: Tensor, eps: float = 1e-10) -> Tensor:
    """log10(frequency + eps), SAELens's ``sparsity`` tensor."""
    return torch.log10(frequency_F.double() + eps).float()


def density_histogram(frequency_F: Tensor, bins: int = 50, lo: float = -10.0, hi: float = 0.0) -> tuple[Tensor, Tensor]:
    """Histogram of log10 firing frequency: (counts [bins], edges [bins + 1])."""
    values = log_density(frequency_F).clamp(lo, hi)
    counts = torch.histc(values, bins=bins, min=lo, max=hi)
    return counts, torch.linspace(lo, hi, bins + 1)


def mmcs(learned_FD: Tensor, true_ND: Tensor) -> Tensor:
    """Mean max cosine similarity: for each ground-truth direction, its best cosine with a learned one."""
    learned = torch.nn.functional.normalize(learned_FD.float(), dim=1)
    true = torch.nn.functional.normalize(true_ND.float(), dim=1)
    return (true @ learned.T).max(dim=1).values.mean()
