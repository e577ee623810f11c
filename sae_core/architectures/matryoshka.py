"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): BatchTopK latents, trained so that every nested
prefix of the dictionary (latents [0, m) for m in ``prefixes``) reconstructs the input on its own, which
puts general features first and stops feature absorption into later, more specific latents.

Loss convention (the paper's sum): ``mse`` is the full reconstruction's; ``aux`` is the sum of the
proper prefixes' MSEs (each the mean over elements of (x - x_hat_m)^2, with x_hat_m = f[:, :m] @
W_dec[:m] + b_dec), plus AuxK. So ``loss()`` = sum over all prefixes of their MSE + AuxK.
Inference is BatchTopK's (a JumpReLU with the learned threshold), saved as SAELens "jumprelu".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_core import kernels
from sae_core.architectures.base import ActiveLatents, SAEOutput, mse_loss, require
from sae_core.architectures.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae_core.architectures.topk import auxk_term
from sae_core.registry import register


@dataclass(kw_only=True)
class MatryoshkaConfig(BatchTopKConfig):
    prefixes: list[int] | None = None
    """Increasing prefix lengths ending at d_sae; None means geometric halves
    [d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae] (sizes below 1 dropped)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefixes is None:
            return
        self.prefixes = [int(p) for p in self.prefixes]
        p = self.prefixes
        require(len(p) >= 1 and p[-1] == self.d_sae, f"prefixes must end at d_sae={self.d_sae}, got {p}")
        require(p[0] >= 1 and all(a < b for a, b in zip(p, p[1:], strict=False)),
                f"prefixes must be strictly increasing positive lengths, got {p}")

    def prefix_sizes(self) -> list[int]:
        if self.prefixes is not None:
            return list(self.prefixes)
        sizes = {self.d_sae // 2**j for j in range(5)}
        return sorted(s for s in sizes if s >= 1)


def prefix_reconstructions(latents_BF: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor, prefixes: list[int]) -> list[Tensor]:
    """x_hat_m = latents[:, :m] @ W_dec[:m] + b_dec for each m, built cumulatively group by group (the
    dense definition; the module computes the same from one sparse decode)."""
    recons, acc_BD, start = [], b_dec_D.expand(latents_BF.shape[0], -1), 0
    for end in prefixes:
        acc_BD = acc_BD + latents_BF[:, start:end] @ W_dec_FD[start:end]
        recons.append(acc_BD)
        start = end
    return recons


def sparse_prefix_reconstructions(active: ActiveLatents, W_dec_FD: Tensor, b_dec_D: Tensor,
                                  prefixes: list[int]) -> list[Tensor]:
    """x_hat_m [B, D] for each of the G prefixes, from one sparse decode of G*B virtual rows (row (g, b)
    holds row b's entries in group g = latents [prefixes[g-1], prefixes[g])), then running sums over g.
    The sums are G - 1 adds of [B, D]: ``cumsum`` over the leading dimension of [G, B, D] (and its backward,
    a flip, a cumsum and a flip) cost about a third of the training step on CPU."""
    idx_BK, vals_BK = active.idx_BK, active.vals_BK
    G, (B, K) = len(prefixes), idx_BK.shape
    group_BK = torch.bucketize(idx_BK, torch.tensor(prefixes[:-1], device=idx_BK.device), right=True)
    in_group_GBK = group_BK == torch.arange(G, device=idx_BK.device)[:, None, None]
    idx_NK = torch.where(in_group_GBK, idx_BK, -1).reshape(G * B, K)
    vals_NK = vals_BK.expand(G, B, K).reshape(G * B, K)
    partial_GBD = kernels.sparse_decode(idx_NK, vals_NK, W_dec_FD, torch.zeros_like(b_dec_D)).view(G, B, -1)
    recons, acc_BD = [], b_dec_D
    for partial_BD in partial_GBD.unbind(0):
        acc_BD = acc_BD + partial_BD
        recons.append(acc_BD)
    return recons


class MatryoshkaSAE(BatchTopKSAE):
    cfg: MatryoshkaConfig

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        active = self.active(x_BD)
        *partial, x_hat_BD = sparse_prefix_reconstructions(active, self.W_dec, self.b_dec, self.cfg.prefix_sizes())
        prefix_mse = sum((mse_loss(r, x_BD) for r in partial), x_BD.new_zeros(()))
        aux = prefix_mse + auxk_term(self, x_BD, x_hat_BD, dead_mask_F)
        return SAEOutput(x_hat_BD, None, mse_loss(x_hat_BD, x_BD), x_BD.new_zeros(()), aux, active=active)


register("matryoshka", MatryoshkaConfig, MatryoshkaSAE,
         "Matryoshka BatchTopK: nested prefixes each reconstruct the input (Bussmann et al. 2025)")
