"""ReLU SAE with an L1 penalty weighted by decoder-row norms (Anthropic, "Circuits Updates", April 2024),
optionally with tied weights and with Anthropic's resampling of dead latents (Bricken et al. 2023).

Penalty convention: ``sparsity = l1_coefficient * mean_b sum_i f_bi * ||W_dec_i|| / d_in``. Dividing by
d_in is what turns Anthropic's loss ``||x - x_hat||^2 + lambda * sum_i f_i ||W_dec_i||`` (squared error
summed over d_in, inputs scaled to E||x||^2 = d_in) into our mean-over-elements MSE, so
``l1_coefficient`` is Anthropic's lambda (they report ~5) and does not depend on d_in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_core import kernels
from sae_core.architectures.base import (
    ActiveLatents,
    SAEConfig,
    SAEOutput,
    SparseAutoencoder,
    mse_loss,
    require,
)
from sae_core.architectures.common import L1Fields, PathChoice
from sae_core.l0 import TargetL0Fields
from sae_core.registry import register


@dataclass(kw_only=True)
class ReLUConfig(L1Fields, TargetL0Fields, SAEConfig):
    """l1_coefficient is Anthropic's lambda (the module docstring gives the scale)."""

    normalize_decoder: bool = False
    """Keep decoder rows at unit norm. Off by default: the norm-weighted L1 already removes the
    incentive to shrink latents by growing decoder rows (the April-2024 recipe)."""
    tied: bool = False
    """Use W_dec.T as the encoder."""
    resample_every: int | None = None
    """Resample dead latents every this many steps (Anthropic 2023); None disables."""
    resample_encoder_scale: float = 0.2
    """A resampled encoder row gets this fraction of the mean alive encoder-row norm."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.resample_every is None or (isinstance(self.resample_every, int) and self.resample_every >= 1),
                f"resample_every must be a positive integer or None, got {self.resample_every!r}")
        require(self.resample_encoder_scale > 0, f"resample_encoder_scale must be > 0, got {self.resample_encoder_scale}")


def weighted_l1(acts_BF: Tensor, decoder_norms_F: Tensor, d_in: int) -> Tensor:
    """mean_b sum_i acts_bi * ||W_dec_i|| / d_in (non-negative acts). Shared with gated.py."""
    return (acts_BF @ decoder_norms_F).mean() / d_in


def active_weighted_l1(active: ActiveLatents, decoder_norms_F: Tensor, d_in: int) -> Tensor:
    """:func:`weighted_l1` of ``active.dense()`` from the padded layout: B x K products, where the dense
    form costs about five passes over [B, F] (scatter, GEMV, and their backward)."""
    norms_BK = torch.where(active.idx_BK >= 0, decoder_norms_F[active.idx_BK.clamp_min(0)], 0)
    return (active.vals_BK * norms_BK).sum() / (active.idx_BK.shape[0] * d_in)


class ReLUSAE(SparseAutoencoder):
    saelens_architecture = "standard"
    homogeneous = True
    cfg: ReLUConfig

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        self.path = PathChoice()

    def activation(self, h_BF: Tensor) -> Tensor:
        return torch.relu(h_BF)

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        """Dense, or (in training, while few latents fire) sparse: the positive pre-activations are
        selected, decoded sparsely, and only they get encoder gradient."""
        if not (self.training and self.path.sparse()):
            out = super().forward(x_BD, dead_mask_F=dead_mask_F)
            self.path.observe(out.latents_BF)
            return out
        input_bias_D = self.b_dec if self.cfg.apply_b_dec_to_input else None
        h_BK, idx_BK = kernels.selected_pre_acts(x_BD, self.encoder_weight(), self.b_enc,
                                                 lambda h: self.path.entries_above(h, 0.0), input_bias_D)
        active = ActiveLatents(idx_BK, torch.relu(h_BK), self.cfg.d_sae)
        x_hat_BD = kernels.sparse_decode(active.idx_BK, active.vals_BK, self.W_dec, self.b_dec)
        sparsity = self.cfg.l1_coefficient * active_weighted_l1(active, self.decoder_norms(), self.cfg.d_in)
        return SAEOutput(x_hat_BD, None, mse_loss(x_hat_BD, x_BD), sparsity, x_BD.new_zeros(()), active=active)

    def sparsity_loss(self, latents_BF: Tensor, h_BF: Tensor) -> Tensor:
        return self.cfg.l1_coefficient * weighted_l1(latents_BF, self.decoder_norms(), self.cfg.d_in)

    def resample_interval(self) -> int:
        return self.cfg.resample_every or 0

    @torch.no_grad()
    def resample_dead(self, dead_mask_F: Tensor, x_BD: Tensor) -> None:
        """Point each dead latent at the residual of an input drawn with probability proportional to
        its squared loss; the encoder row gets ``resample_encoder_scale`` x the mean alive encoder norm
        and b_enc is zeroed (Bricken et al. 2023, "Neuron resampling"). Alive latents are untouched.
        The trainer resets the Adam state of the resampled rows."""
        dead_idx_N = dead_mask_F.nonzero().squeeze(1)
        if len(dead_idx_N) == 0:
            return
        residual_BD = x_BD - self.decode(self.encode(x_BD))
        loss_B = residual_BD.pow(2).sum(dim=1)
        weights_B = loss_B.pow(2)
        if not bool(weights_B.sum() > 0):
            return
        pick_N = torch.multinomial(weights_B, len(dead_idx_N), replacement=True)
        direction_ND = torch.nn.functional.normalize(residual_BD[pick_N], dim=1)
        self.W_dec[dead_idx_N] = direction_ND
        if self.W_enc is not None:
            alive_F = ~dead_mask_F
            enc_norms_F = self.W_enc.norm(dim=0)
            mean_alive = enc_norms_F[alive_F].mean() if bool(alive_F.any()) else enc_norms_F.new_tensor(1.0)
            self.W_enc[:, dead_idx_N] = direction_ND.T * (self.cfg.resample_encoder_scale * mean_alive)
        # Tied: the encoder is W_dec.T, already pointing at the residual.
        self.b_enc[dead_idx_N] = 0.0


register("relu", ReLUConfig, ReLUSAE, "ReLU + decoder-norm-weighted L1, optional tying and resampling (Anthropic 2023/24)")
