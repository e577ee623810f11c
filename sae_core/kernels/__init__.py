"""Sparse kernels for SAEs whose latents have at most k non-zeros per row.

Public operations (autograd-aware; the implementation is chosen by device, and
``SAE_KERNELS=reference`` forces the eager reference):

- ``topk_encode(x_BD, W_enc_DF, b_enc_F, k) -> (vals_BK, idx_BK)``: relu of the k largest
  pre-activations of each row; its backward sends gradient only to the selected columns.
- ``sparse_decode(idx_BK, vals_BK, W_dec_FD, b_dec_D) -> x_hat_BD``: sum_j vals[b,j] * W_dec[idx[b,j]] + b_dec.
  Index -1 marks padding (rows with fewer than K non-zeros).
"""

from sae_core.kernels.reference import sparse_decode_reference, topk_encode_reference

sparse_decode = sparse_decode_reference
topk_encode = topk_encode_reference

__all__ = ["sparse_decode", "topk_encode", "sparse_decode_reference", "topk_encode_reference"]
