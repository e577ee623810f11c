"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"): f = h * H(h - theta) with a learned
per-latent threshold theta = exp(log_threshold), trained on an L0 penalty through straight-through
estimators with a rectangle-kernel pseudo-derivative of width ``bandwidth``:

    d/dtheta [h H(h - theta)] := -(theta / eps) K((h - theta) / eps)
    d/dtheta  H(h - theta)    := -(1 / eps)     K((h - theta) / eps),   K(u) = 1[|u| < 1/2]

(the gradients with respect to h are the ordinary ones: H(h - theta) and 0).

Units: with inputs scaled to E||x||^2 = d_in and mean-over-elements MSE, our MSE is the fraction of
the input's energy left unexplained, the same quantity as the paper's summed squared error on inputs
scaled to E||x||^2 = 1, so ``l0_coefficient`` is the paper's lambda. Pre-activations are sqrt(d_in)
times larger than theirs, so ``bandwidth`` and ``init_threshold`` are too.

Optional pre-activation loss (Anthropic, "Circuits Updates", January 2025):
``pre_act_loss_coefficient * mean_b sum_{i dead} relu(theta_i - h_bi) * ||W_dec_i|| / d_in``, applied to
the latents the trainer reports dead, pulling their pre-activations (and thresholds) toward firing.
Anthropic apply it to every latent with a tiny coefficient; restricting it to dead latents leaves
live latents' trade-off untouched. It goes into ``aux``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sae_core import kernels
from sae_core.architectures.base import (
    ActiveLatents,
    Reducer,
    SAEConfig,
    SAEOutput,
    SparseAutoencoder,
    mse_loss,
    no_reduce,
    require,
)
from sae_core.architectures.common import (
    JumpReLUFields,
    PathChoice,
    log_threshold_to_saved,
    saved_to_log_threshold,
)
from sae_core.l0 import TargetL0Fields
from sae_core.registry import register


@dataclass(kw_only=True)
class JumpReLUConfig(TargetL0Fields, JumpReLUFields, SAEConfig):
    pre_act_loss_coefficient: float = 0.0
    """Weight of the pre-activation loss on dead latents (Anthropic Jan 2025); 0 disables."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.pre_act_loss_coefficient >= 0,
                f"pre_act_loss_coefficient must be >= 0, got {self.pre_act_loss_coefficient}")

    def controlled_target(self) -> float | None:
        return None  # the target loss holds it (target_l0_loss)


def rectangle(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """h * H(h - theta) with the straight-through gradient for theta."""

    @staticmethod
    def forward(ctx, h_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h_BF, theta_F)
        ctx.bandwidth = bandwidth
        return h_BF * (h_BF > theta_F)

    @staticmethod
    def backward(ctx, grad_BF: Tensor) -> tuple[Tensor, Tensor, None]:
        h_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h_BF = grad_BF * (h_BF > theta_F)
        grad_theta_BF = -(theta_F / eps) * rectangle((h_BF - theta_F) / eps) * grad_BF
        # theta [F] is shared by the rows; a per-entry theta [B, K] (the sparse path) gets its own gradient.
        return grad_h_BF, grad_theta_BF if theta_F.dim() == 2 else grad_theta_BF.sum(dim=0), None


class _HeavisideFn(torch.autograd.Function):
    """H(h - theta) with the straight-through gradient for theta (none for h)."""

    @staticmethod
    def forward(ctx, h_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (h_BF > theta_F).to(h_BF.dtype)

    @staticmethod
    def backward(ctx, grad_BF: Tensor) -> tuple[Tensor | None, Tensor, None]:
        h_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        # rectangle((h - theta) / eps) != 0 exactly where |h - theta| < eps / 2: a mask, no float [B, F] kernel.
        window_BF = (h_BF - theta_F).abs_() < eps / 2
        grad_theta = torch.where(window_BF, grad_BF, 0)
        # theta [F] is shared by the rows; a per-entry theta [B, K] (the sparse path) gets its own gradient.
        grad_theta = (grad_theta if theta_F.dim() == 2 else grad_theta.sum(dim=0)) * (-1.0 / eps)
        # The gradient for h is zero by definition: none at all when h needs none (a detached h).
        return (torch.zeros_like(h_BF) if ctx.needs_input_grad[0] else None), grad_theta, None


def jumprelu(h_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLUFn.apply(h_BF, theta_F, bandwidth)


def step(h_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
    return _HeavisideFn.apply(h_BF, theta_F, bandwidth)


def l0_penalty(h_BF: Tensor, theta_F: Tensor, cfg: JumpReLUFields) -> Tensor:
    """``l0_coefficient`` x the mean number of latents above threshold, differentiable in theta."""
    return cfg.l0_coefficient * step(h_BF, theta_F, cfg.bandwidth).sum(dim=-1).mean()


def target_l0_loss(h_BF: Tensor, theta_F: Tensor, bandwidth: float, cfg: TargetL0Fields) -> Tensor:
    """``target_l0_coefficient * (L0 / target_l0 - 1)^2`` with the batch's L0 differentiable in theta
    (the step STE): it raises thresholds while the batch fires more than the target, lowers them while
    it fires less, and is flat at the target, so the reconstruction's pull settles L0 just above it."""
    l0 = step(h_BF, theta_F, bandwidth).sum(dim=-1).mean()
    return cfg.target_l0_coefficient * (l0 / cfg.target_l0 - 1.0).pow(2)


