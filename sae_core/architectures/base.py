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
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sae_core.config import ConfigError, require, strict_from_dict

__all__ = ["ActiveLatents", "ConfigError", "Reducer", "SAEBenchAdapter", "SAEBenchConfig", "SAEConfig", "SAEOutput",
           "SparseAutoencoder", "Wiring", "mse_loss", "no_reduce", "require"]

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


class ActiveLatents(NamedTuple):
    """A batch's active latents in the padded layout of the sparse kernels (``sae_core.kernels``)."""

    idx_BK: Tensor
    """Latent index of each entry; -1 pads rows with fewer than K entries."""
    vals_BK: Tensor
    """Each entry's activation (differentiable); 0 at padding and where a selected latent did not fire."""
    d_sae: int
    """Width of the dense layout."""

    def dense(self) -> Tensor:
        """The dense [B, F] latents (differentiable in ``vals_BK``)."""
        vals_BK = torch.where(self.idx_BK >= 0, self.vals_BK, 0)
        return vals_BK.new_zeros(self.idx_BK.shape[0], self.d_sae).scatter_add(1, self.idx_BK.clamp_min(0), vals_BK)

    def fire_counts(self) -> Tensor:
        """Rows each latent fired on, [F] int64: one bincount over B*K entries."""
        fired_N = ((self.idx_BK >= 0) & (self.vals_BK.detach() != 0)).reshape(-1)
        keys_N = torch.where(fired_N, self.idx_BK.reshape(-1), self.d_sae)
        return torch.bincount(keys_N, minlength=self.d_sae + 1)[: self.d_sae]


