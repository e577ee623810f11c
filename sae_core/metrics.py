"""Metrics as pure functions of tensors, and the running sums the trainer logs from."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from sae_core.architectures.base import Reducer, SAEOutput

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


class RunningMetrics:
    """Sums of a logging window's metrics, kept on the device and read (one reduce, one host sync) only
    when a row is logged: the loss terms averaged over steps and ranks, l0 and fvu over every row seen.
    fvu is the window's squared error over the targets' variance around the window's mean."""

    TERMS = ("loss", "mse", "sparsity", "aux", "fired", "rows", "sq_err", "sq_sum")

    def __init__(self) -> None:
        self.sums: Tensor | None = None
        self.steps = 0
        self.started = time.perf_counter()

    def begin_step(self) -> None:
        """Start the window's clock at its first step (not when the previous row was logged)."""
        if self.steps == 0:
            self.started = time.perf_counter()

    @torch.no_grad()
    def add(self, loss: Tensor, out: SAEOutput, target: Tensor) -> None:
        y = target.detach().float()
        scalars = torch.stack([loss.detach().float(), out.mse.detach().float(), out.sparsity.detach().float(),
                               out.aux.detach().float(), out.fire_counts().sum().float(), y.new_tensor(float(len(y))),
                               (out.x_hat_BD.detach().float() - y).pow(2).sum(), y.pow(2).sum()])
        # The per-feature sums give the window's mean, for the variance in fvu.
        step_sums = torch.cat([scalars, y.sum(dim=0).flatten()]).double()
        self.sums = step_sums if self.sums is None else self.sums.add_(step_sums)
        self.steps += 1

    def row(self, reduce: Reducer, world_size: int) -> dict[str, float]:
        """The window's metrics (every rank must call this: it reduces), then start a new window."""
        totals = reduce(self.sums, "sum").tolist()
        named = dict(zip(self.TERMS, totals, strict=False))
        feature_sums = torch.tensor(totals[len(self.TERMS):], dtype=torch.float64)
        rows, n = named["rows"], self.steps * world_size
        variance = named["sq_sum"] - float(feature_sums.pow(2).sum()) / max(rows, 1.0)
        row = {name: named[name] / n for name in ("loss", "mse", "sparsity", "aux")}
        row.update(l0=named["fired"] / max(rows, 1.0), fvu=named["sq_err"] / max(variance, 1e-12),
                   tokens_per_s=rows / max(time.perf_counter() - self.started, 1e-9))
        self.sums, self.steps = None, 0
        return row
