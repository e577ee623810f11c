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
from functools import partial

import torch
from torch import Tensor

from sae_core import kernels
from sae_core.architectures.base import (
    ActiveLatents,
    Reducer,
    SAEConfig,
    SAEOutput,
    SparseAutoencoder,
    mse_loss,
    no_reduce,
)
from sae_core.architectures.common import KSparsityFields, ThresholdEMAFields, update_threshold_ema
from sae_core.architectures.topk import auxk_term
from sae_core.registry import register


@dataclass(kw_only=True)
class BatchTopKConfig(KSparsityFields, ThresholdEMAFields, SAEConfig):
    """k is the mean number of latents per token: k*B are kept over a batch of B."""


def batch_topk(h_BF: Tensor, k: int) -> Tensor:
    """relu of the k*B largest entries of the whole batch, zeros elsewhere."""
    flat = torch.relu(h_BF).flatten()
    vals_N, idx_N = flat.topk(min(k * h_BF.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx_N, vals_N).view_as(h_BF)


def batch_topk_entries(h_BF: Tensor, k: int) -> Tensor:
    """idx_BK (padded, -1) of the k*B largest pre-activations of the whole batch. Which of the non-positive
    ones fill the k*B when too few are positive does not matter: relu makes them 0."""
    B, F = h_BF.shape
    flat_N = top_entries(h_BF.flatten(), min(k * B, h_BF.numel()))  # ascending: row by row
    return kernels.padded_entries(flat_N // F, flat_N % F, B)


def top_entries(values_N: Tensor, n: int, sample: int = 1 << 16, min_n: int = 1 << 14) -> Tensor:
    """Positions of the n largest values in ascending order (of equal values at the boundary, the first),
    without torch.topk's sort of a whole batch: a strided sample estimates a value that about 1.5n entries
    reach, one pass collects those candidates (in order), and a selection among them finds the exact n-th
    largest. Exact: when fewer than n entries reach the estimate, it falls back to the full topk."""
    N = values_N.numel()
    stride = max(N // sample, 1)
    if n < min_n or n >= N // 4 or stride == 1:  # where torch's own topk is fast
        return values_N.topk(n, sorted=False).indices.sort().values
    sampled = values_N[::stride]
    estimate = sampled.topk(min(int(1.5 * n / stride) + 16, len(sampled)), sorted=False).values.min()
    candidates_M = (values_N >= estimate).nonzero().squeeze(1)
    if len(candidates_M) < n:
        return values_N.topk(n, sorted=False).indices.sort().values
    values_M = values_N[candidates_M]
    nth = values_M.kthvalue(len(values_M) - n + 1).values
    above_M, tied_M = values_M > nth, values_M == nth
    keep_M = above_M | (tied_M & (tied_M.cumsum(0) <= n - above_M.sum()))
    return candidates_M[keep_M]


def padded_sparse_decode(latents_BF: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor) -> Tensor:
    """Decode dense latents with a variable number of non-zeros per row through the sparse kernel."""
    idx_BK, vals_BK = kernels.to_padded(latents_BF)
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
        return padded_sparse_decode(latents_BF, self.W_dec, self.b_dec)

    def active(self, x_BD: Tensor) -> ActiveLatents:
        """The active latents of x: in training the batch-wise top k*B, selected on the pre-activations
        with a sparse encoder backward; at inference the thresholded ones."""
        if not self.training:
            return ActiveLatents(*kernels.to_padded(self.encode(x_BD)), self.cfg.d_sae)
        input_bias_D = self.b_dec if self.cfg.apply_b_dec_to_input else None
        h_BK, idx_BK = kernels.selected_pre_acts(x_BD, self.encoder_weight(), self.b_enc,
                                                 partial(batch_topk_entries, k=self.cfg.k), input_bias_D)
        return ActiveLatents(idx_BK, torch.relu(h_BK), self.cfg.d_sae)

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        active = self.active(x_BD)
        x_hat_BD = kernels.sparse_decode(active.idx_BK, active.vals_BK, self.W_dec, self.b_dec)
        zero = x_BD.new_zeros(())
        aux = auxk_term(self, x_BD, x_hat_BD, dead_mask_F)
        return SAEOutput(x_hat_BD, None, mse_loss(x_hat_BD, x_BD), zero, aux, active=active)

    @torch.no_grad()
    def update_running_stats(self, out: SAEOutput, reduce: Reducer = no_reduce) -> None:
        """Fold this step's smallest kept activation (min over all ranks) into the threshold EMA."""
        if not self.training:
            return
        kept = (out.active.vals_BK if out.active is not None else out.latents_BF).detach().float()
        min_kept = torch.where(kept > 0, kept, torch.inf).min()
        update_threshold_ema(self.threshold, min_kept, self.cfg.threshold_momentum, reduce)


register("batchtopk", BatchTopKConfig, BatchTopKSAE,
         "BatchTopK over the batch in training, JumpReLU with a learned global threshold at inference (Bussmann et al. 2024)")
