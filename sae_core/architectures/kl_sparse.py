"""The classical sparse autoencoder (Ng, CS294A lecture notes, "Sparse autoencoder"): sigmoid latents
f = sigmoid(h), and a penalty pulling each latent's mean activation over the batch, rho_hat_i, toward a
small target rho:

    sparsity = beta * sum_i KL(rho || rho_hat_i) / d_in,
    KL(rho || q) = rho log(rho / q) + (1 - rho) log((1 - rho) / (1 - q)).

Dividing by d_in matches Ng's objective (1/2)||x - x_hat||^2 + beta_Ng * sum_i KL once the squared
error is a mean over elements: beta = 2 * beta_Ng (Ng uses beta_Ng = 3). Sigmoid is not positively
homogeneous, so decoder norms are not folded at save, and the decoder is unconstrained by default
(latents live in (0, 1), so the decoder rows must carry the magnitudes). Saved with SAELens
architecture "kl_sparse", our documented extension (cfg.json adds ``"activation_fn": "sigmoid"``).

``target_l0`` sets rho = target_l0 / d_sae. Sigmoid latents are never exactly zero, so the counted L0
of this SAE is always d_sae; what the target holds is the summed mean activation, sum_i rho_hat_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_core.architectures.base import SAEConfig, SparseAutoencoder, require
from sae_core.l0 import TargetL0Fields
from sae_core.registry import register


@dataclass(kw_only=True)
class KLSparseConfig(TargetL0Fields, SAEConfig):
    rho: float = 0.05
    """Target mean activation of every latent (Ng's sparsity parameter); set to target_l0 / d_sae when
    ``target_l0`` is given (which then wins over rho)."""
    beta: float = 6.0
    """Weight of the KL penalty (= 2 x Ng's beta; see the module docstring)."""
    normalize_decoder: bool = False
    """Keep decoder rows at unit norm. Off: sigmoid latents are at most 1, so rows must scale."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_l0 is not None:
            # Sigmoid latents are never exactly 0: the L0 they can target is the summed mean activation.
            self.rho = float(self.target_l0) / self.d_sae
        require(0 < self.rho < 1, f"rho must be in (0, 1), got {self.rho}")
        require(self.beta >= 0, f"beta must be >= 0, got {self.beta}")

    def controlled_target(self) -> float | None:
        return None  # rho carries it


def kl_divergence(rho: float, rho_hat_F: Tensor) -> Tensor:
    """KL(Bernoulli(rho) || Bernoulli(rho_hat)) per latent."""
    q_F = rho_hat_F.clamp(1e-6, 1 - 1e-6)
    return rho * torch.log(rho / q_F) + (1 - rho) * torch.log((1 - rho) / (1 - q_F))


class KLSparseSAE(SparseAutoencoder):
    saelens_architecture = "kl_sparse"
    homogeneous = False
    cfg: KLSparseConfig

    def activation(self, h_BF: Tensor) -> Tensor:
        return torch.sigmoid(h_BF)

    def sparsity_loss(self, latents_BF: Tensor, h_BF: Tensor) -> Tensor:
        rho_hat_F = latents_BF.mean(dim=0)
        return self.cfg.beta * kl_divergence(self.cfg.rho, rho_hat_F).sum() / self.cfg.d_in

    def saelens_cfg_extra(self) -> dict[str, Any]:
        return {"activation_fn": "sigmoid"}


register("kl_sparse", KLSparseConfig, KLSparseSAE, "Sigmoid autoencoder with a KL sparsity target (Ng, CS294A)")
