"""Import SAEs written by other libraries as native sae_core modules (pure torch / numpy / safetensors).

Formats (x is a row vector; D = d_in, F = d_sae; see shared/docs/formats.md):

- ``saelens``: a folder with ``cfg.json`` + ``sae_weights.safetensors`` (architectures standard, topk,
  jumprelu, gated; our kl_sparse; the four transcoder layouts).
  ``normalize_activations: "layer_norm"`` / ``"constant_norm_rescale"`` load as an InputNormalizedSAE.
- ``sparsify`` (EleutherAI): ``cfg.json`` + ``sae.safetensors`` with ``encoder.weight`` [F, D],
  ``encoder.bias`` [F], ``W_dec`` [F, D], ``b_dec`` [D]. ``pre = relu((x - b_dec) @ encoder.weight.T +
  encoder.bias)``, top-k of it, ``x_hat = f @ W_dec + b_dec``. W_dec is *already* [F, D] like ours: it is
  not transposed (SAELens's sparsify importer does transpose it, a known trap).
- ``gemmascope``: ``params.npz`` with ``W_enc`` [D, F], ``W_dec`` [F, D], ``b_enc``, ``b_dec``,
  ``threshold`` (JumpReLU). Gemma Scope does not subtract b_dec from the input, so
  ``apply_b_dec_to_input`` is False. Read with ``np.load(allow_pickle=False)``.
- ``openai`` (GPT-2 TopK SAEs): a torch state dict ``encoder.weight`` [F, D], ``decoder.weight`` [D, F],
  ``pre_bias`` [D], ``latent_bias`` [F] (+ ``encoder.bias`` if present, added to the latent bias as an
  ``nn.Linear`` would), ``stats_last_nonzero`` (ignored), and ``activation`` / ``activation_state_dict``
  (``{"k": ...}``). TopK ones layer-norm each input token (OpenAI's rule: normalise iff TopK), so they
  import as ``InputNormalizedSAE(topk, "layer_norm")``. Read with ``torch.load(weights_only=True)``.

Nothing here executes pickle. Errors name the file and the tensor or field at fault.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae_core.architectures.base import ConfigError, SparseAutoencoder
from sae_core.io import (
    CFG_FILE,
    FOREIGN_ARCHITECTURES,
    NATIVE_FILE,
    WEIGHTS_FILE,
    SAEFormatError,
    _checked_state,
    load_inference_tensors,
    load_sae,
    read_cfg,
    read_json,
    read_safetensors,
)
from sae_core.normalization import InputNormalizedSAE, wrap_normalization
from sae_core.registry import RegistryError, build, make_config

FORMATS = ("saelens", "sparsify", "gemmascope", "openai")
SPARSIFY_FILE = "sae.safetensors"
GEMMASCOPE_FILE = "params.npz"
OPENAI_SUFFIXES = (".pt", ".pth", ".bin")
# SAELens architectures that exist but that sae_core cannot run yet.
METADATA_FIELDS = ("model_name", "hook_name", "hook_layer", "context_size", "prepend_bos", "dataset_path",
                   "exclude_special_tokens", "hook_name_out", "hook_names")

AnySAE = SparseAutoencoder | InputNormalizedSAE


class ImportedSAE(NamedTuple):
    sae: AnySAE
    """The native module, in eval mode, reading raw activations."""
    format: str
    """The format it was read from (one of FORMATS)."""
    metadata: dict[str, Any]
    """What the source said about its model, hook and data (SAELens metadata fields), possibly empty."""


# -- detection ------------------------------------------------------------------------------------
def detect_format(src: str | Path) -> str:
    """Guess the format of ``src`` from its file names; a SAEFormatError lists what was expected."""
    src = Path(src)
    if src.is_file():
        if src.name.endswith(".npz"):
            return "gemmascope"
        if src.suffix in OPENAI_SUFFIXES:
            return "openai"
    elif src.is_dir():
        if (src / WEIGHTS_FILE).is_file():
            return "saelens"
        if (src / SPARSIFY_FILE).is_file():
            return "sparsify"
        if (src / GEMMASCOPE_FILE).is_file():
            return "gemmascope"
        if len(_openai_files(src)) == 1:
            return "openai"
    elif not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    raise SAEFormatError(
        f"cannot tell the format of {src}: expected a folder with {WEIGHTS_FILE} (saelens) or {SPARSIFY_FILE} "
        f"(sparsify), a {GEMMASCOPE_FILE} (gemmascope), or one {'/'.join(OPENAI_SUFFIXES)} state dict (openai)"
    )


def import_sae(src: str | Path, fmt: str | None = None, *, k: int | None = None) -> ImportedSAE:
    """Read ``src`` in format ``fmt`` (detected when None). ``k`` overrides a TopK SAE's k when the
    source does not record it (an OpenAI state dict saved without its activation)."""
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise SAEFormatError(f"unknown import format {fmt!r}; known: {', '.join(FORMATS)}")
    if not Path(src).exists():
        raise FileNotFoundError(f"{src} does not exist")
    reader = {"saelens": from_saelens, "sparsify": from_sparsify, "gemmascope": from_gemmascope,
              "openai": from_openai}[fmt]
    sae, metadata = reader(Path(src), k=k) if fmt == "openai" else reader(Path(src))
    return ImportedSAE(sae.eval(), fmt, metadata)


# -- shared helpers -------------------------------------------------------------------------------
def check_tensors(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], *, source: str,
                  optional: tuple[str, ...] = ()) -> None:
    """Every expected tensor is present with its shape; the error names the tensor (in the source's names)."""
    missing = sorted(name for name in expected if name not in tensors and name not in optional)
    if missing:
        raise SAEFormatError(f"{source}: missing tensor(s) {missing}")
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(shape):
            raise SAEFormatError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}"
            )


