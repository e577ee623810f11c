"""Sparse kernels for SAEs whose latents have at most k non-zeros per row.

Public operations (autograd-aware; the implementation is chosen per call from the device and
the environment variable ``SAE_KERNELS``):

- ``topk_encode(x_BD, W_enc_DF, b_enc_F, k, input_bias_D=None) -> (vals_BK, idx_BK)``: relu of the k
  largest pre-activations (x - input_bias) @ W_enc + b_enc of each row; its backward sends gradient only
  to the selected columns.
- ``topk_encode_sampled(x_BD, W_enc_DF, b_enc_F, k, sample_rows) -> (vals_BK, idx_BK, sample_RF)``: the same,
  plus the relu'd pre-activations of the first rows, without gradient.
- ``sparse_decode(idx_BK, vals_BK, W_dec_FD, b_dec_D) -> x_hat_BD``: sum_j vals[b,j] * W_dec[idx[b,j]] + b_dec.
  Index -1 marks padding (rows with fewer than K non-zeros).
- ``to_padded(latents_BF, support_BF=None) -> (idx_BK, vals_BK)``: the padded layout of dense latents
  with a variable number of non-zeros per row (JumpReLU, BatchTopK), differentiable in the values.
- ``selected_pre_acts(x_BD, W_enc_DF, b_enc_F, select, input_bias_D=None) -> (h_BK, idx_BK)``: the
  pre-activations at the entries a rule picks (BatchTopK's k*B over the batch, a threshold), for
  architectures whose active set is not k per row; the encoder backward touches only those entries.
- ``padded_entries(rows_N, cols_N, B) -> idx_BK``: the padded layout of (row, column) entries.
- ``select_above(h_BF, threshold) -> (idx_BK, counts_B)``: the padded layout of the entries above a
  threshold (one number, or one per column), without gradient: a ``select`` rule for ``selected_pre_acts``.

``SAE_KERNELS``: ``auto`` (default: CUDA kernels on CUDA tensors, the C++ CPU twin on CPU tensors,
pure torch where neither is built), ``torch`` (the pure-torch sparse path), ``reference`` (the eager
references in reference.py, differentiated by autograd).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from sae_core.kernels import build
from sae_core.kernels.backends import CpuBackend, CudaBackend, TorchBackend
from sae_core.kernels.ops import SelectedPreActs, SparseDecode, TopKEncode, padded_entries, to_padded
from sae_core.kernels.reference import sparse_decode_reference, topk_encode_reference

MODES = ("auto", "torch", "reference")


@functools.cache
def _cpu_backend() -> TorchBackend:
    lib = build.cpu_library()
    return TorchBackend() if lib is None else CpuBackend(lib)


@functools.cache
def _cuda_backend() -> TorchBackend:
    lib = build.cuda_library()
    return TorchBackend() if lib is None else CudaBackend(lib)


def backend_for(device: torch.device) -> TorchBackend | None:
    """The backend a call on ``device`` uses now; None means the eager reference."""
    mode = os.environ.get("SAE_KERNELS", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"SAE_KERNELS must be one of {MODES}, got {mode!r}")
    if mode == "reference":
        return None
    if mode == "torch":
        return TorchBackend()
    return _cuda_backend() if device.type == "cuda" else _cpu_backend()


def backend_name(device: torch.device | str = "cpu") -> str:
    """"reference", "torch", "cpu" (C++ twin) or "cuda": which implementation runs on ``device``."""
    backend = backend_for(torch.device(device))
    return "reference" if backend is None else backend.name


def sparse_decode(idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor) -> Tensor:
    backend = backend_for(W_dec_FD.device)
    if backend is None:
        return sparse_decode_reference(idx_BK, vals_BK, W_dec_FD, b_dec_D)
    return SparseDecode.apply(idx_BK, vals_BK, W_dec_FD, b_dec_D, backend)


def topk_encode(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int,
                input_bias_D: Tensor | None = None) -> tuple[Tensor, Tensor]:
    backend = backend_for(W_enc_DF.device)
    if backend is None:
        return topk_encode_reference(x_BD, W_enc_DF, b_enc_F, k, input_bias_D)
    return TopKEncode.apply(x_BD, W_enc_DF, b_enc_F, input_bias_D, k, backend)[:2]


def topk_encode_sampled(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int,
                        sample_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """``topk_encode`` plus relu of all the pre-activations of the first ``sample_rows`` rows [R, F] (no
    gradient), read from the encoder's own product: a caller estimating a threshold on them (a TopK
    transcoder's inference threshold) does not multiply those rows again."""
    backend = backend_for(W_enc_DF.device)
    if backend is None:
        vals_BK, idx_BK = topk_encode_reference(x_BD, W_enc_DF, b_enc_F, k)
        with torch.no_grad():
            sample_RF = torch.relu(x_BD[:sample_rows] @ W_enc_DF + b_enc_F)
        return vals_BK, idx_BK, sample_RF
    return TopKEncode.apply(x_BD, W_enc_DF, b_enc_F, None, k, backend, sample_rows)


def select_above(h_BF: Tensor, threshold: Tensor | float) -> tuple[Tensor, Tensor]:
    backend = backend_for(h_BF.device) or TorchBackend()
    return backend.select_above(h_BF, threshold)


def selected_pre_acts(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, select: Callable[[Tensor], Tensor],
                      input_bias_D: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(h_BK, idx_BK): h = (x - input_bias) @ W_enc + b_enc at the entries ``select(h_BF)`` returns (padded,
    -1 padding; chosen without gradient, and ``select`` must not keep h_BF), differentiable with a backward
    that touches only those entries."""
    backend = backend_for(W_enc_DF.device)
    if backend is None:
        h_BF = (x_BD if input_bias_D is None else x_BD - input_bias_D) @ W_enc_DF + b_enc_F
        idx_BK = select(h_BF.detach())
        return torch.where(idx_BK >= 0, h_BF.gather(1, idx_BK.clamp_min(0)), 0), idx_BK
    return SelectedPreActs.apply(x_BD, W_enc_DF, b_enc_F, input_bias_D, select, backend)


__all__ = [
    "backend_name",
    "padded_entries",
    "select_above",
    "selected_pre_acts",
    "sparse_decode",
    "sparse_decode_reference",
    "to_padded",
    "topk_encode",
    "topk_encode_sampled",
    "topk_encode_reference",
]
