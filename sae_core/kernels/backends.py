"""The three primitives every sparse operation is built from, one implementation per device.

- ``gather_sum(idx_BK, vals_BK, table_FD, bias_D)``: out[b] = sum_j vals[b,j] * table[idx[b,j]] (+ bias)
- ``row_dots(idx_BK, src_BD, table_FD)``: out[b,j] = dot(src[b], table[idx[b,j]])
- ``scatter_rows(idx_BK, vals_BK, src_BD, n_rows)``: out[f] = sum over idx[b,j] == f of vals[b,j] * src[b]
  (the transpose of gather_sum; reduced per row through a CSR view, no atomics), and ``scatter_cols``,
  the same written transposed [D, n_rows] (an encoder weight gradient in W_enc's layout)
plus ``topk(h_BF, k)`` and ``select_above(h_BF, threshold)`` (the entries above a threshold, padded).
Index -1 is padding and contributes nothing. The torch backend runs anywhere (any dtype, no compiler); the
CPU and CUDA backends call the compiled libraries for the dtypes they support and defer to it otherwise.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK_ELEMENTS = 1 << 22  # gathered rows materialised at once by the torch row_dots


class CSR(NamedTuple):
    perm_N: Tensor
    """Flat [B*K] positions of the valid entries, sorted by latent (stable: a fixed summation order)."""
    offsets_R1: Tensor
    """Entries of latent f are perm_N[offsets[f]:offsets[f+1]]."""


def csr(idx_BK: Tensor, n_rows: int) -> CSR:
    flat_N = idx_BK.reshape(-1)
    key_N = torch.where((flat_N >= 0) & (flat_N < n_rows), flat_N, n_rows)  # invalid entries sort last
    _, perm_N = torch.sort(key_N, stable=True)
    counts_R = torch.bincount(key_N, minlength=n_rows + 1)[:n_rows]
    offsets_R1 = torch.zeros(n_rows + 1, dtype=torch.int64, device=idx_BK.device)
    torch.cumsum(counts_R, 0, out=offsets_R1[1:])
    return CSR(perm_N, offsets_R1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32 whatever the storage precision."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


class TorchBackend:
    """Pure torch: embedding_bag for the gathers and (over the CSR view) for the scatter."""

    name = "torch"

    def gather_sum(self, idx_BK: Tensor, vals_BK: Tensor, table_FD: Tensor, bias_D: Tensor | None = None) -> Tensor:
        B, D = idx_BK.shape[0], table_FD.shape[1]
        cdt = compute_dtype(table_FD.dtype)
        if idx_BK.numel() == 0:
            out_BD = table_FD.new_zeros(B, D, dtype=cdt)
        else:
            weights_BK = torch.where(idx_BK >= 0, vals_BK.to(cdt), 0)
            out_BD = F.embedding_bag(idx_BK.clamp_min(0), table_FD.to(cdt), per_sample_weights=weights_BK, mode="sum")
        if bias_D is not None:
            out_BD = out_BD + bias_D.to(cdt)
        return out_BD.to(table_FD.dtype)

    def row_dots(self, idx_BK: Tensor, src_BD: Tensor, table_FD: Tensor) -> Tensor:
        B, K = idx_BK.shape
        cdt = compute_dtype(table_FD.dtype)
        out_BK = torch.zeros(B, K, dtype=cdt, device=idx_BK.device)
        step = max(1, CHUNK_ELEMENTS // max(K * table_FD.shape[1], 1))
        for s in range(0, B, step):
            rows_CKD = table_FD[idx_BK[s : s + step].clamp_min(0)].to(cdt)
            out_BK[s : s + step] = torch.bmm(rows_CKD, src_BD[s : s + step].to(cdt).unsqueeze(-1)).squeeze(-1)
        return torch.where(idx_BK >= 0, out_BK, 0).to(table_FD.dtype)

    def scatter_rows(self, idx_BK: Tensor, vals_BK: Tensor, src_BD: Tensor, n_rows: int) -> Tensor:
        K, D = idx_BK.shape[1], src_BD.shape[1]
        cdt = compute_dtype(src_BD.dtype)
        perm_N, offsets_R1 = csr(idx_BK, n_rows)
        n = int(offsets_R1[-1])
        if n == 0:
            return src_BD.new_zeros(n_rows, D)
        entries_N = perm_N[:n]
        weights_N = vals_BK.reshape(-1)[entries_N].to(cdt)
        out_RD = F.embedding_bag(entries_N // K, src_BD.to(cdt), offsets_R1[:-1], mode="sum",
                                 per_sample_weights=weights_N)
        return out_RD.to(src_BD.dtype)

    def scatter_cols(self, idx_BK: Tensor, vals_BK: Tensor, src_BD: Tensor, n_rows: int) -> Tensor:
        """``scatter_rows`` transposed: [D, n_rows], contiguous."""
        return self.scatter_rows(idx_BK, vals_BK, src_BD, n_rows).t().contiguous()

    def topk(self, h_BF: Tensor, k: int, bias_F: Tensor | None = None, densify: bool = False) -> tuple[Tensor, Tensor]:
        """The k largest of each row of h + bias (unsorted). h_BF is scratch: with ``densify`` it is left
        holding the dense latents (relu of the selected values, zeros elsewhere), otherwise unspecified."""
        if bias_F is not None:
            h_BF = h_BF.add_(bias_F)
        vals_BK, idx_BK = h_BF.topk(k, dim=-1, sorted=False)
        if densify:
            h_BF.zero_().scatter_(1, idx_BK, vals_BK.relu())
        return vals_BK, idx_BK

    def select_above(self, h_BF: Tensor, threshold: Tensor | float) -> tuple[Tensor, Tensor]:
        """(idx_BK, counts_B): the columns of each row of h with h > threshold (a number or one per column),
        in column order, padded with -1 to K = the widest row's count (at least 1); one device sync."""
        rows_N, cols_N = (h_BF > threshold).nonzero(as_tuple=True)
        counts_B = torch.bincount(rows_N, minlength=h_BF.shape[0])
        return padded_entries(rows_N, cols_N, h_BF.shape[0], counts_B), counts_B


