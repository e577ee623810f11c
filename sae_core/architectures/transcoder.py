"""Transcoder (Dunefsky et al. 2024; Paulo et al. 2025): a sparse map from one hook's activation (the
MLP input) to another's (the MLP output), with any of the project's sparsity activations.

    h = x @ W_enc + b_enc                 x [B, d_in]   (the encoder never subtracts b_dec: it is [d_out])
    f = activation(h)                     topk | batchtopk | jumprelu | relu (the modules' own functions)
    y_hat = f @ W_dec + b_dec             y [B, d_out]

The target is passed as ``forward(x, target_BO=y)``; without one it is x itself, so with d_out == d_in
(the default) a transcoder degenerates to an SAE on one hook and every registry test applies. With
d_out != d_in and no target, inference still returns y_hat (its ``mse`` is then 0: nothing to compare).

Saving (SAELens transcoder layouts): relu -> ``transcoder``, jumprelu -> ``jumprelu_transcoder``.
TopK and BatchTopK have no SAELens transcoder layout; they are saved as ``jumprelu_transcoder`` with
one global inference threshold, an EMA over training steps of the (k*b)-th largest relu'd
pre-activation of b = 256 rows of the batch (for batchtopk: the smallest activation the batch kept,
as in batchtopk.py). That
JumpReLU keeps, on data like the training data, k latents per token *on average* — the BatchTopK
inference rule — so it approximates the TopK encoder: tokens get a variable number of latents and
the exact top-k set is not reproduced. In eval mode the module itself uses that threshold, so the
saved folder and the in-memory module agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from sae_core import kernels
from sae_core.architectures.base import (
    ActiveLatents,
    Reducer,
    SAEConfig,
    SAEOutput,
    SparseAutoencoder,
    Wiring,
    mse_loss,
    no_reduce,
    require,
)
from sae_core.architectures.batchtopk import batch_topk, batch_topk_entries, padded_sparse_decode, top_entries
from sae_core.architectures.common import (
    JumpReLUFields,
    KSparsityFields,
    PathChoice,
    ThresholdEMAFields,
    log_threshold_to_saved,
    require_choice,
    saved_to_log_threshold,
    update_threshold_ema,
)
from sae_core.architectures.jumprelu import at_selected, jumprelu, jumprelu_sparsity, thresholds_for_target
from sae_core.architectures.relu import active_weighted_l1, weighted_l1
from sae_core.architectures.topk import auxk_term, topk_dense
from sae_core.l0 import TargetL0Fields
from sae_core.registry import register

ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")
THRESHOLD_SAMPLE_ROWS = 256
"""Rows of each batch a TopK transcoder estimates its inference threshold on."""


@dataclass(kw_only=True)
class TranscoderConfig(TargetL0Fields, KSparsityFields, ThresholdEMAFields, JumpReLUFields, SAEConfig):
    """k, aux_k, aux_coefficient and threshold_momentum serve topk/batchtopk; l0_coefficient, bandwidth
    and init_threshold serve jumprelu; l1_coefficient serves relu. ``target_l0`` goes through the
    activation: it sets k for topk/batchtopk, the target loss for jumprelu, the controller for relu."""

    d_out: int | None = None
    """Width of the target (the MLP output); None means d_in."""
    activation: str = "topk"
    """Sparsity activation: topk, batchtopk, jumprelu or relu (each with its knobs below)."""
    apply_b_dec_to_input: bool = False
    """Must stay False: b_dec lives in the output space."""
    l1_coefficient: float = 1.0
    """relu: weight of the decoder-norm-weighted L1 penalty (relu.py's convention, divided by d_out)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_out is None:
            self.d_out = self.d_in
        require(isinstance(self.d_out, int) and self.d_out > 0, f"d_out must be a positive integer, got {self.d_out!r}")
        require_choice(self.activation, ACTIVATIONS, "activation")
        require(not self.apply_b_dec_to_input, "apply_b_dec_to_input must be False for a transcoder (b_dec is [d_out])")
        require(self.l1_coefficient >= 0, f"l1_coefficient must be >= 0, got {self.l1_coefficient}")
        if self.target_l0 is not None and self.activation in ("topk", "batchtopk"):
            self.k = self.target_as_k()

    def controlled_target(self) -> float | None:
        return self.target_l0 if self.activation == "relu" else None


class Transcoder(SparseAutoencoder):
    homogeneous = True
    wiring = Wiring.PAIR
    cfg: TranscoderConfig
    skip = False
    """Whether the module has a linear skip path W_skip [d_out, d_in] (skip_transcoder.py)."""

    def __init__(self, cfg: TranscoderConfig):
        super().__init__(cfg)
        d_out = cfg.d_out
        if d_out != cfg.d_in:
            W_dec_FO = torch.randn(cfg.d_sae, d_out)
            W_dec_FO *= cfg.init_scale / W_dec_FO.norm(dim=1, keepdim=True)
            self.W_dec = nn.Parameter(W_dec_FO)
            # A random encoder with unit columns: W_dec.T has the wrong shape to initialise it.
            self.W_enc = nn.Parameter(nn.functional.normalize(torch.randn(cfg.d_in, cfg.d_sae), dim=0))
            self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))
        elif cfg.activation in ("topk", "batchtopk"):
            self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, cfg.d_in))
        self._batch_threshold: Tensor | None = None
        self.path = PathChoice()

    # -- SAELens naming ---------------------------------------------------------------------------
    @property
    def saelens_architecture(self) -> str:  # type: ignore[override]
        base = "skip_transcoder" if self.skip else "transcoder"
        return base if self.cfg.activation == "relu" else f"jumprelu_{base}"

    def saelens_cfg_extra(self) -> dict[str, Any]:
        return {"d_out": self.cfg.d_out}

    @property
    def d_out(self) -> int:
        return int(self.cfg.d_out)

    # -- the forward path -------------------------------------------------------------------------
    def activation(self, h_BF: Tensor) -> Tensor:
        act = self.cfg.activation
        if act == "relu":
            return torch.relu(h_BF)
        if act == "jumprelu":
            return jumprelu(h_BF, self.log_threshold.exp(), self.cfg.bandwidth)
        if not self.training:
            return torch.relu(h_BF) * (h_BF > self.threshold)
        return topk_dense(h_BF, self.cfg.k) if act == "topk" else batch_topk(h_BF, self.cfg.k)

    def skip_term(self, x_BD: Tensor) -> Tensor | float:
        """x @ W_skip.T for the skip variant, 0 otherwise; the output is decode(encode(x)) + skip_term(x)."""
        return x_BD @ self.W_skip.T if self.skip else 0.0

    def sparsity_loss(self, latents_BF: Tensor, h_BF: Tensor) -> Tensor:
        if self.cfg.activation == "relu":
            return self.cfg.l1_coefficient * weighted_l1(latents_BF, self.decoder_norms(), self.cfg.d_out)
        if self.cfg.activation == "jumprelu":
            return jumprelu_sparsity(h_BF, self.log_threshold.exp(), self.cfg)
        return latents_BF.new_zeros(())

    def active_sparsity(self, active: ActiveLatents, h_BK: Tensor | None) -> Tensor:
        """:meth:`sparsity_loss` of the sparse path from its selected entries (no [B, F]); ``h_BK``: their
        pre-activations (None for TopK)."""
        if self.cfg.activation == "relu":
            return self.cfg.l1_coefficient * active_weighted_l1(active, self.decoder_norms(), self.cfg.d_out)
        if self.cfg.activation == "jumprelu":
            return jumprelu_sparsity(*at_selected(h_BK, active.idx_BK, self.log_threshold.exp()), self.cfg)
        return active.vals_BK.new_zeros(())

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None, target_BO: Tensor | None = None) -> SAEOutput:
        y_BO = x_BD if target_BO is None else target_BO
        if target_BO is None and self.cfg.d_out != self.cfg.d_in and self.training:
            raise ValueError(f"this transcoder maps d_in={self.cfg.d_in} to d_out={self.cfg.d_out}: training needs the "
                             "target, forward(x, target_BO=y)")
        act, batchwise = self.cfg.activation, self.training and self.cfg.activation in ("topk", "batchtopk")
        active, h_BF, h_BK = None, None, None
        if batchwise or (self.training and self.path.sparse()):  # the sparse kernels: no dense decode
            active, h_BK = self._sparse_active(x_BD)
            latents_BF = None
            y_hat_BO = kernels.sparse_decode(active.idx_BK, active.vals_BK, self.W_dec, self.b_dec)
        else:
            h_BF = self.pre_acts(x_BD)
            latents_BF = self.activation(h_BF)
            if act == "jumprelu":  # the straight-through window below theta needs d loss / d latent at zeros too
                window_BF = h_BF.detach() > (self.log_threshold.exp() - self.cfg.bandwidth / 2).detach()
                y_hat_BO = kernels.sparse_decode(*kernels.to_padded(latents_BF, window_BF), self.W_dec, self.b_dec)
            else:
                y_hat_BO = padded_sparse_decode(latents_BF, self.W_dec, self.b_dec) if act != "relu" else self.decode(latents_BF)
            if self.training:
                self.path.observe(latents_BF)
        y_hat_BO = y_hat_BO + self.skip_term(x_BD)
        if y_BO.shape != y_hat_BO.shape:  # inference without a target: nothing to measure the error against
            y_BO = y_hat_BO.detach()
        aux = auxk_term(self, x_BD, y_hat_BO, dead_mask_F, target_BD=y_BO) if batchwise else y_hat_BO.new_zeros(())
        if batchwise:
            sparsity = aux.new_zeros(())
        elif latents_BF is None:
            sparsity = self.active_sparsity(active, h_BK)
        else:
            sparsity = self.sparsity_loss(latents_BF, h_BF)
        return SAEOutput(y_hat_BO, latents_BF, mse_loss(y_hat_BO, y_BO), sparsity, aux, active=active)

    def _sparse_active(self, x_BD: Tensor) -> tuple[ActiveLatents, Tensor | None]:
        """The training step's active latents without a dense decode (and the selected entries' pre-activations
        when the rule selected them): TopK through its fused kernel; BatchTopK, ReLU and JumpReLU (the active
        entries and the straight-through window) selected on the pre-activations with a sparse encoder
        backward. Sets the batch's threshold estimate for the TopK family."""
        act, F = self.cfg.activation, self.cfg.d_sae
        if act == "topk":
            rows = min(len(x_BD), THRESHOLD_SAMPLE_ROWS)
            vals_BK, idx_BK, sample_RF = kernels.topk_encode_sampled(x_BD, self.W_enc, self.b_enc, self.cfg.k, rows)
            self._batch_threshold = self._sampled_threshold(sample_RF)
            return ActiveLatents(idx_BK, vals_BK, F), None
        if act == "batchtopk":
            select = partial(batch_topk_entries, k=self.cfg.k)
        elif act == "relu":
            select = lambda h: self.path.entries_above(h, 0.0)  # noqa: E731
        else:
            theta_F = self.log_threshold.exp()
            lowest_F = (theta_F - self.cfg.bandwidth / 2).detach()
            select = lambda h: self.path.entries_above(h, lowest_F)  # noqa: E731
        h_BK, idx_BK = kernels.selected_pre_acts(x_BD, self.W_enc, self.b_enc, select)
        if act == "jumprelu":
            vals_BK = jumprelu(h_BK, theta_F[idx_BK.clamp_min(0)], self.cfg.bandwidth)
        else:
            vals_BK = torch.relu(h_BK)
        if act == "batchtopk":  # BatchTopK's own rule: the smallest activation it kept (inf: none, ignored)
            kept_BK = vals_BK.detach()
            self._batch_threshold = torch.where(kept_BK > 0, kept_BK, torch.inf).min()
        return ActiveLatents(idx_BK, vals_BK, F), h_BK

    @torch.no_grad()
    def _sampled_threshold(self, sample_RF: Tensor) -> Tensor:
        """The (k*b)-th largest of the relu'd pre-activations ``sample_RF`` of the batch's first b rows (the
        batch is shuffled): the same quantile as over the whole batch, at a fraction of the cost of a dense
        [B, F] pass."""
        flat_N = sample_RF.flatten()
        return flat_N[top_entries(flat_N, min(self.cfg.k * len(sample_RF), flat_N.numel()), min_n=1024)].min()

    @torch.no_grad()
    def update_running_stats(self, out: SAEOutput, reduce: Reducer = no_reduce) -> None:
        """Fold this step's (k*B)-th largest pre-activation (min over ranks) into the threshold EMA."""
        if not self.training or self.cfg.activation not in ("topk", "batchtopk"):
            return
        estimate, self._batch_threshold = self._batch_threshold, None
        update_threshold_ema(self.threshold, estimate, self.cfg.threshold_momentum, reduce)

    @torch.no_grad()
    def init_encoder_from_decoder(self) -> None:
        if self.cfg.d_out == self.cfg.d_in:
            super().init_encoder_from_decoder()

    def lr_scales(self) -> dict[str, float]:
        """Holding ``target_l0``, the thresholds train faster than the rest (``target_l0_threshold_lr``)."""
        return {"log_threshold": self.cfg.target_l0_threshold_lr} if self.cfg.activation == "jumprelu" and self.cfg.target_l0 is not None else {}

    def init_from_sample(self, x_ND: Tensor, reduce: Reducer = no_reduce, world_size: int = 1) -> None:
        """A jumprelu activation with ``target_l0`` starts at the target, as jumprelu.py's SAE does."""
        if self.cfg.activation == "jumprelu" and self.cfg.target_l0 is not None:
            self.log_threshold.data.copy_(thresholds_for_target(self, x_ND, self.cfg.target_l0, reduce, world_size))

    # -- saving: SAELens stores the JumpReLU threshold itself -------------------------------------
    def inference_tensors(self) -> dict[str, Tensor]:
        return log_threshold_to_saved(super().inference_tensors())

    def inference_to_state(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return saved_to_log_threshold(tensors) if self.cfg.activation == "jumprelu" else tensors


register("transcoder", TranscoderConfig, Transcoder,
         "Transcoder: sparse map from one hook to another (MLP in -> out), any sparsity activation")
