"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations, relu them; AuxK loss revives dead latents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_core import kernels
from sae_core.architectures.base import ActiveLatents, SAEConfig, SAEOutput, SparseAutoencoder, mse_loss
from sae_core.architectures.common import KSparsityFields
from sae_core.registry import register


@dataclass(kw_only=True)
class TopKConfig(KSparsityFields, SAEConfig):
    tied: bool = False
    """Use W_dec.T as the encoder."""


def topk_dense(h_BF: Tensor, k: int) -> Tensor:
    """relu of the k largest entries of each row, zeros elsewhere."""
    vals_BK, idx_BK = h_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(h_BF).scatter(-1, idx_BK, torch.relu(vals_BK))


def auxk_term(sae: SparseAutoencoder, x_BD: Tensor, x_hat_BD: Tensor, dead_mask_F: Tensor | None,
              target_BD: Tensor | None = None) -> Tensor:
    """The weighted AuxK loss of an SAE whose config has :class:`KSparsityFields` (zero when nothing is dead
    or the coefficient is 0); ``target_BD`` is what the SAE reconstructs when it is not ``x_BD``."""
    cfg = sae.cfg
    if dead_mask_F is None or cfg.aux_coefficient == 0:  # type: ignore[attr-defined]
        return x_BD.new_zeros(())
    aux_k = cfg.aux_k_for(sae.d_out)  # type: ignore[attr-defined]
    return cfg.aux_coefficient * auxk_loss(x_BD, sae, x_hat_BD, dead_mask_F, aux_k, target_BD)  # type: ignore[attr-defined]


def auxk_loss(x_BD: Tensor, sae: SparseAutoencoder, x_hat_BD: Tensor, dead_mask_F: Tensor | None, aux_k: int,
              target_BD: Tensor | None = None) -> Tensor:
    """Reconstruct the residual target - x_hat (target: x itself, or a transcoder's y) from the top aux_k
    dead latents of x (Gao et al. 2024, appendix A.2).

    Only the dead columns of the encoder are multiplied, so the cost scales with the number of dead latents.
    """
    if dead_mask_F is None or not bool(dead_mask_F.any()):
        return x_BD.new_zeros(())
    dead_idx_N = dead_mask_F.nonzero().squeeze(1)
    h_dead_BN = sae.encoder_input(x_BD) @ sae.encoder_weight()[:, dead_idx_N] + sae.b_enc[dead_idx_N]
    vals_BK, j_BK = h_dead_BN.topk(min(aux_k, len(dead_idx_N)), dim=-1, sorted=False)
    residual_BD = ((x_BD if target_BD is None else target_BD) - x_hat_BD).detach()
    recon_BD = kernels.sparse_decode(dead_idx_N[j_BK], torch.relu(vals_BK), sae.W_dec, torch.zeros_like(sae.b_dec))
    # Normalised by the residual's own size so the term stays O(1) whatever the main loss is.
    return mse_loss(recon_BD, residual_BD) / residual_BD.pow(2).mean().clamp_min(1e-12)


class TopKSAE(SparseAutoencoder):
    saelens_architecture = "topk"
    homogeneous = True
    max_active = "k"
    cfg: TopKConfig

    def activation(self, h_BF: Tensor) -> Tensor:
        return topk_dense(h_BF, self.cfg.k)

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        input_bias_D = self.b_dec if self.cfg.apply_b_dec_to_input else None
        vals_BK, idx_BK = kernels.topk_encode(x_BD, self.encoder_weight(), self.b_enc, self.cfg.k, input_bias_D)
        x_hat_BD = kernels.sparse_decode(idx_BK, vals_BK, self.W_dec, self.b_dec)
        zero = x_BD.new_zeros(())
        aux = auxk_term(self, x_BD, x_hat_BD, dead_mask_F)
        active = ActiveLatents(idx_BK, vals_BK, self.cfg.d_sae)
        return SAEOutput(x_hat_BD, None, mse_loss(x_hat_BD, x_BD), zero, aux, active=active)

    def saelens_cfg_extra(self) -> dict[str, Any]:
        return {"k": self.cfg.k}


register("topk", TopKConfig, TopKSAE, "TopK with AuxK on dead latents (Gao et al. 2024)")
