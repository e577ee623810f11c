"""Crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing"):
one dictionary that reads from and writes to several sources (hooks, layers, or one layer of two models).

    h = sum_s (x_s - b_dec_s * apply_b_dec_to_input) @ W_enc[s] + b_enc      x [B, S, D], W_enc [S, D, F]
    f = relu(h)  or  topk(h)
    x_hat_s = f @ W_dec[:, s] + b_dec[s]                                    W_dec [F, S, D], b_dec [S, D]

ReLU uses the summed-decoder-norm penalty ``l1_coefficient * mean_b sum_i f_bi * sum_s ||W_dec[i, s]|| / D``
(relu.py's convention, with the sum over sources as the crosscoder paper's L1-of-norms); TopK has no
penalty, and its decoder rows (all sources together) are kept at unit norm. With ``n_sources == 1`` the
module also takes and returns [B, D] (it is then exactly a ReLU / TopK SAE), which is how the registry's
generic tests see it.

Saving: a documented extension of the SAELens folder — ``architecture: "crosscoder"``, cfg.json adds
``n_sources`` and ``activation`` (and ``k`` for topk); tensors W_enc [S, D, F], b_enc [F], W_dec
[F, S, D], b_dec [S, D]. ``d_in`` is the width of one source. The forward above is the spec. One scaling
factor serves every source (the trainer normalises rows of all sources together).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sae_core import kernels
from sae_core.architectures.base import (
    ActiveLatents,
    SAEConfig,
    SAEOutput,
    SparseAutoencoder,
    Wiring,
    mse_loss,
    require,
)
from sae_core.architectures.common import PathChoice, require_choice
from sae_core.architectures.relu import active_weighted_l1, weighted_l1
from sae_core.architectures.topk import topk_dense
from sae_core.l0 import TargetL0Fields
from sae_core.registry import register


@dataclass(kw_only=True)
class CrosscoderConfig(TargetL0Fields, SAEConfig):
    n_sources: int = 1
    """Number of sources S; inputs are [B, S, d_in] ([B, d_in] accepted when S == 1)."""
    activation: str = "relu"
    """relu (summed-decoder-norm L1) or topk."""
    k: int = 32
    """topk: latents active per token (set from ``target_l0`` when that is given)."""
    l1_coefficient: float = 1.0
    """relu: weight of the summed-decoder-norm L1 penalty."""
    normalize_decoder: bool = False
    """Keep each latent's whole decoder row (all sources) at unit norm; forced on for topk."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.n_sources, int) and self.n_sources >= 1, f"n_sources must be >= 1, got {self.n_sources!r}")
        require_choice(self.activation, ("relu", "topk"), "activation")
        require(isinstance(self.k, int) and 1 <= self.k <= self.d_sae, f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        require(self.l1_coefficient >= 0, f"l1_coefficient must be >= 0, got {self.l1_coefficient}")
        if self.target_l0 is not None and self.activation == "topk":
            self.k = self.target_as_k()
        if self.activation == "topk":
            self.normalize_decoder = True

    def controlled_target(self) -> float | None:
        return self.target_l0 if self.activation == "relu" else None


class Crosscoder(SparseAutoencoder):
    saelens_architecture = "crosscoder"
    wiring = Wiring.STACKED
    cfg: CrosscoderConfig

    def __init__(self, cfg: CrosscoderConfig):
        super().__init__(cfg)
        S, D, F = cfg.n_sources, cfg.d_in, cfg.d_sae
        W_dec_FSD = torch.randn(F, S, D)
        W_dec_FSD *= cfg.init_scale / W_dec_FSD.flatten(1).norm(dim=1)[:, None, None]
        self.W_dec = nn.Parameter(W_dec_FSD)
        self.W_enc = nn.Parameter(W_dec_FSD.permute(1, 2, 0).contiguous())  # row-major, as its gradient
        self.b_dec = nn.Parameter(torch.zeros(S, D))
        self.path = PathChoice()

    @property
    def homogeneous(self) -> bool:  # type: ignore[override]
        # TopK compares latents with each other, so decoder norms may only be folded for relu.
        return self.cfg.activation == "relu"

    def saelens_cfg_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"n_sources": self.cfg.n_sources, "activation": self.cfg.activation}
        if self.cfg.activation == "topk":
            extra["k"] = self.cfg.k
        return extra

    # -- layout: [B, D] is [B, 1, D] when there is one source --------------------------------------
    def _sources(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and self.cfg.n_sources == 1:
            return x[:, None, :]
        if x.dim() != 3 or x.shape[1:] != (self.cfg.n_sources, self.cfg.d_in):
            raise ValueError(f"crosscoder expects [B, {self.cfg.n_sources}, {self.cfg.d_in}], got {tuple(x.shape)}")
        return x

    def _layout(self, x_BSD: Tensor) -> Tensor:
        return x_BSD[:, 0, :] if self.cfg.n_sources == 1 else x_BSD

    # -- the forward path -------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        x_BSD = self._sources(x)
        if self.cfg.apply_b_dec_to_input:
            x_BSD = x_BSD - self.b_dec
        return torch.einsum("bsd,sdf->bf", x_BSD, self.W_enc) + self.b_enc

    def activation(self, h_BF: Tensor) -> Tensor:
        return torch.relu(h_BF) if self.cfg.activation == "relu" else topk_dense(h_BF, self.cfg.k)

    def decode(self, latents_BF: Tensor) -> Tensor:
        return self._layout(torch.einsum("bf,fsd->bsd", latents_BF, self.W_dec) + self.b_dec)

    def source_decoder_norms(self) -> Tensor:
        """||W_dec[i, s]|| [F, S]."""
        return self.W_dec.norm(dim=2)

    def decoder_norms(self) -> Tensor:
        """sum_s ||W_dec[i, s]|| [F]: the weights of the crosscoder L1 penalty."""
        return self.source_decoder_norms().sum(dim=1)

    def sparsity_loss(self, latents_BF: Tensor, h_BF: Tensor) -> Tensor:
        if self.cfg.activation == "topk":
            return latents_BF.new_zeros(())
        return self.cfg.l1_coefficient * weighted_l1(latents_BF, self.decoder_norms(), self.cfg.d_in)

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        """Sparse for topk, and for relu in training while few latents fire; dense otherwise."""
        topk = self.cfg.activation == "topk"
        if topk or (self.training and self.path.sparse()):
            return self.sparse_forward(x_BD)
        h_BF = self.pre_acts(x_BD)
        latents_BF = self.activation(h_BF)
        x_hat = self.decode(latents_BF)
        zero = x_hat.new_zeros(())
        self.path.observe(latents_BF)
        return SAEOutput(x_hat, latents_BF, mse_loss(x_hat, x_BD), self.sparsity_loss(latents_BF, h_BF), zero)

    def sparse_forward(self, x: Tensor) -> SAEOutput:
        """The sources read as one input of width S*D (W_enc [S, D, F] is [S*D, F], W_dec [F, S, D] is
        [F, S*D]), so the flat SAE's sparse kernels apply unchanged."""
        x_BSD = self._sources(x)
        B, F = x_BSD.shape[0], self.cfg.d_sae
        x_BN, W_enc_NF, W_dec_FN = x_BSD.reshape(B, -1), self.W_enc.reshape(-1, F), self.W_dec.reshape(F, -1)
        input_bias_N = self.b_dec.reshape(-1) if self.cfg.apply_b_dec_to_input else None
        if self.cfg.activation == "topk":
            vals_BK, idx_BK = kernels.topk_encode(x_BN, W_enc_NF, self.b_enc, self.cfg.k, input_bias_N)
        else:
            h_BK, idx_BK = kernels.selected_pre_acts(x_BN, W_enc_NF, self.b_enc,
                                                     lambda h: self.path.entries_above(h, 0.0), input_bias_N)
            vals_BK = torch.relu(h_BK)
        active = ActiveLatents(idx_BK, vals_BK, F)
        x_hat = self._layout(kernels.sparse_decode(idx_BK, vals_BK, W_dec_FN, self.b_dec.reshape(-1)).view_as(x_BSD))
        zero = x_hat.new_zeros(())
        sparsity = zero
        if self.cfg.activation != "topk":
            sparsity = self.cfg.l1_coefficient * active_weighted_l1(active, self.decoder_norms(), self.cfg.d_in)
        return SAEOutput(x_hat, None, mse_loss(x_hat, x), sparsity, zero, active=active)

    # -- training mechanics: a latent's decoder row is [S, D] -------------------------------------
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        if self.cfg.normalize_decoder:
            self.W_dec /= self.W_dec.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if not self.cfg.normalize_decoder or self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
        parallel_F = (self.W_dec.grad * unit).flatten(1).sum(dim=1)
        self.W_dec.grad -= parallel_F[:, None, None] * unit

    @torch.no_grad()
    def init_encoder_from_decoder(self) -> None:
        self.W_enc.copy_(self.W_dec.permute(1, 2, 0))


class CrosscoderReport(NamedTuple):
    norms_FS: Tensor
    """Decoder norm of each latent in each source."""
    fractions_FS: Tensor
    """norms / their sum over sources: 1/S for a perfectly shared latent, 1 in its source for a specific one."""
    labels: list[str]
    """Per latent: "shared", "specific:<s>", "mixed", or "dead" (zero decoder)."""
    counts: dict[str, int]
    """How many latents carry each label."""


def shared_specific_report(crosscoder: Crosscoder, *, specific_fraction: float = 0.9,
                           shared_fraction: float = 0.5, alive_F: Tensor | None = None) -> CrosscoderReport:
    """Classify latents by how their decoder norm splits across sources (the "relative decoder norm" of
    model-diffing crosscoders): specific to s when source s holds >= ``specific_fraction`` of the summed
    norm; shared when every source holds >= ``shared_fraction`` of its fair share 1/S; mixed otherwise.
    ``alive_F`` (e.g. latents that fired on held-out data) marks the rest "dead"."""
    with torch.no_grad():
        norms_FS = crosscoder.source_decoder_norms().detach().float().cpu()
        total_F = norms_FS.sum(dim=1)
        fractions_FS = norms_FS / total_F.clamp_min(1e-12)[:, None]
    S = norms_FS.shape[1]
    alive = (total_F > 1e-8) if alive_F is None else alive_F.cpu().bool() & (total_F > 1e-8)
    labels: list[str] = []
    for i in range(norms_FS.shape[0]):
        top_s = int(fractions_FS[i].argmax())
        if not bool(alive[i]):
            labels.append("dead")
        elif float(fractions_FS[i, top_s]) >= specific_fraction:
            labels.append(f"specific:{top_s}")
        elif float(fractions_FS[i].min()) >= shared_fraction / S:
            labels.append("shared")
        else:
            labels.append("mixed")
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return CrosscoderReport(norms_FS, fractions_FS, labels, counts)


register("crosscoder", CrosscoderConfig, Crosscoder,
         "Crosscoder: one dictionary over several sources (layers or models), summed-decoder-norm L1 or TopK")