def build_native(arch: str, tensors: dict[str, Tensor], *, source: str, **fields: Any) -> SparseAutoencoder:
    """A native SAE of ``arch`` holding SAELens-named ``tensors`` (float32, eval mode)."""
    try:
        cfg = make_config(arch, normalize_decoder=False, **fields)
    except ConfigError as exc:
        raise SAEFormatError(f"{source}: {exc}") from exc
    with torch.device("meta"):  # names and shapes checked before the real SAE is allocated
        _checked_state(build(cfg), {k: v.to("meta") for k, v in tensors.items()}, source=source)
    sae = build(cfg)
    load_inference_tensors(sae, {k: v.float() for k, v in tensors.items()}, source=source)
    return sae.eval()


def _int_field(cfg: dict[str, Any], name: str, source: str) -> int:
    value = cfg.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SAEFormatError(f"{source}: field {name!r} is missing or not a positive integer (got {value!r})")
    return value


# -- SAELens --------------------------------------------------------------------------------------
def saelens_metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens v6 keeps these under ``metadata``; older versions at the top level."""
    meta = {k: cfg[k] for k in METADATA_FIELDS if k in cfg}
    meta.update({k: v for k, v in (cfg.get("metadata") or {}).items() if k in METADATA_FIELDS})
    return meta


def from_saelens(src: Path) -> tuple[AnySAE, dict[str, Any]]:
    cfg = read_cfg(src)
    if (src / NATIVE_FILE).is_file():  # ours: the native config names the registered architecture
        return load_sae(src), saelens_metadata(cfg)
    arch = cfg.get("architecture", "standard")
    if arch not in FOREIGN_ARCHITECTURES:
        raise RegistryError(f"{src}/{CFG_FILE}: field 'architecture' is {arch!r}, not one of "
                            f"{sorted(FOREIGN_ARCHITECTURES)}")
    if arch == "standard" and cfg.get("activation_fn") == "topk":
        return _old_saelens_topk(src, cfg), saelens_metadata(cfg)
    return load_sae(src), saelens_metadata(cfg)


def _old_saelens_topk(src: Path, cfg: dict[str, Any]) -> AnySAE:
    """SAELens < 5 saved TopK SAEs as "standard" with ``activation_fn: topk`` and its k in kwargs."""
    source = str(src / CFG_FILE)
    k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if not isinstance(k, int):
        raise SAEFormatError(f"{source}: activation_fn is 'topk' but field 'activation_fn_kwargs.k' is missing")
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{src} has no {WEIGHTS_FILE}")
    sae = build_native("topk", read_safetensors(weights), source=str(weights), d_in=_int_field(cfg, "d_in", source),
                       d_sae=_int_field(cfg, "d_sae", source), k=k,
                       apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))
    return wrap_normalization(sae, cfg.get("normalize_activations"))


# -- sparsify -------------------------------------------------------------------------------------
def _sparsify_folder(src: Path) -> Path:
    if (src / SPARSIFY_FILE).is_file():
        return src
    # A sparsify run folder holds one subfolder per hook point.
    subs = sorted(p.parent.name for p in src.glob(f"*/{SPARSIFY_FILE}"))
    if subs:
        raise SAEFormatError(f"{src} is a sparsify run with several SAEs; pass one of its subfolders: {subs}")
    raise SAEFormatError(f"{src} has no {SPARSIFY_FILE} (sparsify layout: {CFG_FILE} + {SPARSIFY_FILE})")


def from_sparsify(src: Path) -> tuple[AnySAE, dict[str, Any]]:
    src = _sparsify_folder(src)
    cfg_path = src / CFG_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{src} has no {CFG_FILE}")
    cfg = read_json(cfg_path)
    source_cfg = str(cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAEFormatError(f"{source_cfg}: field 'activation' is {activation!r}; only 'topk' is supported yet")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise SAEFormatError(f"{source_cfg}: field {flag!r} is set: sparsify transcoders/skip SAEs are not supported yet")
    weights_path = src / SPARSIFY_FILE
    tensors = read_safetensors(weights_path)
    source = str(weights_path)
    d_in = _int_field(cfg, "d_in", source_cfg) if "d_in" in cfg else _shape_of(tensors, "b_dec", 0, source)
    if cfg.get("num_latents"):
        d_sae = _int_field(cfg, "num_latents", source_cfg)
    elif cfg.get("expansion_factor"):
        d_sae = d_in * _int_field(cfg, "expansion_factor", source_cfg)
    else:
        d_sae = _shape_of(tensors, "encoder.weight", 0, source)
    k = _int_field(cfg, "k", source_cfg)
    check_tensors(tensors, {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in),
                            "b_dec": (d_in,)}, source=source)
    extra = sorted(set(tensors) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if extra:
        raise SAEFormatError(f"{source}: tensor(s) {extra} are not supported yet (plain TopK SAEs only)")
    native = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
              "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}  # W_dec stays [F, D]: no transpose
    # relu-then-topk (sparsify) equals topk-then-relu (ours): the entries they may pick differently are 0.
    sae = build_native("topk", native, source=source, d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=True)
    return sae, {}


def _shape_of(tensors: dict[str, Tensor], name: str, dim: int, source: str) -> int:
    if name not in tensors:
        raise SAEFormatError(f"{source}: missing tensor(s) [{name!r}]")
    return int(tensors[name].shape[dim])


# -- Gemma Scope ----------------------------------------------------------------------------------
def from_gemmascope(src: Path) -> tuple[AnySAE, dict[str, Any]]:
    path = src / GEMMASCOPE_FILE if src.is_dir() else src
    if not path.is_file():
        raise SAEFormatError(f"{src} has no {GEMMASCOPE_FILE}")
    source = str(path)
    check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            tensors = {name: torch.from_numpy(np.array(npz[name], dtype=np.float32)) for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # object arrays need pickle: refused
        raise SAEFormatError(f"{source}: {exc}") from exc
    d_in, d_sae = (_shape_of(tensors, "W_enc", 0, source), _shape_of(tensors, "W_enc", 1, source))
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                "threshold": (d_sae,)}
    check_tensors(tensors, expected, source=source)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise SAEFormatError(f"{source}: unexpected array(s) {extra} for a Gemma Scope JumpReLU SAE")
    sae = build_native("jumprelu", tensors, source=source, d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False)
    return sae, {}


def check_npz_sizes(path: Path) -> None:
    """Every array's header in a .npz must describe exactly the bytes its member holds, so a forged shape
    cannot make numpy allocate more than the file contains."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in readers:
                        raise OSError(f"array {info.filename!r} has .npy version {version}")
                    shape, _, dtype = readers[version](member)
                    held = info.file_size - member.tell()
                if not dtype.hasobject and math.prod(shape) * dtype.itemsize != held:
                    break  # object arrays: np.load refuses them without allow_pickle, with its own message
            else:
                return
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise SAEFormatError(f"{path}: not a readable .npz file ({exc})") from exc
    raise SAEFormatError(f"{path}: array {info.filename!r} claims shape {shape} but holds {held} bytes")


