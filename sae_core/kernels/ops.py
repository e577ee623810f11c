"""Autograd functions over a backend's primitives (backends.py); the same code runs on CPU and CUDA."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from sae_core.kernels.backends import TorchBackend, padded_entries


class SparseDecode(torch.autograd.Function):
    """x_hat[b] = sum_j vals[b,j] * W_dec[idx[b,j]] + b_dec, without materialising dense latents."""

    @staticmethod
    def forward(ctx: FunctionCtx, idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor,
                backend: TorchBackend) -> Tensor:
        dtype = torch.promote_types(torch.promote_types(vals_BK.dtype, W_dec_FD.dtype), b_dec_D.dtype)
        ctx.dtypes = (vals_BK.dtype, W_dec_FD.dtype, b_dec_D.dtype)
        idx_BK, vals_BK, W_dec_FD = idx_BK.long(), vals_BK.to(dtype), W_dec_FD.to(dtype)  # kernels read int64
        ctx.backend = backend
        ctx.save_for_backward(idx_BK, vals_BK, W_dec_FD)
        return backend.gather_sum(idx_BK, vals_BK, W_dec_FD, b_dec_D.to(dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_BD: Tensor) -> tuple[Tensor | None, ...]:
        idx_BK, vals_BK, W_dec_FD = ctx.saved_tensors
        vals_dtype, W_dtype, b_dtype = ctx.dtypes
        grad_BD = grad_BD.to(W_dec_FD.dtype).contiguous()
        grad_vals = grad_W = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_vals = ctx.backend.row_dots(idx_BK, grad_BD, W_dec_FD).to(vals_dtype)
        if ctx.needs_input_grad[2]:
            grad_W = ctx.backend.scatter_rows(idx_BK, vals_BK, grad_BD, W_dec_FD.shape[0]).to(W_dtype)
        if ctx.needs_input_grad[3]:
            grad_b = grad_BD.sum(0).to(b_dtype)
        return None, grad_vals, grad_W, grad_b, None


class _Scratch(threading.local):
    """One buffer per thread for the pre-activations on CPU (SelectedPreActs, the TopK row blocks)."""

    buffer_BF: Tensor | None = None


_scratch = _Scratch()


def uses_scratch(x: Tensor) -> bool:
    """Whether a product of ``x`` goes into :func:`pre_acts_buffer`: on CPU outside autocast (elsewhere the
    caching allocator reuses blocks itself, and autocast picks the product's dtype)."""
    return x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def pre_acts_buffer(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A CPU [rows, cols] buffer reused from step to step: torch's CPU allocator returns large blocks to the
    system, so a fresh [B, F] every step costs a page fault per 4 KiB on first touch (about 0.12x of the
    product itself at B=4096, F=4608 on one thread). It stays allocated between steps (the dense path
    allocates that much every step anyway); a thread-local, so concurrent trainers never share it."""
    buffer = _scratch.buffer_BF
    if buffer is None or buffer.shape != (rows, cols) or buffer.dtype != dtype:
        buffer = _scratch.buffer_BF = None  # free the old one before allocating the new
        buffer = _scratch.buffer_BF = torch.empty(rows, cols, dtype=dtype)
    return buffer


CPU_CHUNK_ROWS = 1024
"""On CPU the encoder product and the top-k run over this many rows at a time in one buffer [rows, F] kept
from step to step (:func:`pre_acts_buffer`): a fresh [B, F] costs a page fault per 4 KiB on first touch (at
B=4096, F=16384 about 8% of the product's own CPU time on one thread), and the memory the step holds falls
by [B - rows, F]."""


def chunked_topk(x_in_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int, backend: TorchBackend,
                 sample_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(vals_BK, idx_BK) = the k largest of each row of x_in @ W_enc + b_enc, and relu of that whole product's
    first ``sample_rows`` rows; one product on accelerators (and under autocast), row blocks into one reused
    buffer on CPU. The bias is added inside topk: no extra pass over [B, F]."""
    B = x_in_BD.shape[0]
    chunk, h_CF = B, None
    if uses_scratch(x_in_BD):
        chunk = max(min(B, CPU_CHUNK_ROWS), sample_rows, 1)
        h_CF = pre_acts_buffer(chunk, W_enc_DF.shape[1], x_in_BD.dtype)
    vals, idxs = [], []
    for start in range(0, max(B, 1), chunk):
        rows_CD = x_in_BD[start : start + chunk]
        h_RF = rows_CD @ W_enc_DF if h_CF is None else torch.mm(rows_CD, W_enc_DF, out=h_CF[: len(rows_CD)])
        if not start:  # read before topk, which may use its input as scratch
            sample_RF = torch.relu(h_RF[:sample_rows] + b_enc_F.to(h_RF.dtype))
        vals_RK, idx_RK = backend.topk(h_RF, k, b_enc_F.to(h_RF.dtype))
        vals.append(vals_RK)
        idxs.append(idx_RK)
    if len(vals) == 1:
        return vals[0], idxs[0], sample_RF
    return torch.cat(vals), torch.cat(idxs), sample_RF


class TopKEncode(torch.autograd.Function):
    """relu of the k largest entries of (x - input_bias) @ W_enc + b_enc per row; the backward only touches
    those k columns.

    ``input_bias_D`` (SAELens's b_dec subtracted from the input) gets its gradient from b_enc's:
    -W_enc @ grad_b_enc, one pass over W_enc, where going through x would gather B*K encoder columns.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, input_bias_D: Tensor | None,
                k: int, backend: TorchBackend, sample_rows: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        x_in_BD = x_BD if input_bias_D is None else x_BD - input_bias_D
        vals_BK, idx_BK, sample_RF = chunked_topk(x_in_BD, W_enc_DF, b_enc_F, k, backend, sample_rows)
        vals_BK = vals_BK.relu_()
        ctx.backend = backend
        ctx.dtypes = (x_BD.dtype, W_enc_DF.dtype, b_enc_F.dtype, None if input_bias_D is None else input_bias_D.dtype)
        ctx.save_for_backward(x_in_BD, W_enc_DF, idx_BK, vals_BK)
        ctx.mark_non_differentiable(idx_BK, sample_RF)
        return vals_BK, idx_BK, sample_RF

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_vals_BK: Tensor, _grad_idx: Tensor | None,
                 _grad_sample: Tensor | None) -> tuple[Tensor | None, ...]:
        x_in_BD, W_enc_DF, idx_BK, vals_BK = ctx.saved_tensors
        grad_h_BK = torch.where(vals_BK > 0, grad_vals_BK, 0)  # relu's gradient
        grads = encoder_grads(ctx, x_in_BD, W_enc_DF, idx_BK, grad_h_BK)
        return *grads, None, None, None


def encoder_grads(ctx: FunctionCtx, x_in_BD: Tensor, W_enc_DF: Tensor, idx_BK: Tensor,
                  grad_h_BK: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of x, W_enc, b_enc and the input bias from d loss / d h, non-zero only at the entries
    idx_BK (-1: padding) of the pre-activations h = (x - input_bias) @ W_enc + b_enc. ``ctx.dtypes`` holds
    the four inputs' dtypes (None for an absent input bias)."""
    x_dtype, W_dtype, b_dtype, bias_dtype = ctx.dtypes
    dtype = torch.promote_types(x_in_BD.dtype, W_enc_DF.dtype)
    grad_h_BK = grad_h_BK.to(dtype).contiguous()
    need_x, need_W, need_b, need_bias = (ctx.needs_input_grad + (False,))[:4]
    grad_x = grad_W = grad_b = grad_bias = None
    if need_x:
        # W_enc [D, F] gathered by column: transpose once so each latent is a contiguous row.
        W_enc_FD = W_enc_DF.to(dtype).t().contiguous()
        grad_x = ctx.backend.gather_sum(idx_BK, grad_h_BK, W_enc_FD).to(x_dtype)
    if need_W:
        # Written in W_enc's own [D, F] layout: a transposed [F, D] gradient would be copied by autograd.
        grad_W = ctx.backend.scatter_cols(idx_BK, grad_h_BK, x_in_BD.to(dtype).contiguous(), W_enc_DF.shape[1])
        grad_W = grad_W.to(W_dtype)
    if need_b or need_bias:
        grad_b_F = torch.zeros(W_enc_DF.shape[1], dtype=dtype, device=grad_h_BK.device)
        grad_b_F.index_add_(0, idx_BK.reshape(-1).clamp_min(0), torch.where(idx_BK >= 0, grad_h_BK, 0).reshape(-1))
        grad_b = grad_b_F.to(b_dtype) if need_b else None
        grad_bias = -(W_enc_DF.to(dtype) @ grad_b_F).to(bias_dtype) if need_bias else None
    return grad_x, grad_W, grad_b, grad_bias


class SelectedPreActs(torch.autograd.Function):
    """The pre-activations h = (x - input_bias) @ W_enc + b_enc at the entries ``select(h)`` picks (padded
    idx_BK, -1 padding), with a backward that only touches those entries. ``h`` itself never leaves the
    forward (on CPU it lives in a buffer reused by the next call: :func:`pre_acts_buffer`)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, input_bias_D: Tensor | None,
                select: Callable[[Tensor], Tensor], backend: TorchBackend) -> tuple[Tensor, Tensor]:
        x_in_BD = x_BD if input_bias_D is None else x_BD - input_bias_D
        out = pre_acts_buffer(x_in_BD.shape[0], W_enc_DF.shape[1], x_in_BD.dtype) if uses_scratch(x_in_BD) else None
        h_BF = torch.addmm(b_enc_F.to(x_in_BD.dtype), x_in_BD, W_enc_DF, out=out)
        idx_BK = select(h_BF)
        h_BK = torch.where(idx_BK >= 0, h_BF.gather(1, idx_BK.clamp_min(0)), 0)
        ctx.backend = backend
        ctx.dtypes = (x_BD.dtype, W_enc_DF.dtype, b_enc_F.dtype, None if input_bias_D is None else input_bias_D.dtype)
        ctx.save_for_backward(x_in_BD, W_enc_DF, idx_BK)
        ctx.mark_non_differentiable(idx_BK)
        return h_BK, idx_BK

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_h_BK: Tensor, _grad_idx: Tensor | None) -> tuple[Tensor | None, ...]:
        x_in_BD, W_enc_DF, idx_BK = ctx.saved_tensors
        grad_h_BK = torch.where(idx_BK >= 0, grad_h_BK, 0)
        return *encoder_grads(ctx, x_in_BD, W_enc_DF, idx_BK, grad_h_BK), None, None


def to_padded(latents_BF: Tensor, support_BF: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dense latents -> (idx_BK, vals_BK) with K = max entries in any row (at least 1), -1 padding.

    The entries are the non-zeros of latents_BF, plus the positions set in ``support_BF`` when given
    (e.g. JumpReLU's threshold window, whose straight-through gradient needs d loss / d latent at zeros
    too). vals_BK is gathered from latents_BF, so gradients flow back to it at exactly those positions.
    Costs one pass over latents_BF and a device sync (K is data-dependent).
    """
    mask_BF = latents_BF != 0
    if support_BF is not None:
        mask_BF |= support_BF
    idx_BK = padded_entries(*mask_BF.nonzero(as_tuple=True), latents_BF.shape[0])
    vals_BK = torch.where(idx_BK >= 0, latents_BF.gather(1, idx_BK.clamp_min(0)), 0)
    return idx_BK, vals_BK
