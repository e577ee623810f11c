"""What every architecture shares: the config base, the output type, and the SAE module base.

Conventions (x is a row vector, as in SAELens):
    h = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      pre-activations  [B, F]
    f = activation(h)                                           latents          [B, F]
    x_hat = f @ W_dec + b_dec                                   reconstruction   [B, D]
The reconstruction loss ``mse`` is the mean over elements of (x_hat - x)^2, so sparsity
coefficients do not depend on d_in when inputs are normalised to mean squared norm d_in.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sae_core.config import ConfigError, require, strict_from_dict

__all__ = ["ConfigError", "Reducer", "SAEConfig", "SAEOutput", "SparseAutoencoder", "Wiring", "mse_loss",
           "no_reduce", "require"]

# A reducer sums or takes the min/max of a tensor across data-parallel ranks; identity when single-process.
Reducer = Callable[[Tensor, str], Tensor]


def no_reduce(t: Tensor, op: str) -> Tensor:
    return t


class Wiring(enum.Enum):
    """What a dictionary reads from a model and writes back: the contract between an architecture and
    the code that feeds, trains and evaluates it. Each architecture declares one (``SparseAutoencoder.wiring``).
    """

    SITE = "site"
    """Reads one site's activations [B, d_in] and reconstructs them; spliced back at that site."""
    PAIR = "pair"
    """Reads an input site [B, d_in] and predicts an output site [B, d_out] (config field ``d_out``);
    spliced in place of the output site (a transcoder: MLP in -> MLP out)."""
    STACKED = "stacked"
    """Reads S sites of one width stacked [B, S, d_in] and reconstructs each (config field ``n_sources``);
    it rewrites several sites at once, so it is not spliced: evaluated per site."""

    @property
    def derived_field(self) -> str | None:
        """The config field a data source sets besides ``d_in``: the output width or the number of sites."""
        return {Wiring.SITE: None, Wiring.PAIR: "d_out", Wiring.STACKED: "n_sources"}[self]

    @property
    def splices(self) -> bool:
        """Whether one reconstruction can stand in for one site of the model (evaluation, end-to-end)."""
        return self is not Wiring.STACKED


@dataclass(kw_only=True)
class SAEConfig:
    """Fields every architecture has. Subclasses add their own, each with a docstring."""

    arch: ClassVar[str] = ""

    d_in: int
    """Width of the activations the SAE reads (d_model for a residual hook)."""
    d_sae: int
    """Number of latents in the dictionary."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens's flag of the same name)."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm during training (renormalise after each step, project gradients)."""
    init_scale: float = 1.0
    """Norm of the decoder rows at initialisation."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.init_scale <= 0:
            raise ConfigError(f"init_scale must be > 0, got {self.init_scale}")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SAEConfig:
        raw = dict(raw)
        arch = raw.pop("arch", cls.arch)
        if arch != cls.arch:
            raise ConfigError(f"config is for architecture {arch!r}, not {cls.arch!r}")
        return strict_from_dict(cls, raw, f"architecture {cls.arch!r}")

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


class SAEOutput(NamedTuple):
    x_hat_BD: Tensor
    """Reconstruction of the input."""
    latents_BF: Tensor
    """Latent activations (dense layout)."""
    mse: Tensor
    """Reconstruction loss: mean over elements of (x_hat - x)^2."""
    sparsity: Tensor
    """Sparsity penalty, its coefficient applied (zero for TopK-style architectures)."""
    aux: Tensor
    """Auxiliary losses (AuxK, gated aux reconstruction, matryoshka prefixes, ...), weighted."""

    def loss(self, sparsity_scale: float = 1.0) -> Tensor:
        """Total loss; ``sparsity_scale`` in [0, 1] is the trainer's sparsity warm-up."""
        return self.mse + sparsity_scale * self.sparsity + self.aux


def mse_loss(x_hat_BD: Tensor, x_BD: Tensor) -> Tensor:
    return (x_hat_BD - x_BD).pow(2).mean()


