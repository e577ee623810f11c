"""Saving and loading SAEs as SAELens inference folders, and training checkpoints.

Folder layout (readable by SAELens, SAEBench, SAEDashboard):
    cfg.json                  SAELens inference config (normalize_activations "none")
    sae_weights.safetensors   W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D] (+ threshold, b_gate, ...)
    sae_ray.json              our own config, so we reload the native architecture (ignored by SAELens)

At save, the activation scaling factor and the decoder-row norms are folded into the weights, so the
saved SAE reads raw activations and has unit-norm decoder rows, as SAELens expects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from sae_core.architectures.base import ConfigError, SAEConfig, SparseAutoencoder
from sae_core.config import ReasonedError
from sae_core.lock import locked
from sae_core.normalization import NORMALIZATIONS, InputNormalizedSAE, wrap_normalization
from sae_core.publish import fsync_dir, publish_folder, umask
from sae_core.registry import RegistryError, build, get

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
    """A folder whose files do not match its cfg.json, or an unreadable file; the message names the file
    and the tensor or field. ``reason`` "foreign_normalization": a per-token normalisation only an
    importer can convert; "sae_exists": saving over a finished SAE without ``overwrite``."""


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


# Files that describe one SAE: replaced together when an SAE is published, never left beside another
# SAE's weights (an evaluation's sparsity of an earlier SAE would otherwise be read as this one's).
SAE_FILES = (CFG_FILE, WEIGHTS_FILE, NATIVE_FILE)
DERIVED_FILES = (SPARSITY_FILE, "metrics.json", "job.json", "eval.json", "feature_density.png")


def is_finished_sae(path: str | Path) -> bool:
    """A finished SAE folder holds both ``cfg.json`` and ``sae_weights.safetensors`` (cfg.json is
    published last, so a folder that has it also has the weights it describes)."""
    path = Path(path)
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def sae_files(sae: SparseAutoencoder, *, scaling_factor: float = 1.0, metadata: dict[str, Any] | None = None,
              output_scaling_factor: float | None = None) -> dict[str, bytes]:
    """The SAE's own files, name -> bytes (weights, sae_ray.json, cfg.json)."""
    tensors, folded = inference_tensors(sae, scaling_factor, output_scaling_factor)
    native_cfg = sae.cfg.to_dict()
    native_cfg.pop("tied", None)  # the folded encoder is explicit
    native = {"config": native_cfg, "scaling_factor_folded": scaling_factor, "decoder_norms_folded": folded,
              "version": VERSION}
    if output_scaling_factor is not None:
        native["output_scaling_factor_folded"] = output_scaling_factor
    return {WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}),
            NATIVE_FILE: json.dumps(native, indent=2).encode(),
            CFG_FILE: json.dumps(saelens_cfg(sae, metadata), indent=2).encode()}


