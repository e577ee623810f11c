"""The activation store's format: manifest, schema and storage dtypes (see sae_core/store.py, which
re-exports every name here; import them from there).

Hook columns are ``fixed_size_list<float16|float32>[d]``, or for bfloat16 (which Parquet lacks)
``fixed_size_list<uint16>[d]`` holding the raw bfloat16 bits (the upper half of the float32 bits,
rounded to nearest even); the manifest's ``dtype`` and the Arrow field's ``dtype`` metadata say which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from sae_core.config import ReasonedError
from sae_core.fs import Location, resolve

FORMAT = "sae-activations/1"
MANIFEST = "manifest.json"
META_COLUMNS = {"token_id": "int32", "window_id": "int64", "position": "int32", "doc_id": "int64"}
DTYPES = ("float16", "float32", "bfloat16")
class StoreError(ReasonedError):
    """A store that cannot be read or written as asked; the message names the problem, ``reason`` its kind:
    "not_a_store", "store_exists" (another store is in the way), "missing_part", "too_few_rows",
    "bad_location" (a URI the filesystem layer cannot open), "incomplete" (its writer has not finished it),
    "bad_part" (a part of another size or content than the manifest records)."""


def locate(root: str | Path) -> Location:
    """The filesystem location of a store root (a local path or a URI), as a StoreError if pyarrow refuses it."""
    try:
        return resolve(root)
    except ValueError as exc:
        raise StoreError(str(exc), reason="bad_location") from exc


# -- storage dtypes ---------------------------------------------------------------------------------
def storage_numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a hook column's values as stored (bfloat16: its raw bits as uint16)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def encode_values(values_ND: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    """Activations as stored: float16/float32 arrays, or bfloat16 rounded to nearest even and kept as
    uint16 bits (arrays already of the storage dtype pass through)."""
    if dtype != "bfloat16":
        values = values_ND.numpy() if isinstance(values_ND, torch.Tensor) else values_ND
        return np.asarray(values, dtype=dtype)
    if isinstance(values_ND, np.ndarray) and values_ND.dtype == np.uint16:
        return values_ND
    tensor = values_ND if isinstance(values_ND, torch.Tensor) else torch.from_numpy(np.asarray(values_ND))
    return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def decode_values(stored_ND: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored values (see :func:`encode_values`) as a float32 tensor."""
    values = np.ascontiguousarray(stored_ND, dtype=np.uint16 if dtype == "bfloat16" else np.float32)
    if not values.flags.writeable:  # e.g. a Ray batch; torch wants memory it may write
        values = values.copy()
    if dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(values)


