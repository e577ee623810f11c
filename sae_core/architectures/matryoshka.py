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
from torch.autograd.function import FunctionCtx, once_differentiable

from sae_core import kernels
from sae_core.architectures.base import ActiveLatents, SAEOutput, require
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


def prefix_partials(active: ActiveLatents, W_dec_FD: Tensor, prefixes: list[int]) -> Tensor:
    """[G, B, D]: each row's decode restricted to each group g = latents [prefixes[g-1], prefixes[g]), without
    b_dec, from one sparse decode of G*B virtual rows (row (g, b) holds row b's entries in group g)."""
    idx_BK, vals_BK = active.idx_BK, active.vals_BK
    G, (B, K) = len(prefixes), idx_BK.shape
    group_BK = torch.bucketize(idx_BK, torch.tensor(prefixes[:-1], device=idx_BK.device), right=True)
    in_group_GBK = group_BK == torch.arange(G, device=idx_BK.device)[:, None, None]
    idx_NK = torch.where(in_group_GBK, idx_BK, -1).reshape(G * B, K)
    vals_NK = vals_BK.expand(G, B, K).reshape(G * B, K)
    return kernels.sparse_decode(idx_NK, vals_NK, W_dec_FD, W_dec_FD.new_zeros(W_dec_FD.shape[1])).view(G, B, -1)


def sparse_prefix_reconstructions(active: ActiveLatents, W_dec_FD: Tensor, b_dec_D: Tensor,
                                  prefixes: list[int]) -> list[Tensor]:
    """x_hat_m [B, D] for each of the G prefixes: b_dec plus running sums of :func:`prefix_partials`."""
    recons, acc_BD = [], b_dec_D
    for partial_BD in prefix_partials(active, W_dec_FD, prefixes).unbind(0):
        acc_BD = acc_BD + partial_BD
        recons.append(acc_BD)
    return recons


class PrefixErrors(torch.autograd.Function):
    """(mse_G, x_hat_BD): mse_g = mean((x_hat_g - x)^2) for x_hat_g = b_dec + sum_{h <= g} partial_h, and the
    full reconstruction x_hat_{G-1}; what :func:`sparse_prefix_reconstructions` and ``mse_loss`` give, in about
    two passes over [B, D] per prefix each way (one error tensor updated in place, its squared norm as a dot
    product) where autograd's adds, subtractions, squares and means and their backward make about ten."""

    @staticmethod
    def forward(ctx: FunctionCtx, partial_GBD: Tensor, x_BD: Tensor, b_dec_D: Tensor) -> tuple[Tensor, Tensor]:
        err_BD = partial_GBD[0] + (b_dec_D - x_BD)
        sq_sums = [torch.dot(err_BD.view(-1), err_BD.view(-1))]
        for partial_BD in partial_GBD[1:]:
            sq_sums.append(torch.dot(err_BD.add_(partial_BD).view(-1), err_BD.view(-1)))
        ctx.save_for_backward(partial_GBD, err_BD)
        ctx.set_materialize_grads(False)
        return torch.stack(sq_sums) / err_BD.numel(), err_BD + x_BD

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_mse_G: Tensor | None,
                 grad_x_hat_BD: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """d/d partial_h = sum_{g >= h} (2 / n) grad_mse_g err_g (+ grad_x_hat), from the last prefix back, each
        err_{g-1} = err_g - partial_g."""
        partial_GBD, err_BD = ctx.saved_tensors
        G, err_BD = partial_GBD.shape[0], err_BD.clone()
        coef_G = (grad_mse_G if grad_mse_G is not None else err_BD.new_zeros(G)) * (2.0 / err_BD.numel())
        grad_GBD = torch.empty_like(partial_GBD)
        later_BD = grad_x_hat_BD if grad_x_hat_BD is not None else err_BD.new_zeros(())
        for g in reversed(range(G)):
            later_BD = torch.addcmul(later_BD, err_BD, coef_G[g], out=grad_GBD[g])
            if g:
                err_BD.sub_(partial_GBD[g])
        need_x, need_b = ctx.needs_input_grad[1:3]
        own_BD = grad_GBD[0] if grad_x_hat_BD is None else grad_GBD[0] - grad_x_hat_BD  # sum_g of the mse terms
        return grad_GBD, -own_BD if need_x else None, grad_GBD[0].sum(0) if need_b else None


class MatryoshkaSAE(BatchTopKSAE):
    cfg: MatryoshkaConfig

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        active = self.active(x_BD)
        partial_GBD = prefix_partials(active, self.W_dec, self.cfg.prefix_sizes())
        mse_G, x_hat_BD = PrefixErrors.apply(partial_GBD, x_BD, self.b_dec)
        aux = mse_G[:-1].sum() + auxk_term(self, x_BD, x_hat_BD, dead_mask_F)
        return SAEOutput(x_hat_BD, None, mse_G[-1], x_BD.new_zeros(()), aux, active=active)


register("matryoshka", MatryoshkaConfig, MatryoshkaSAE,
         "Matryoshka BatchTopK: nested prefixes each reconstruct the input (Bussmann et al. 2025)")