def save_sae(sae: SparseAutoencoder, path: str | Path, *, scaling_factor: float = 1.0,
             metadata: dict[str, Any] | None = None, output_scaling_factor: float | None = None,
             extra_files: dict[str, bytes] | None = None, overwrite: bool = False, lock: bool = True) -> Path:
    """Publish ``sae`` as a SAELens inference folder at ``path``, atomically and never destroying an SAE
    unless asked. ``output_scaling_factor`` is a transcoder's target scale when it differs from the
    input's (None: the same). ``extra_files`` (name -> bytes, e.g. metrics.json, job.json) are published
    with the SAE's own files, as one set.

    What is published: the SAE files (cfg.json, sae_weights.safetensors, sae_ray.json) and
    ``extra_files``. Every file is first written and fsynced in a temp sibling folder ``.<name>.tmp-*``.
    What goes: an earlier SAE, whole. A folder holding any SAE file is an SAE folder (finished, or left
    by a crashed save), and its SAE files and DERIVED_FILES (its sparsity, metrics, job, evaluation)
    all go; in any other folder only a sparsity.safetensors goes (it describes an SAE, never this one),
    and files of the caller's or the user's (metrics.json included) stay unless ``extra_files`` replaces
    them.

    - ``path`` absent: the temp folder is renamed to ``path`` (one atomic rename).
    - ``path`` holds a finished SAE (:func:`is_finished_sae`) and ``overwrite`` is False: SAEFormatError
      with reason "sae_exists"; nothing is touched.
    - ``path`` holds nothing but what goes and what is published: the folders are swapped in one
      atomic step (renameat2 RENAME_EXCHANGE; elsewhere two renames), the old one then removed.
    - ``path`` also holds other entries (the caller's: Ray Train's ``ray-train/``, ``run.json``...): the
      folder stays and those entries are never moved or changed. cfg.json goes first (from then on the
      folder is not a finished SAE), then the derived files, then the new files are renamed in, cfg.json
      last: the folder turns into a finished SAE in one rename.

    A crash leaves either the old state, an unfinished folder (no cfg.json; the next save completes it
    without ``overwrite``), or the new SAE; never files of two SAEs side by side. Stale temp folders
    of earlier crashed saves are removed. One writer at a time: the folder's lock (sae_core.lock) is
    held throughout; it is re-entrant, so a job that holds ``locked(path)`` for its whole run may call
    this inside; ``lock=False`` when another process of the same job holds it (a Ray Train worker
    saving for the driver that locked the output). Published files and the folder get the umask's
    mode, like any new file.
    """
    path = Path(path).resolve()  # a symlinked folder: publish beside its target (same file system)
    files = {**sae_files(sae, scaling_factor=scaling_factor, metadata=metadata,
                         output_scaling_factor=output_scaling_factor), **(extra_files or {})}
    if path.exists() and not path.is_dir():
        raise SAEFormatError(f"{path} exists and is not a folder")
    with locked(path, purpose="saving an SAE") if lock else contextlib.nullcontext():
        if is_finished_sae(path) and not overwrite:
            raise SAEFormatError(f"{path} already holds an SAE", reason="sae_exists")
        # Derived files go before the weights: a crash in between still leaves an SAE file, so the
        # next save knows the derived files it finds there are an SAE's.
        sae_folder = any((path / name).exists() for name in SAE_FILES)
        gone = (CFG_FILE, *DERIVED_FILES, WEIGHTS_FILE, NATIVE_FILE) if sae_folder else (SPARSITY_FILE,)
        publish_folder(path, files, replaced=gone, commit=CFG_FILE)
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; SAEFormatError naming the file when it is not one."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_cfg(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / CFG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not an SAE folder: no {CFG_FILE}")
    return read_json(cfg_path)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20