def at_selected(h_BK: Tensor, idx_BK: Tensor, theta_F: Tensor) -> tuple[Tensor, Tensor]:
    """(h, theta) at the entries the sparse path selected, for :func:`jumprelu_sparsity` without a [B, F]:
    it selects every entry above theta - bandwidth/2 (all that fire and the whole straight-through window),
    so the sums over them equal the dense ones. Padding reads h = -inf (never fires, outside the window)."""
    return torch.where(idx_BK >= 0, h_BK.detach(), -torch.inf), theta_F[idx_BK.clamp_min(0)]


def jumprelu_sparsity(h_BF: Tensor, theta_F: Tensor, cfg: JumpReLUFields) -> Tensor:
    """The L0 penalty, or the target loss when the config sets ``target_l0``."""
    if isinstance(cfg, TargetL0Fields) and cfg.target_l0 is not None:
        return target_l0_loss(h_BF, theta_F, cfg.bandwidth, cfg)
    return l0_penalty(h_BF, theta_F, cfg)


QUANTILE_CHUNK_ENTRIES = 1 << 24
"""Pre-activations held at once while the thresholds are initialised (rows x a chunk of latents)."""
MIN_INIT_THRESHOLD = 1e-3
"""Floor of an initial threshold (a log-parameterised threshold must stay positive)."""