@dataclass(kw_only=True)
class Manifest:
    """The parsed ``manifest.json`` of a store."""

    model: str
    """Name or path of the model the activations came from."""
    hooks: dict[str, dict[str, Any]]
    """Hook name -> {"d": width}."""
    dtype: str = "float32"
    """Storage dtype of the hook columns: float16, float32 or bfloat16 (stored as uint16 bits)."""
    context_size: int = 0
    """Tokens per context window the model was run on."""
    n_tokens: int = 0
    """Rows over all files."""
    corpus: str = ""
    """Where the text came from."""
    files: list[dict[str, Any]] = field(default_factory=list)
    """[{"path", "rows", "sha256"}] in order; our writer adds "bytes" (the part's size) and "row_groups" (rows
    per row group)."""
    excluded: list[str] = field(default_factory=list)
    """Kinds of positions not stored (bos, pad, special)."""
    bos_token_id: int | None = None
    """The tokenizer's BOS id, so windows can be rebuilt."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any further keys, kept as they are."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"manifest dtype {self.dtype!r} is not one of {DTYPES}")
        for name, info in self.hooks.items():
            if not isinstance(info, dict) or not isinstance(info.get("d"), int) or info["d"] <= 0:
                raise StoreError(f"manifest hook {name!r} needs a positive integer 'd', got {info!r}")
        check_file_entries(self.files)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "model": self.model,
            "hooks": self.hooks,
            "dtype": self.dtype,
            "context_size": self.context_size,
            "n_tokens": self.n_tokens,
            "corpus": self.corpus,
            "files": self.files,
            "excluded": self.excluded,
            "bos_token_id": self.bos_token_id,
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        if raw.get("format") != FORMAT:
            raise StoreError(f"manifest format is {raw.get('format')!r}, expected {FORMAT!r}")
        known = {"model", "hooks", "dtype", "context_size", "n_tokens", "corpus", "files", "excluded", "bos_token_id"}
        missing = [k for k in ("model", "hooks", "files") if k not in raw]
        if missing:
            raise StoreError(f"manifest lacks required field(s) {missing}")
        kwargs = {k: raw[k] for k in known if k in raw}
        extra = {k: v for k, v in raw.items() if k not in known and k != "format"}
        return cls(**kwargs, extra=extra)


def has_manifest(root: str | Path | Location) -> bool:
    """True when ``root`` (a path, URI or Location) holds a ``manifest.json``."""
    loc = root if isinstance(root, Location) else locate(root)
    return loc.exists(MANIFEST)


def check_file_entries(files: Any) -> None:
    """Each entry names a part inside the store (a relative path without '..') with an integer row count
    (and a sha256 string, when given): a manifest must never make a reader open a file outside its store."""
    if not isinstance(files, list):
        raise StoreError(f"manifest 'files' must be a list, got {type(files).__name__}")
    for i, entry in enumerate(files):
        path = entry.get("path") if isinstance(entry, dict) else None
        rows = entry.get("rows") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not path or PurePosixPath(path).is_absolute() or "\\" in path \
                or ".." in PurePosixPath(path).parts:
            raise StoreError(f"manifest files[{i}]: path {path!r} is not a file inside the store")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0 or not isinstance(entry.get("sha256", ""), str):
            raise StoreError(f"manifest files[{i}] ({path}): needs an integer 'rows' >= 0 (and 'sha256' a string)")
        size = entry.get("bytes")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise StoreError(f"manifest files[{i}] ({path}): 'bytes' must be an integer >= 0, got {size!r}")


def read_manifest(root: str | Path | Location) -> Manifest:
    loc = root if isinstance(root, Location) else locate(root)
    if not loc.exists(MANIFEST):
        raise StoreError(f"{loc.display} is not an activation store: no {MANIFEST}", reason="not_a_store")
    path = loc.join(MANIFEST)
    try:
        raw = json.loads(loc.read_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise StoreError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        return Manifest.from_dict(raw)
    except StoreError as exc:
        raise StoreError(f"{path}: {exc}", reason=exc.reason) from exc
    except TypeError as exc:  # a field of the wrong type for the dataclass
        raise StoreError(f"{path}: {exc}") from exc


def write_manifest(root: str | Path | Location, manifest: Manifest) -> None:
    loc = root if isinstance(root, Location) else locate(root)
    loc.write_bytes(MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode())


def _hook_array(values_ND: np.ndarray, dtype: str):
    import pyarrow as pa

    n, d = values_ND.shape
    flat = pa.array(np.ascontiguousarray(encode_values(values_ND, dtype)).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, d)


def make_table(meta: dict[str, np.ndarray], hooks: dict[str, np.ndarray], dtype: str):
    """Build one Parquet-ready table from per-row metadata arrays and [N, d] hook arrays (floats, or
    for bfloat16 also its uint16 bits from :func:`encode_values`)."""
    import pyarrow as pa

    n_rows = {len(v) for v in meta.values()} | {len(v) for v in hooks.values()}
    if len(n_rows) != 1:
        raise StoreError(f"columns disagree on the number of rows: {sorted(n_rows)}")
    columns = {name: pa.array(np.asarray(meta[name], dtype=kind)) for name, kind in META_COLUMNS.items()}
    fields = [pa.field(name, col.type) for name, col in columns.items()]
    for name, values in hooks.items():
        columns[name] = _hook_array(values, dtype)
        # The Arrow field says what the bits are, for readers that never see the manifest.
        fields.append(pa.field(name, columns[name].type, metadata={"dtype": dtype}))
    return pa.table(columns, schema=pa.schema(fields))