class SAEOutput:
    """What a forward pass returns. A forward on the sparse path gives ``active`` and no dense latents:
    ``latents_BF`` is then built on first read, so a training step never pays for a [B, F] it does not use."""

    __slots__ = ("x_hat_BD", "mse", "sparsity", "aux", "active", "_latents_BF", "_fire_counts_F")

    def __init__(self, x_hat_BD: Tensor, latents_BF: Tensor | None, mse: Tensor, sparsity: Tensor, aux: Tensor, *,
                 active: ActiveLatents | None = None):
        if latents_BF is None and active is None:
            raise ValueError("an SAEOutput needs dense latents or active (sparse) latents")
        self.x_hat_BD = x_hat_BD
        """Reconstruction of the input."""
        self._latents_BF = latents_BF
        self.mse = mse
        """Reconstruction loss: mean over elements of (x_hat - x)^2."""
        self.sparsity = sparsity
        """Sparsity penalty, its coefficient applied (zero for TopK-style architectures)."""
        self.aux = aux
        """Auxiliary losses (AuxK, gated aux reconstruction, matryoshka prefixes, ...), weighted."""
        self.active = active
        """The active latents in the padded sparse layout, when the forward produced them."""
        self._fire_counts_F: Tensor | None = None

    @property
    def latents_BF(self) -> Tensor:
        """Latent activations (dense layout)."""
        if self._latents_BF is None:
            self._latents_BF = self.active.dense()  # type: ignore[union-attr]
        return self._latents_BF

    def fire_counts(self) -> Tensor:
        """Rows of the batch each latent fired on, [F] int64 (from ``active`` when present: no [B, F] pass)."""
        if self._fire_counts_F is None:
            if self.active is not None:
                self._fire_counts_F = self.active.fire_counts()
            else:
                # A float sum over the batch is several times faster than torch's bool reductions on CPU.
                self._fire_counts_F = (self.latents_BF.detach() != 0).float().sum(dim=0).long()
        return self._fire_counts_F

    def _replace(self, **changes: Tensor) -> SAEOutput:
        fields = {"x_hat_BD": self.x_hat_BD, "latents_BF": self._latents_BF, "mse": self.mse,
                  "sparsity": self.sparsity, "aux": self.aux, "active": self.active, **changes}
        active = fields.pop("active")
        return SAEOutput(**fields, active=active)

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
            # contiguous(), not clone(): a clone keeps the transpose's column-major strides, and a column-major
            # W_enc costs a [D, F] copy in every AccumulateGrad and fused-Adam step (the kernels write its
            # gradient row-major).
            self.W_enc = nn.Parameter(W_dec_FD.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.metadata: dict[str, Any] = {}
        """Where the SAE reads a model (cfg.json ``metadata``: model_name, hook_name, ...) when loaded from a folder."""

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def saebench(self, model_name: str | None = None, hook_name: str | None = None, *, hook_layer: int | None = None,
                 context_size: int | None = None) -> SAEBenchAdapter:
        """This SAE as SAEBench's custom-SAE interface (``forward`` returning the reconstruction, a ``cfg``
        naming model, hook and layer); it shares this module's parameters. Defaults come from ``metadata``."""
        meta = self.metadata
        return SAEBenchAdapter(self, model_name=model_name or meta.get("model_name", ""),
                               hook_name=hook_name or meta.get("hook_name", ""), hook_layer=hook_layer,
                               context_size=context_size or meta.get("context_size"))

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
        # (g . w / |w|^2) w in three passes over [F, D] and no [F, D] temporaries.
        W_FD, grad_FD = self.W_dec, self.W_dec.grad
        sq_norm_F = torch.linalg.vector_norm(W_FD, dim=1).clamp_min(1e-8).square()
        parallel_F1 = torch.bmm(grad_FD.unsqueeze(1), W_FD.unsqueeze(2)).squeeze(2) / sq_norm_F[:, None]
        grad_FD.addcmul_(parallel_F1, W_FD, value=-1.0)

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

    def lr_scales(self) -> dict[str, float]:
        """Parameters (by name) that train at a multiple of the configured learning rate; default none."""
        return {}

    def init_from_sample(self, x_ND: Tensor, reduce: Reducer = no_reduce, world_size: int = 1) -> None:
        """Set state that depends on the data (e.g. JumpReLU's thresholds) from the trainer's initialisation
        sample (normalised inputs), once b_dec and the encoder are initialised. Every data-parallel rank
        calls it (estimates go through ``reduce``, so they agree). Default: nothing."""

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


# -- SAEBench's custom-SAE interface --------------------------------------------------------------------
@dataclass(kw_only=True)
class SAEBenchConfig:
    """The fields SAEBench's evaluations read from ``sae.cfg`` (its ``CustomSAEConfig``)."""

    model_name: str
    d_in: int
    d_sae: int
    hook_name: str
    hook_layer: int
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = ""
    apply_b_dec_to_input: bool = True
    activation_fn_str: str = ""
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    dataset_path: str = ""


class SAEBenchAdapter(nn.Module):
    """A view of an SAE as SAEBench's ``BaseSAE``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``,
    ``b_dec``, ``encode`` / ``decode``, a ``forward`` returning the reconstruction tensor (ours returns an
    SAEOutput with losses), ``device``, ``dtype`` and ``cfg``. The parameters are the wrapped SAE's own."""

    def __init__(self, sae: SparseAutoencoder, *, model_name: str, hook_name: str, hook_layer: int | None = None,
                 context_size: int | None = None):
        super().__init__()
        if not hook_name:
            raise ConfigError("SAEBench needs the hook the SAE reads: pass hook_name (or load it from a folder)")
        if hook_layer is None:
            found = re.match(r"blocks\.(\d+)\.", hook_name)
            if not found:
                raise ConfigError(f"cannot tell the layer of hook {hook_name!r}: pass hook_layer")
            hook_layer = int(found.group(1))
        self.sae = sae
        self.cfg = SAEBenchConfig(model_name=model_name, d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, hook_name=hook_name,
                                  hook_layer=hook_layer, context_size=context_size, architecture=sae.arch,
                                  apply_b_dec_to_input=sae.cfg.apply_b_dec_to_input)
        self._sync_cfg()

    def _sync_cfg(self) -> None:
        self.cfg.dtype = str(self.dtype).removeprefix("torch.")
        self.cfg.device = str(self.device)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half() keep cfg.dtype / cfg.device true
        out = super()._apply(fn, *args, **kwargs)
        self._sync_cfg()
        return out

    @property
    def W_enc(self) -> Tensor:
        return self.sae.encoder_weight()

    @property
    def W_dec(self) -> Tensor:
        return self.sae.W_dec

    @property
    def b_enc(self) -> Tensor:
        """The encoder bias; zeros for an SAE without one (gated: b_gate / b_mag), as SAEBench asks."""
        b_enc = getattr(self.sae, "b_enc", None)
        return b_enc if b_enc is not None else self.sae.W_dec.new_zeros(self.sae.cfg.d_sae)

    @property
    def b_dec(self) -> Tensor:
        return self.sae.b_dec

    @property
    def device(self) -> torch.device:
        return self.sae.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.W_dec.dtype

    def encode(self, x: Tensor) -> Tensor:
        return self.sae.encode(x)

    def decode(self, feature_acts: Tensor) -> Tensor:
        return self.sae.decode(feature_acts)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        """SAEBench's check: every decoder row has unit norm (saved SAEs are folded so that it does)."""
        norms = self.W_dec.norm(dim=1)
        tolerance = 1e-2 if self.W_dec.dtype in (torch.bfloat16, torch.float16) else 1e-5
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=tolerance))
