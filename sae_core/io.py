"""Saving and loading SAEs as SAELens inference folders, and training checkpoints.

Folder layout (readable by SAELens, SAEBench, SAEDashboard):
    cfg.json                  SAELens inference config (normalize_activations "none")
    sae_weights.safetensors   W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D] (+ threshold, b_gate, ...)
    sae_ray.json              our own config, so we reload the native architecture (ignored by SAELens)

At save, the activation scaling factor and the decoder-row norms are folded into the weights, so the
saved SAE reads raw activations and has unit-norm decoder rows, as SAELens expects.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_core.architectures.base import ConfigError, SparseAutoencoder
from sae_core.config import ReasonedError
from sae_core.normalization import NORMALIZATIONS, InputNormalizedSAE, wrap_normalization
from sae_core.registry import RegistryError, build, get
from sae_core.store import atomic_write_bytes

logger = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
NATIVE_FILE = "sae_ray.json"
SPARSITY_FILE = "sparsity.safetensors"
VERSION = "0.1.0"

# SAELens architecture string -> our architecture, for folders written by other tools.
FOREIGN_ARCHITECTURES = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                         "kl_sparse": "kl_sparse", "transcoder": "transcoder", "skip_transcoder": "skip_transcoder",
                         "jumprelu_transcoder": "transcoder", "jumprelu_skip_transcoder": "skip_transcoder"}
# Native config fields a foreign SAELens architecture string implies.
_FOREIGN_FIELDS = {"transcoder": {"activation": "relu"}, "skip_transcoder": {"activation": "relu"},
                   "jumprelu_transcoder": {"activation": "jumprelu"}, "jumprelu_skip_transcoder": {"activation": "jumprelu"}}
# How each tensor changes when latent i is scaled by n_i (decoder norm) — exponent of n.
_LATENT_SCALED = {"W_enc": 1, "b_enc": 1, "threshold": 1, "b_gate": 1, "b_mag": 1}


class SAEFormatError(ReasonedError):
    """A folder whose files do not match its cfg.json; the message names the tensor or field. ``reason``
    "foreign_normalization": a per-token normalisation only an importer can convert."""


def fold_scaling_factor(tensors: dict[str, Tensor], scale: float,
                        output_scale: float | None = None) -> dict[str, Tensor]:
    """The SAE was trained on x * scale (and, for a transcoder, on targets y * output_scale; None means
    ``scale``); return weights that read x and reconstruct x (or y)."""
    out = dict(tensors)
    output_scale = scale if output_scale is None else output_scale
    if scale == 1.0 and output_scale == 1.0:
        return out
    out["W_enc"] = tensors["W_enc"] * scale
    out["W_dec"] = tensors["W_dec"] / output_scale
    out["b_dec"] = tensors["b_dec"] / output_scale
    if "W_skip" in tensors:  # y * s_out ~ (x * s_in) @ W_skip.T
        out["W_skip"] = tensors["W_skip"] * (scale / output_scale)
    return out


def fold_decoder_norms(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scale each latent by its decoder-row norm so the decoder rows become unit norm (exact for
    positively homogeneous activations)."""
    W_dec = tensors["W_dec"]
    # A crosscoder's W_dec is [F, n_sources, D]: a latent's decoder row is all its sources together.
    norms_F = W_dec.flatten(1).norm(dim=1).clamp_min(1e-12)
    out = dict(tensors)
    out["W_dec"] = W_dec / norms_F.view(-1, *[1] * (W_dec.dim() - 1))
    for name in _LATENT_SCALED:
        if name in tensors:
            out[name] = tensors[name] * (norms_F if tensors[name].dim() == 1 else norms_F[None, :])
    return out


def _can_fold_norms(sae: SparseAutoencoder, tensors: dict[str, Tensor]) -> bool:
    if not sae.homogeneous:
        return False
    if sae.saelens_architecture == "topk":
        # Top-k selection compares latents with each other: scaling them unequally would change it.
        norms = tensors["W_dec"].norm(dim=1)
        return bool((norms.max() - norms.min()) <= 1e-5 * norms.max())
    return True


def inference_tensors(sae: SparseAutoencoder, scaling_factor: float = 1.0,
                      output_scaling_factor: float | None = None) -> tuple[dict[str, Tensor], bool]:
    tensors = {k: v.float().cpu().contiguous() for k, v in sae.inference_tensors().items()}
    tensors = fold_scaling_factor(tensors, scaling_factor, output_scaling_factor)
    folded = _can_fold_norms(sae, tensors)
    if folded:
        tensors = fold_decoder_norms(tensors)
    return {k: v.contiguous() for k, v in tensors.items()}, folded