def padded_width(counts_B: Tensor) -> int:
    """K of the padded layout: the most entries of any row, at least 1 (a host sync)."""
    return max(int(counts_B.max()) if len(counts_B) else 0, 1)


def padded_entries(rows_N: Tensor, cols_N: Tensor, n_rows: int, counts_B: Tensor | None = None) -> Tensor:
    """idx_BK (-1 padding, K = the most entries of any row, at least 1) holding column cols_N[i] in row
    rows_N[i]; rows_N must be sorted (as nonzero() returns them); ``counts_B``: each row's count, if known.
    One device sync: K depends on the data."""
    if counts_B is None:
        counts_B = torch.bincount(rows_N, minlength=n_rows)
    K = padded_width(counts_B)
    starts_B = torch.cumsum(counts_B, 0) - counts_B
    slot_N = torch.arange(len(rows_N), device=cols_N.device) - starts_B[rows_N]
    idx_BK = torch.full((n_rows, K), -1, dtype=torch.int64, device=cols_N.device)
    idx_BK[rows_N, slot_N] = cols_N
    return idx_BK


def ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class CpuBackend(TorchBackend):
    """fp32 CPU tensors go to the C++ twin (sparse_cpu.cpp); everything else to torch."""

    name = "cpu"
    TOPK_MAX_K = 256  # beyond this the heap selection loses to torch.topk's partial sort

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    @staticmethod
    def threads(work: int) -> int:
        return torch.get_num_threads() if work >= 1 << 16 else 1

    def gather_sum(self, idx_BK: Tensor, vals_BK: Tensor, table_FD: Tensor, bias_D: Tensor | None = None) -> Tensor:
        if table_FD.dtype != torch.float32 or vals_BK.dtype != torch.float32:
            return super().gather_sum(idx_BK, vals_BK, table_FD, bias_D)
        (B, K), (Fn, D) = idx_BK.shape, table_FD.shape
        idx_BK, vals_BK, table_FD = idx_BK.long().contiguous(), vals_BK.contiguous(), table_FD.contiguous()
        out_BD = torch.empty(B, D)
        self.lib.sae_cpu_gather_sum(ptr(idx_BK), ptr(vals_BK), ptr(table_FD), ptr(out_BD), B, K, Fn, D,
                                    self.threads(B * K * D))
        return out_BD if bias_D is None else out_BD.add_(bias_D)

    def row_dots(self, idx_BK: Tensor, src_BD: Tensor, table_FD: Tensor) -> Tensor:
        if table_FD.dtype != torch.float32 or src_BD.dtype != torch.float32:
            return super().row_dots(idx_BK, src_BD, table_FD)
        (B, K), (Fn, D) = idx_BK.shape, table_FD.shape
        idx_BK, src_BD, table_FD = idx_BK.long().contiguous(), src_BD.contiguous(), table_FD.contiguous()
        out_BK = torch.empty(B, K)
        self.lib.sae_cpu_row_dots(ptr(idx_BK), ptr(src_BD), ptr(table_FD), ptr(out_BK), B, K, Fn, D,
                                  self.threads(B * K * D))
        return out_BK

    def scatter_rows(self, idx_BK: Tensor, vals_BK: Tensor, src_BD: Tensor, n_rows: int) -> Tensor:
        if src_BD.dtype != torch.float32 or vals_BK.dtype != torch.float32:
            return super().scatter_rows(idx_BK, vals_BK, src_BD, n_rows)
        return self._scatter("sae_cpu_scatter_rows", idx_BK, vals_BK, src_BD, n_rows)

    def scatter_cols(self, idx_BK: Tensor, vals_BK: Tensor, src_BD: Tensor, n_rows: int) -> Tensor:
        if src_BD.dtype != torch.float32 or vals_BK.dtype != torch.float32:
            return super().scatter_cols(idx_BK, vals_BK, src_BD, n_rows)
        return self._scatter("sae_cpu_scatter_cols", idx_BK, vals_BK, src_BD, n_rows)

    def _scatter(self, fn_name: str, idx_BK: Tensor, vals_BK: Tensor, src_BD: Tensor, n_rows: int) -> Tensor:
        K, D = idx_BK.shape[1], src_BD.shape[1]
        idx_BK, vals_BK, src_BD = idx_BK.long().contiguous(), vals_BK.contiguous(), src_BD.contiguous()
        perm_N = torch.empty(idx_BK.numel(), dtype=torch.int64)
        offsets_R1 = torch.empty(n_rows + 1, dtype=torch.int64)
        self.lib.sae_cpu_csr(ptr(idx_BK), idx_BK.numel(), n_rows, ptr(perm_N), ptr(offsets_R1))
        out = torch.empty(n_rows * D)  # [n_rows, D] or its transpose: every element written
        getattr(self.lib, fn_name)(ptr(perm_N), ptr(offsets_R1), ptr(vals_BK), ptr(src_BD), ptr(out), n_rows, K, D,
                                   self.threads(idx_BK.numel() * D + n_rows * D))
        return out.view(n_rows, D) if fn_name == "sae_cpu_scatter_rows" else out.view(D, n_rows)

    def topk(self, h_BF: Tensor, k: int, bias_F: Tensor | None = None, densify: bool = False) -> tuple[Tensor, Tensor]:
        fits = 1 <= k <= min(self.TOPK_MAX_K, h_BF.shape[1]) and h_BF.is_contiguous()
        if h_BF.dtype != torch.float32 or not fits or (bias_F is not None and bias_F.dtype != torch.float32):
            return super().topk(h_BF, k, bias_F, densify)
        B, Fn = h_BF.shape
        bias_F = torch.zeros(Fn) if bias_F is None else bias_F.contiguous()
        vals_BK, idx_BK = torch.empty(B, k), torch.empty(B, k, dtype=torch.int64)
        self.lib.sae_cpu_topk(ptr(h_BF), ptr(bias_F), ptr(vals_BK), ptr(idx_BK), B, Fn, k, int(densify),
                              self.threads(B * Fn))
        return vals_BK, idx_BK

    def select_above(self, h_BF: Tensor, threshold: Tensor | float) -> tuple[Tensor, Tensor]:
        thr = torch.as_tensor(threshold, dtype=torch.float32)
        if h_BF.dtype != torch.float32 or thr.dim() > 1 or (thr.dim() == 1 and thr.shape[0] != h_BF.shape[1]):
            return super().select_above(h_BF, threshold)
        (B, Fn), h_BF, thr = h_BF.shape, h_BF.contiguous(), thr.contiguous()
        step, threads = int(thr.dim() == 1), self.threads(B * Fn)
        counts_B = torch.empty(B, dtype=torch.int64)
        self.lib.sae_cpu_count_above(ptr(h_BF), ptr(thr), step, ptr(counts_B), B, Fn, threads)
        K = padded_width(counts_B)
        idx_BK = torch.empty(B, K, dtype=torch.int64)
        self.lib.sae_cpu_select_above(ptr(h_BF), ptr(thr), step, ptr(idx_BK), B, Fn, K, threads)
        return idx_BK, counts_B


