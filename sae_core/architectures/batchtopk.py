"""BatchTopK SAE (Bussmann et al. 2024): in training, keep the k*B largest relu'd pre-activations of
the whole batch (so tokens get a variable number of latents, k on average); at inference, a JumpReLU
whose threshold is a running estimate of the smallest activation BatchTopK kept.

The threshold buffer is [d_sae] with one value for every latent (SAELens's jumprelu layout, which is
how this SAE is saved). It is an exponential moving average, over training steps, of the minimum
positive kept activation of the global batch; ``reduce(..., "min")`` makes data-parallel ranks agree.
Like TopK, an AuxK loss on dead latents keeps them learning (``auxk_loss`` from topk.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_core import kernels
from sae_core.architectures.base import (
    Reducer,
    SAEConfig,
    SAEOutput,
    SparseAutoencoder,
    mse_loss,
    no_reduce,
    require,
)
from sae_core.architectures.topk import auxk_loss
from sae_core.registry import register


@dataclass(kw_only=True)
class BatchTopKConfig(SAEConfig):
    k: int = 32
    """Mean number of latents active per token (k*B are kept over a batch of B)."""
    aux_k: int | None = None
    """Dead latents the AuxK loss may use per token; None means d_in // 2."""
    aux_coefficient: float = 1.0 / 32
    """Weight of the AuxK loss (as in TopK)."""
    threshold_momentum: float = 0.99
    """EMA momentum of the inference threshold: t <- m*t + (1-m)*min_kept (the first step sets t)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.k, int) and 1 <= self.k <= self.d_sae, f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        require(self.aux_k is None or self.aux_k >= 1, f"aux_k must be >= 1, got {self.aux_k}")
        require(self.aux_coefficient >= 0, f"aux_coefficient must be >= 0, got {self.aux_coefficient}")
        require(0 <= self.threshold_momentum < 1, f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")


def batch_topk(h_BF: Tensor, k: int) -> Tensor:
    """relu of the k*B largest entries of the whole batch, zeros elsewhere."""
    flat = torch.relu(h_BF).flatten()
    vals_N, idx_N = flat.topk(min(k * h_BF.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx_N, vals_N).view_as(h_BF)


def dense_or_sparse_decode(latents_BF: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor) -> Tensor:
    """Decode through the sparse kernel when the kernels package can pad a dense latent matrix."""
    to_padded = getattr(kernels, "to_padded", None)
    if to_padded is None:
        return latents_BF @ W_dec_FD + b_dec_D
    idx_BK, vals_BK = to_padded(latents_BF)
    return kernels.sparse_decode(idx_BK, vals_BK, W_dec_FD, b_dec_D)


class BatchTopKSAE(SparseAutoencoder):
    saelens_architecture = "jumprelu"
    homogeneous = True
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    def activation(self, h_BF: Tensor) -> Tensor:
        if self.training:
            return batch_topk(h_BF, self.cfg.k)
        return torch.relu(h_BF) * (h_BF > self.threshold)

    def decode(self, latents_BF: Tensor) -> Tensor:
        return dense_or_sparse_decode(latents_BF, self.W_dec, self.b_dec)

    def auxk_term(self, x_BD: Tensor, x_hat_BD: Tensor, dead_mask_F: Tensor | None) -> Tensor:
        if dead_mask_F is None or self.cfg.aux_coefficient == 0:
            return x_BD.new_zeros(())
        aux_k = self.cfg.aux_k or max(self.cfg.d_in // 2, 1)
        return self.cfg.aux_coefficient * auxk_loss(x_BD, self, x_hat_BD, dead_mask_F, aux_k)

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        latents_BF = self.encode(x_BD)
        x_hat_BD = self.decode(latents_BF)
        zero = x_BD.new_zeros(())
        aux = self.auxk_term(x_BD, x_hat_BD, dead_mask_F)
        return SAEOutput(x_hat_BD, latents_BF, mse_loss(x_hat_BD, x_BD), zero, aux)

    @torch.no_grad()
    def update_running_stats(self, out: SAEOutput, reduce: Reducer = no_reduce) -> None:
        """Fold this step's smallest kept activation (min over all ranks) into the threshold EMA."""
        if not self.training:
            return
        latents_BF = out.latents_BF.detach().float()
        inf = torch.tensor(float("inf"), device=latents_BF.device)
        # Every rank calls reduce, even with nothing kept, so collectives stay matched.
        min_kept = reduce(torch.where(latents_BF > 0, latents_BF, inf).min(), "min")
        if not bool(torch.isfinite(min_kept)):
            return
        if bool((self.threshold == 0).all()):
            self.threshold.fill_(float(min_kept))
        else:
            m = self.cfg.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * min_kept)


register("batchtopk", BatchTopKConfig, BatchTopKSAE,
         "BatchTopK over the batch in training, JumpReLU with a learned global threshold at inference (Bussmann et al. 2024)")
