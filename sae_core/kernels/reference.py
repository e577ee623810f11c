"""Eager references for the sparse kernels: plain torch, differentiated by autograd."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_encode_reference(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, k: int,
                          input_bias_D: Tensor | None = None) -> tuple[Tensor, Tensor]:
    x_in_BD = x_BD if input_bias_D is None else x_BD - input_bias_D
    h_BF = x_in_BD @ W_enc_DF + b_enc_F
    vals_BK, idx_BK = h_BF.topk(k, dim=-1, sorted=False)
    return torch.relu(vals_BK), idx_BK


def sparse_decode_reference(idx_BK: Tensor, vals_BK: Tensor, W_dec_FD: Tensor, b_dec_D: Tensor) -> Tensor:
    valid_BK = idx_BK >= 0
    rows_BKD = W_dec_FD[idx_BK.clamp_min(0)]
    weights_BK = torch.where(valid_BK, vals_BK, torch.zeros_like(vals_BK))
    return (weights_BK.unsqueeze(-1) * rows_BKD).sum(dim=1) + b_dec_D