# -- OpenAI ---------------------------------------------------------------------------------------
def _openai_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in OPENAI_SUFFIXES and p.is_file())


def _openai_file(src: Path) -> Path:
    if src.is_file():
        return src
    files = _openai_files(src)
    if len(files) != 1:
        raise SAEFormatError(f"{src} should hold exactly one {'/'.join(OPENAI_SUFFIXES)} state dict, found {len(files)}")
    return files[0]


def _openai_k(state: dict[str, Any], k: int | None, source: str) -> int | None:
    """k of a TopK SAE, None for a ReLU one."""
    activation = state.get("activation", "TopK" if k else None)
    if activation == "ReLU":
        return None
    if activation != "TopK":
        raise SAEFormatError(f"{source}: field 'activation' is {activation!r}; expected 'TopK' or 'ReLU' "
                             "(or pass k for a state dict saved without it)")
    k = k or (state.get("activation_state_dict") or {}).get("k")
    if not isinstance(k, int) or k <= 0:
        raise SAEFormatError(f"{source}: field 'activation_state_dict.k' is missing; pass k explicitly")
    return k


def _unpickling_reason(exc: Exception) -> str:
    """The line of torch.load's long message that says what was refused (not its advice to unpickle)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    reason = (named or lines or [type(exc).__name__])[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", reason.split(" Please use")[0])


def from_openai(src: Path, *, k: int | None = None) -> tuple[AnySAE, dict[str, Any]]:
    path = _openai_file(src)
    source = str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:  # refused or truncated
        raise SAEFormatError(f"{source}: not a plain state dict loadable with weights_only=True "
                             f"({_unpickling_reason(exc)})") from exc
    if not isinstance(state, dict):
        raise SAEFormatError(f"{source}: expected a state dict, got {type(state).__name__}")
    d_sae, d_in = (_shape_of(state, "encoder.weight", 0, source), _shape_of(state, "encoder.weight", 1, source))
    check_tensors(state, {"encoder.weight": (d_sae, d_in), "decoder.weight": (d_in, d_sae), "pre_bias": (d_in,),
                          "latent_bias": (d_sae,), "encoder.bias": (d_sae,)}, source=source, optional=("encoder.bias",))
    top_k = _openai_k(state, k, source)
    b_enc = state["latent_bias"] + state.get("encoder.bias", torch.zeros(d_sae))
    native = {"W_enc": state["encoder.weight"].T, "b_enc": b_enc, "W_dec": state["decoder.weight"].T,
              "b_dec": state["pre_bias"]}
    if top_k is None:
        return build_native("relu", native, source=source, d_in=d_in, d_sae=d_sae), {}
    sae = build_native("topk", native, source=source, d_in=d_in, d_sae=d_sae, k=top_k)
    return InputNormalizedSAE(sae, "layer_norm").eval(), {}
