"""Per-token input normalisation around an SAE, for SAEs trained on normalised activations.

SAELens's ``normalize_activations`` values that depend on each token (so they cannot be folded into
the weights) are applied by :class:`InputNormalizedSAE`, a thin wrapper that reads raw activations:

- ``"layer_norm"`` (OpenAI's GPT-2 TopK SAEs): ``mu = mean(x)``, ``std = std(x - mu)`` (unbiased, as
  ``torch.std``), the SAE sees ``(x - mu) / (std + 1e-5)`` and the output is ``x_hat * std + mu`` (no eps there).
- ``"constant_norm_rescale"``: the SAE sees ``x * c`` with ``c = sqrt(d_in) / ||x||``; output ``x_hat / c``.

Both match SAELens's run-time normalisation and OpenAI's ``LN``. ``encode`` takes raw activations;
``decode`` returns the reconstruction in the *normalised* space (it cannot know a token's mu/std);
``forward`` returns it in raw units, so splice ``forward(x).x_hat_BD`` into a model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from sae_core.architectures.base import SAEOutput, SparseAutoencoder, mse_loss

LN_EPS = 1e-5
NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")


class Normalized(NamedTuple):
    x_BD: Tensor
    """The normalised input."""
    scale_B1: Tensor
    """Raw = normalised * scale + shift."""
    shift_B1: Tensor


def normalize(x_BD: Tensor, mode: str) -> Normalized:
    if mode == "layer_norm":
        mu_B1 = x_BD.mean(dim=-1, keepdim=True)
        centered_BD = x_BD - mu_B1
        std_B1 = centered_BD.std(dim=-1, keepdim=True)
        # OpenAI and SAELens divide by std + eps but multiply back by std alone; so do we.
        return Normalized(centered_BD / (std_B1 + LN_EPS), std_B1, mu_B1)
    if mode == "constant_norm_rescale":
        norm_B1 = x_BD.norm(dim=-1, keepdim=True).clamp_min(1e-12) / x_BD.shape[-1] ** 0.5
        return Normalized(x_BD / norm_B1, norm_B1, x_BD.new_zeros(()))
    raise ValueError(f"normalize_activations={mode!r} is not one of {NORMALIZATIONS}")


def _from_sae(name: str) -> property:
    """A read-only attribute that is the wrapped SAE's attribute of the same name."""
    return property(lambda self: getattr(self.sae, name), doc=f"The wrapped SAE's ``{name}``.")


class InputNormalizedSAE(nn.Module):
    """An SAE that normalises each input token and maps its reconstruction back (see module docstring).

    Delegates the saving interface (``cfg``, ``inference_tensors``, ...) to the wrapped SAE, so
    ``save_sae`` writes a SAELens folder with ``normalize_activations`` set to ``mode``.
    """

    def __init__(self, sae: SparseAutoencoder, mode: str):
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations={mode!r} is not one of {NORMALIZATIONS}")
        self.sae = sae
        self.normalize_activations = mode

    # -- what save_sae and the evaluators read from an SAE: the wrapped SAE's, unchanged -------------
    cfg = _from_sae("cfg")
    arch = _from_sae("arch")
    saelens_architecture = _from_sae("saelens_architecture")
    homogeneous = _from_sae("homogeneous")
    wiring = _from_sae("wiring")
    d_out = _from_sae("d_out")

    def inference_tensors(self) -> dict[str, Tensor]:
        return self.sae.inference_tensors()

    def saelens_cfg_extra(self) -> dict[str, Any]:
        return self.sae.saelens_cfg_extra()

    # -- the forward path -------------------------------------------------------------------------
    def encode(self, x_BD: Tensor) -> Tensor:
        return self.sae.encode(normalize(x_BD, self.normalize_activations).x_BD)

    def decode(self, latents_BF: Tensor) -> Tensor:
        """Reconstruction in the normalised space (use ``forward`` for raw units)."""
        return self.sae.decode(latents_BF)

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None) -> SAEOutput:
        norm = normalize(x_BD, self.normalize_activations)
        out = self.sae(norm.x_BD, dead_mask_F=dead_mask_F)
        x_hat_BD = out.x_hat_BD * norm.scale_B1 + norm.shift_B1
        return out._replace(x_hat_BD=x_hat_BD, mse=mse_loss(x_hat_BD, x_BD))


def wrap_normalization(sae: SparseAutoencoder, mode: str | None) -> SparseAutoencoder | InputNormalizedSAE:
    """``sae`` itself for "none"/None, else wrapped in :class:`InputNormalizedSAE`."""
    if mode in (None, "none"):
        return sae
    return InputNormalizedSAE(sae, mode)