class SparseAutoencoder(nn.Module):
    """Base SAE: parameters named as SAELens names them (W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D])."""

    arch: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = "standard"
    """The SAELens ``architecture`` string this SAE is saved as."""
    homogeneous: ClassVar[bool] = True
    """activation(c*h) == c*activation(h) per latent for c > 0, so decoder norms can be folded at save."""
    max_active: ClassVar[str | None] = None
    """Config field bounding the latents active per row (e.g. "k"), for sparse kernels; None if unbounded."""
    wiring: ClassVar[Wiring] = Wiring.SITE
    """What the dictionary reads and writes (see :class:`Wiring`)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        W_dec_FD = torch.randn(cfg.d_sae, cfg.d_in)
        W_dec_FD *= cfg.init_scale / W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        if getattr(cfg, "tied", False):
            self.register_parameter("W_enc", None)  # the encoder is W_dec.T
        else:
            self.W_enc = nn.Parameter(W_dec_FD.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    # -- the forward path -------------------------------------------------------------------------
    def encoder_input(self, x_BD: Tensor) -> Tensor:
        return x_BD - self.b_dec if self.cfg.apply_b_dec_to_input else x_BD

    def encoder_weight(self) -> Tensor:
        """W_enc [D, F]; the decoder's transpose when weights are tied."""
        return self.W_dec.T if self.W_enc is None else self.W_enc

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        return self.encoder_input(x_BD) @ self.encoder_weight() + self.b_enc

    def activation(self, h_BF: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.activation(self.pre_acts(x_BD))

    def decode(self, latents_BF: Tensor) -> Tensor:
        return latents_BF @ self.W_dec + self.b_dec

    def sparsity_loss(self, latents_BF: Tensor, h_BF: Tensor) -> Tensor:
        return latents_BF.new_zeros(())

    def aux_loss(self, x_BD: Tensor, out: SAEOutput, h_BF: Tensor, dead_mask_F: Tensor | None) -> Tensor:
        return x_BD.new_zeros(())

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        h_BF = self.pre_acts(x_BD)
        latents_BF = self.activation(h_BF)
        x_hat_BD = self.decode(latents_BF)
        zero = x_BD.new_zeros(())
        out = SAEOutput(x_hat_BD, latents_BF, mse_loss(x_hat_BD, x_BD), self.sparsity_loss(latents_BF, h_BF), zero)
        return out._replace(aux=self.aux_loss(x_BD, out, h_BF, dead_mask_F))

    # -- training mechanics -----------------------------------------------------------------------
    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        if self.cfg.normalize_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the radial part of W_dec's gradient so Adam does not fight the renormalisation."""
        if not self.cfg.normalize_decoder or self.W_dec.grad is None:
            return
        unit_FD = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        parallel_F = (self.W_dec.grad * unit_FD).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel_F * unit_FD

    @property
    def d_out(self) -> int:
        """Width of what the SAE writes (a PAIR wiring's output site; d_in otherwise)."""
        return self.cfg.d_in

    def resample_interval(self) -> int:
        """Steps between resamplings of dead latents (``resample_dead``); 0: this SAE never resamples."""
        return 0

    def resample_dead(self, dead_mask_F: Tensor, x_BD: Tensor) -> None:
        """Re-initialise the dead latents from the inputs ``x_BD`` (only called when ``resample_interval``)."""
        raise NotImplementedError(f"architecture {self.arch!r} does not resample dead latents")

    def update_running_stats(self, out: SAEOutput, reduce: Reducer = no_reduce) -> None:
        """Update state estimated during training (e.g. BatchTopK's threshold). Called once per step."""

    @torch.no_grad()
    def init_encoder_from_decoder(self) -> None:
        if self.W_enc is not None:
            self.W_enc.copy_(self.W_dec.T)

    # -- saving -----------------------------------------------------------------------------------
    def inference_tensors(self) -> dict[str, Tensor]:
        """Tensors of the SAELens inference form, before folding scaling and decoder norms."""
        tensors = {name: t.detach().clone() for name, t in self.state_dict().items()}
        tensors["W_enc"] = self.encoder_weight().detach().clone()
        return tensors

    def inference_to_state(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map SAELens inference tensors to this module's state_dict names (inverse of inference_tensors)."""
        return tensors

    def saelens_cfg_extra(self) -> dict[str, Any]:
        """Fields this architecture adds to SAELens's cfg.json (e.g. ``k``)."""
        return {}