@torch.no_grad()
def thresholds_for_target(sae: SparseAutoencoder, x_ND: Tensor, target_l0: float, reduce: Reducer,
                          world_size: int) -> Tensor:
    """Per-latent thresholds at which every latent fires on ``target_l0 / d_sae`` of the sample's rows, so the
    SAE starts at the target L0: each latent's (1 - target_l0 / d_sae) quantile of its pre-activations on
    the sample. From a fixed ``init_threshold`` Adam needs about |log(theta / init_threshold)| / lr steps to
    get there (hundreds to thousands); from here the target loss only has to follow the encoder. Ranks
    average their log-thresholds, so every rank starts with the same ones."""
    x_ND = sae.encoder_input(x_ND.reshape(-1, x_ND.shape[-1]))
    n, d_sae = x_ND.shape[0], sae.cfg.d_sae
    kth = min(max(round(n * (1.0 - float(target_l0) / d_sae)), 1), n)
    W_DF, theta_F = sae.encoder_weight(), x_ND.new_empty(d_sae)
    chunk = max(QUANTILE_CHUNK_ENTRIES // max(n, 1), 1)
    for start in range(0, d_sae, chunk):
        cols = slice(start, start + chunk)
        theta_F[cols] = (x_ND @ W_DF[:, cols] + sae.b_enc[cols]).kthvalue(kth, dim=0).values
    log_theta_F = theta_F.clamp_min(MIN_INIT_THRESHOLD).log()
    return reduce(log_theta_F, "sum") / world_size


class JumpReLUSAE(SparseAutoencoder):
    saelens_architecture = "jumprelu"
    homogeneous = True
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))
        self.path = PathChoice()

    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def lr_scales(self) -> dict[str, float]:
        """Holding ``target_l0``, the thresholds train faster than the rest (``target_l0_threshold_lr``)."""
        return {"log_threshold": self.cfg.target_l0_threshold_lr} if self.cfg.target_l0 is not None else {}

    def init_from_sample(self, x_ND: Tensor, reduce: Reducer = no_reduce, world_size: int = 1) -> None:
        """With ``target_l0`` set, start every threshold where the SAE fires at the target (thresholds_for_target)."""
        if self.cfg.target_l0 is not None:
            self.log_threshold.data.copy_(thresholds_for_target(self, x_ND, self.cfg.target_l0, reduce, world_size))

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        """Dense, or (in training, while few latents fire and the pre-activation loss is off) sparse: the
        entries above theta - bandwidth/2 (the active ones and the straight-through window) are selected,
        decoded sparsely, and only they get encoder gradient."""
        if not (self.training and self.path.sparse() and self.cfg.pre_act_loss_coefficient == 0):
            out = super().forward(x_BD, dead_mask_F=dead_mask_F)
            self.path.observe(out.latents_BF)
            return out
        theta_F = self.threshold()
        lowest_F = (theta_F - self.cfg.bandwidth / 2).detach()
        input_bias_D = self.b_dec if self.cfg.apply_b_dec_to_input else None
        h_BK, idx_BK = kernels.selected_pre_acts(x_BD, self.encoder_weight(), self.b_enc,
                                                 lambda h: self.path.entries_above(h, lowest_F), input_bias_D)
        active = ActiveLatents(idx_BK, jumprelu(h_BK, theta_F[idx_BK.clamp_min(0)], self.cfg.bandwidth), self.cfg.d_sae)
        x_hat_BD = kernels.sparse_decode(active.idx_BK, active.vals_BK, self.W_dec, self.b_dec)
        sparsity = jumprelu_sparsity(*at_selected(h_BK, idx_BK, theta_F), self.cfg)
        return SAEOutput(x_hat_BD, None, mse_loss(x_hat_BD, x_BD), sparsity, x_BD.new_zeros(()), active=active)

    def activation(self, h_BF: Tensor) -> Tensor:
        return jumprelu(h_BF, self.threshold(), self.cfg.bandwidth)

    def sparsity_loss(self, latents_BF: Tensor, h_BF: Tensor) -> Tensor:
        return jumprelu_sparsity(h_BF, self.threshold(), self.cfg)

    def aux_loss(self, x_BD: Tensor, out: SAEOutput, h_BF: Tensor, dead_mask_F: Tensor | None) -> Tensor:
        coef = self.cfg.pre_act_loss_coefficient
        if coef == 0 or dead_mask_F is None or not bool(dead_mask_F.any()):
            return x_BD.new_zeros(())
        gap_BF = torch.relu(self.threshold() - h_BF) * dead_mask_F
        return coef * (gap_BF @ self.decoder_norms()).mean() / self.cfg.d_in

    # -- saving: SAELens stores the threshold itself ----------------------------------------------
    def inference_tensors(self) -> dict[str, Tensor]:
        return log_threshold_to_saved(super().inference_tensors())

    def inference_to_state(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return saved_to_log_threshold(tensors)


register("jumprelu", JumpReLUConfig, JumpReLUSAE, "JumpReLU with learned thresholds and STE L0 (Rajamanoharan et al. 2024)")