class CudaBackend(TorchBackend):
    """fp32/bf16 CUDA tensors go to sparse_cuda.cu on the current stream; topk stays torch's."""

    name = "cuda"
    DTYPES = {torch.float32: 0, torch.bfloat16: 1}

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def call(self, fn_name: str, device: torch.device, *args: object) -> None:
        with torch.cuda.device(device):  # launch on the tensors' device, on its current stream
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            err = getattr(self.lib, fn_name)(*args, stream)
        if err != 0:
            raise RuntimeError(f"{fn_name} failed with CUDA error {err}")

    def supported(self, idx_BK: Tensor, *tensors: Tensor) -> bool:
        """Same device, int64 indices, one floating dtype that the kernels are compiled for."""
        same = all(t.device == idx_BK.device and t.dtype == tensors[0].dtype for t in tensors)
        return idx_BK.is_cuda and idx_BK.dtype == torch.int64 and same and tensors[0].dtype in self.DTYPES

    def gather_sum(self, idx_BK: Tensor, vals_BK: Tensor, table_FD: Tensor, bias_D: Tensor | None = None) -> Tensor:
        extra = () if bias_D is None else (bias_D,)
        if not self.supported(idx_BK, table_FD, vals_BK, *extra):
            return super().gather_sum(idx_BK, vals_BK, table_FD, bias_D)
        (B, K), (Fn, D) = idx_BK.shape, table_FD.shape
        idx_BK, vals_BK, table_FD = idx_BK.long().contiguous(), vals_BK.contiguous(), table_FD.contiguous()
        bias_D = None if bias_D is None else bias_D.contiguous()  # held until the launch is queued
        bias_ptr = ctypes.c_void_p(None) if bias_D is None else ptr(bias_D)
        out_BD = table_FD.new_empty(B, D)
        self.call("sae_cuda_gather_sum", idx_BK.device, self.DTYPES[table_FD.dtype], ptr(idx_BK), ptr(vals_BK),
                  ptr(table_FD), bias_ptr, ptr(out_BD), B, K, Fn, D)
        return out_BD

    def row_dots(self, idx_BK: Tensor, src_BD: Tensor, table_FD: Tensor) -> Tensor:
        if not self.supported(idx_BK, table_FD, src_BD):
            return super().row_dots(idx_BK, src_BD, table_FD)
        (B, K), (Fn, D) = idx_BK.shape, table_FD.shape
        idx_BK, src_BD, table_FD = idx_BK.long().contiguous(), src_BD.contiguous(), table_FD.contiguous()
        out_BK = table_FD.new_empty(B, K)
        self.call("sae_cuda_row_dots", idx_BK.device, self.DTYPES[table_FD.dtype], ptr(idx_BK), ptr(src_BD),
                  ptr(table_FD), ptr(out_BK), B, K, Fn, D)
        return out_BK

    def scatter_rows(self, idx_BK: Tensor, vals_BK: Tensor, src_BD: Tensor, n_rows: int) -> Tensor:
        if not self.supported(idx_BK, src_BD, vals_BK):
            return super().scatter_rows(idx_BK, vals_BK, src_BD, n_rows)
        return self._scatter(idx_BK, vals_BK, src_BD, n_rows, transposed=False)

    def scatter_cols(self, idx_BK: Tensor, vals_BK: Tensor, src_BD: Tensor, n_rows: int) -> Tensor:
        if not self.supported(idx_BK, src_BD, vals_BK):
            return super().scatter_cols(idx_BK, vals_BK, src_BD, n_rows)
        return self._scatter(idx_BK, vals_BK, src_BD, n_rows, transposed=True)

    def _scatter(self, idx_BK: Tensor, vals_BK: Tensor, src_BD: Tensor, n_rows: int, transposed: bool) -> Tensor:
        K, D = idx_BK.shape[1], src_BD.shape[1]
        perm_N, offsets_R1 = csr(idx_BK, n_rows)
        vals_BK, src_BD = vals_BK.contiguous(), src_BD.contiguous()
        out = src_BD.new_empty(D, n_rows) if transposed else src_BD.new_empty(n_rows, D)
        self.call("sae_cuda_scatter_rows", idx_BK.device, self.DTYPES[src_BD.dtype], ptr(perm_N), ptr(offsets_R1),
                  ptr(vals_BK), ptr(src_BD), ptr(out), n_rows, K, D, int(transposed))
        return out