def saelens_cfg(sae: SparseAutoencoder, metadata: dict[str, Any] | None) -> dict[str, Any]:
    cfg = {
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        # Per-token normalisation (sae_core/normalization.py) cannot be folded; SAELens applies it at run time.
        "normalize_activations": getattr(sae, "normalize_activations", "none"),
        "reshape_activations": "none",
        "architecture": sae.saelens_architecture,
        **sae.saelens_cfg_extra(),
    }
    meta = {"model_name": None, "hook_name": None, "context_size": None, "prepend_bos": True,
            "dataset_path": None, "exclude_special_tokens": True, "sae_lens_training_version": None,
            "sae_ray_version": VERSION}
    meta.update(metadata or {})
    cfg["metadata"] = meta
    return cfg


def save_sae(sae: SparseAutoencoder, path: str | Path, *, scaling_factor: float = 1.0,
             metadata: dict[str, Any] | None = None, output_scaling_factor: float | None = None,
             extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``sae`` as a SAELens inference folder. Existing files of the same names are replaced
    atomically; other files in the folder are left alone. ``output_scaling_factor`` is a transcoder's
    target scale when it differs from the input's (None: the same). ``extra_files`` (name -> bytes, e.g.
    metrics.json) are published with the SAE's own files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, folded = inference_tensors(sae, scaling_factor, output_scaling_factor)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".weights.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    native_cfg = sae.cfg.to_dict()
    native_cfg.pop("tied", None)  # the folded encoder is explicit
    native = {"config": native_cfg, "scaling_factor_folded": scaling_factor, "decoder_norms_folded": folded,
              "version": VERSION}
    if output_scaling_factor is not None:
        native["output_scaling_factor_folded"] = output_scaling_factor
    atomic_write_bytes(path / NATIVE_FILE, json.dumps(native, indent=2).encode())
    for name, data in (extra_files or {}).items():
        atomic_write_bytes(path / name, data)
    atomic_write_bytes(path / CFG_FILE, json.dumps(saelens_cfg(sae, metadata), indent=2).encode())
    return path


def read_cfg(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / CFG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder: no {CFG_FILE}")
    return json.loads(cfg_path.read_text())


def _native_config(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    native_path = path / NATIVE_FILE
    if native_path.is_file():
        return json.loads(native_path.read_text())["config"]
    arch_name = cfg.get("architecture")
    if arch_name not in FOREIGN_ARCHITECTURES:
        raise RegistryError(
            f"{path}/{CFG_FILE}: unknown architecture {arch_name!r}; known: {sorted(FOREIGN_ARCHITECTURES)}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, *NORMALIZATIONS):
        raise SAEFormatError(f"{path}/{CFG_FILE}: normalize_activations={norm!r} is not supported by this loader",
                             reason="foreign_normalization")
    for field in ("d_in", "d_sae"):
        if not isinstance(cfg.get(field), int):
            raise SAEFormatError(f"{path}/{CFG_FILE}: field {field!r} is missing or not an integer")
    native = {"arch": FOREIGN_ARCHITECTURES[arch_name], "d_in": cfg["d_in"], "d_sae": cfg["d_sae"],
              "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    if "k" in cfg:
        native["k"] = int(cfg["k"])
    if "d_out" in cfg:
        native["d_out"] = int(cfg["d_out"])
    native.update(_FOREIGN_FIELDS.get(arch_name, {}))
    return native


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder | InputNormalizedSAE:
    """Load a SAELens inference folder (ours or another tool's) as a native sae_core module in eval mode;
    a per-token ``normalize_activations`` ("layer_norm", ...) comes back as an InputNormalizedSAE wrapper."""
    path = Path(path)
    cfg = read_cfg(path)
    native = _native_config(path, cfg)
    spec = get(native.pop("arch"))
    native.setdefault("normalize_decoder", False)
    try:
        sae = build(spec.config_cls.from_dict(native))
    except ConfigError as exc:
        raise SAEFormatError(f"{path}: {exc}") from exc
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}")
    load_inference_tensors(sae, load_file(str(weights_path)), source=str(weights_path))
    return wrap_normalization(sae, cfg.get("normalize_activations")).to(device).eval()


def load_inference_tensors(sae: SparseAutoencoder, tensors: dict[str, Tensor], *, source: str) -> None:
    """Copy SAELens-named tensors into ``sae``, checking names and shapes; errors name the tensor."""
    state = sae.inference_to_state(dict(tensors))
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SAEFormatError(f"{source}: missing tensor(s) {missing}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise SAEFormatError(f"{source}: tensor(s) {unexpected} are not used by architecture {sae.arch!r}")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise SAEFormatError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, cfg implies {tuple(ref.shape)}"
            )
    sae.load_state_dict({k: state[k].to(ref.dtype) for k, ref in expected.items()})


# -- training checkpoints -------------------------------------------------------------------------
CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint (tensors and plain Python values only) atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".checkpoint.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path / CHECKPOINT_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path / CHECKPOINT_FILE


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    return torch.load(file, map_location="cpu", weights_only=True)