def read_safetensors_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, without reading any tensor. Every tensor's
    byte range must lie inside the file and match its shape and dtype, so the shapes are bounded by what
    the file holds; SAEFormatError naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise SAEFormatError(f"{path}: not a safetensors file (header size {n}, file size {size})")
        header_bytes = fh.read(n)
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{path}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise SAEFormatError(f"{path}: unreadable safetensors header")
    data_size = size - 8 - n
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (begin, stop) = tuple(int(d) for d in info["shape"]), info["data_offsets"]
            numel = math.prod(shape)
            ok = 0 <= begin <= stop <= data_size and stop - begin == numel * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SAEFormatError(f"{path}: tensor {name!r} has a header entry that does not fit the file ({info})")
        shapes[name] = shape
    return shapes


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, its header checked first; SAEFormatError naming the file."""
    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise SAEFormatError(f"{path}: unreadable safetensors file ({exc})") from exc


def _native_config(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    native_path = path / NATIVE_FILE
    if native_path.is_file():
        native = read_json(native_path).get("config")
        if not isinstance(native, dict) or not isinstance(native.get("arch"), str):
            raise SAEFormatError(f"{native_path}: field 'config' (with its 'arch') is missing")
        return dict(native)
    arch_name = cfg.get("architecture")
    if arch_name not in FOREIGN_ARCHITECTURES:
        raise RegistryError(
            f"{path}/{CFG_FILE}: unknown architecture {arch_name!r}; known: {sorted(FOREIGN_ARCHITECTURES)}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, *NORMALIZATIONS):
        raise SAEFormatError(f"{path}/{CFG_FILE}: normalize_activations={norm!r} is not supported by this loader",
                             reason="foreign_normalization")
    for field in ("d_in", "d_sae", *(f for f in ("k", "d_out") if f in cfg)):
        value = cfg.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SAEFormatError(f"{path}/{CFG_FILE}: field {field!r} is missing or not a positive integer")
    native = {"arch": FOREIGN_ARCHITECTURES[arch_name], "d_in": cfg["d_in"], "d_sae": cfg["d_sae"],
              "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    native.update({f: cfg[f] for f in ("k", "d_out") if f in cfg})
    native.update(_FOREIGN_FIELDS.get(arch_name, {}))
    return native


def build_checked(cfg: SAEConfig, weights_path: Path) -> SparseAutoencoder:
    """Build the SAE ``cfg`` describes and load ``weights_path`` into it, after checking the file's
    tensor names and shapes against ``cfg`` on the meta device: a cfg claiming sizes the file does not
    hold fails before anything of that size is allocated."""
    with torch.device("meta"):
        probe = build(cfg)
    meta = {name: torch.empty(shape, device="meta") for name, shape in read_safetensors_header(weights_path).items()}
    _checked_state(probe, meta, source=str(weights_path))
    sae = build(cfg)
    load_inference_tensors(sae, read_safetensors(weights_path), source=str(weights_path))
    return sae


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder | InputNormalizedSAE:
    """Load a SAELens inference folder (ours or another tool's) as a native sae_core module in eval mode;
    a per-token ``normalize_activations`` ("layer_norm", ...) comes back as an InputNormalizedSAE wrapper.
    A folder whose files disagree (cfg.json, sae_ray.json, the weights' names and shapes) is refused."""
    path = Path(path)
    cfg = read_cfg(path)
    native = _native_config(path, cfg)
    spec = get(native.pop("arch"))
    native.setdefault("normalize_decoder", False)
    try:
        config = spec.config_cls.from_dict(native)
    except (ConfigError, TypeError) as exc:
        raise SAEFormatError(f"{path}: {exc}") from exc
    for field in ("d_in", "d_sae"):
        if field in cfg and cfg[field] != getattr(config, field):
            raise SAEFormatError(f"{path}: {CFG_FILE} says {field}={cfg[field]!r}, {NATIVE_FILE} says "
                                 f"{getattr(config, field)!r}")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE}")
    sae = build_checked(config, weights_path)
    sae.metadata = dict(cfg.get("metadata") or {})
    return wrap_normalization(sae, cfg.get("normalize_activations")).to(device).eval()


def _checked_state(sae: SparseAutoencoder, tensors: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
    """``tensors`` (SAELens names) as ``sae``'s state dict, after checking names and shapes."""
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
    return state


def load_inference_tensors(sae: SparseAutoencoder, tensors: dict[str, Tensor], *, source: str) -> None:
    """Copy SAELens-named tensors into ``sae``, checking names and shapes; errors name the tensor."""
    state = _checked_state(sae, tensors, source=source)
    sae.load_state_dict({k: state[k].to(ref.dtype) for k, ref in sae.state_dict().items()})


# -- training checkpoints -------------------------------------------------------------------------
CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint (tensors and plain Python values only) atomically: temp file, fsync, rename."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".checkpoint.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path / CHECKPOINT_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path)
    return path / CHECKPOINT_FILE


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated or not a plain checkpoint
        raise SAEFormatError(f"{file}: unreadable checkpoint ({exc})") from exc
