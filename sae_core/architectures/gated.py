"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

One encoder matrix, two paths:
    pi_gate = x_in @ W_enc + b_gate                 decides which latents fire
    pi_mag  = x_in @ (W_enc * exp(r_mag)) + b_mag   decides how strongly
    f = 1[pi_gate > 0] * relu(pi_mag)
The L1 penalty falls on relu(pi_gate) (weighted by decoder-row norms and divided by d_in, the
convention of relu.py, so ``l1_coefficient`` has the same scale); the auxiliary loss reconstructs x
from relu(pi_gate) through a detached copy of the decoder, so it trains only the gate path. There is
no b_enc (SAELens's gated layout: b_gate, b_mag, r_mag).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

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
from sae_core.architectures.relu import weighted_l1
from sae_core.l0 import TargetL0Fields
from sae_core.registry import register


@dataclass(kw_only=True)
class GatedConfig(L1Fields, TargetL0Fields, SAEConfig):
    l1_coefficient: float = 5.0
    """Weight of the decoder-norm-weighted L1 penalty on relu(pi_gate) (scale as in relu.py); with
    ``target_l0`` set, the starting value the trainer's controller scales."""
    aux_coefficient: float = 1.0
    """Weight of the frozen-decoder reconstruction loss from relu(pi_gate) (the paper uses 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.aux_coefficient >= 0, f"aux_coefficient must be >= 0, got {self.aux_coefficient}")


class GatePaths(NamedTuple):
    gate_BF: Tensor
    """pi_gate."""
    mag_BF: Tensor
    """pi_mag."""


class GatedSAE(SparseAutoencoder):
    saelens_architecture = "gated"
    homogeneous = True
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        self.register_parameter("b_enc", None)  # replaced by b_gate and b_mag
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.path = PathChoice()

    def paths(self, x_BD: Tensor) -> GatePaths:
        x_in_BF = self.encoder_input(x_BD) @ self.encoder_weight()
        return GatePaths(x_in_BF + self.b_gate, x_in_BF * self.r_mag.exp() + self.b_mag)

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """The gate pre-activations (what decides firing)."""
        return self.paths(x_BD).gate_BF

    def combine(self, paths: GatePaths) -> Tensor:
        return (paths.gate_BF > 0) * torch.relu(paths.mag_BF)

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.combine(self.paths(x_BD))

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        if self.training and self.path.sparse():
            return self.sparse_forward(x_BD)
        out = self.dense_forward(x_BD)
        self.path.observe(out.latents_BF)
        return out

    def sparse_forward(self, x_BD: Tensor) -> SAEOutput:
        """The dense forward restricted to the entries whose gate is open (the only ones with a non-zero
        latent, L1 term or aux reconstruction): selected on pi_gate, decoded sparsely, and only they get
        encoder gradient."""
        input_bias_D = self.b_dec if self.cfg.apply_b_dec_to_input else None
        gate_BK, idx_BK = kernels.selected_pre_acts(x_BD, self.encoder_weight(), self.b_gate,
                                                    lambda h: self.path.entries_above(h, 0.0), input_bias_D)
        at = idx_BK.clamp_min(0)
        mag_BK = (gate_BK - self.b_gate[at]) * self.r_mag[at].exp() + self.b_mag[at]
        active = ActiveLatents(idx_BK, torch.relu(mag_BK), self.cfg.d_sae)
        x_hat_BD = kernels.sparse_decode(idx_BK, active.vals_BK, self.W_dec, self.b_dec)
        gate_acts_BK = torch.relu(gate_BK)  # 0 at padding (gate_BK is 0 there)
        norms_BK = torch.where(idx_BK >= 0, self.decoder_norms()[at], 0)
        l1 = (gate_acts_BK * norms_BK).sum() / (x_BD.shape[0] * self.cfg.d_in)
        aux = x_BD.new_zeros(())
        if self.cfg.aux_coefficient:
            x_frozen_BD = kernels.sparse_decode(idx_BK, gate_acts_BK, self.W_dec.detach(), self.b_dec.detach())
            aux = self.cfg.aux_coefficient * mse_loss(x_frozen_BD, x_BD)
        return SAEOutput(x_hat_BD, None, mse_loss(x_hat_BD, x_BD), self.cfg.l1_coefficient * l1, aux, active=active)

    def dense_forward(self, x_BD: Tensor) -> SAEOutput:
        paths = self.paths(x_BD)
        latents_BF = self.combine(paths)
        x_hat_BD = self.decode(latents_BF)
        gate_acts_BF = torch.relu(paths.gate_BF)
        sparsity = self.cfg.l1_coefficient * weighted_l1(gate_acts_BF, self.decoder_norms(), self.cfg.d_in)
        aux = x_BD.new_zeros(())
        if self.cfg.aux_coefficient:
            x_frozen_BD = gate_acts_BF @ self.W_dec.detach() + self.b_dec.detach()
            aux = self.cfg.aux_coefficient * mse_loss(x_frozen_BD, x_BD)
        return SAEOutput(x_hat_BD, latents_BF, mse_loss(x_hat_BD, x_BD), sparsity, aux)


register("gated", GatedConfig, GatedSAE, "Gated SAE: separate gate and magnitude paths (Rajamanoharan et al. 2024)")
