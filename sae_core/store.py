"""The activation store: Parquet parts plus ``manifest.json`` (see docs in README, "Activation store").

Rows are tokens. Columns: ``token_id`` int32, ``window_id`` int64, ``position`` int32, ``doc_id`` int64,
and one ``fixed_size_list<float16|float32>[d]`` column per hook point, named exactly as the hook.

pyarrow is imported lazily so that ``import sae_core`` stays light; it is a hard dependency of the
project all the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from sae_core.config import ReasonedError

logger = logging.getLogger(__name__)

FORMAT = "sae-activations/1"
MANIFEST = "manifest.json"
META_COLUMNS = {"token_id": "int32", "window_id": "int64", "position": "int32", "doc_id": "int64"}
DTYPES = ("float16", "float32")


class StoreError(ReasonedError):
    """A store that cannot be read or written as asked; the message names the problem, ``reason`` its kind:
    "not_a_store", "store_exists" (another store is in the way), "missing_part", "too_few_rows"."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(kw_only=True)
class Manifest:
    """The parsed ``manifest.json`` of a store."""

    model: str
    """Name or path of the model the activations came from."""
    hooks: dict[str, dict[str, Any]]
    """Hook name -> {"d": width}."""
    dtype: str = "float32"
    """Storage dtype of the hook columns: float16 or float32."""
    context_size: int = 0
    """Tokens per context window the model was run on."""
    n_tokens: int = 0
    """Rows over all files."""
    corpus: str = ""
    """Where the text came from."""
    files: list[dict[str, Any]] = field(default_factory=list)
    """[{"path", "rows", "sha256"}] in order."""
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


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{root} is not an activation store: no {MANIFEST}", reason="not_a_store")
    try:
        raw = json.loads(path.read_text())
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


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    atomic_write_bytes(Path(root) / MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode())


def _hook_array(values_ND: np.ndarray, dtype: str):
    import pyarrow as pa

    n, d = values_ND.shape
    flat = pa.array(np.ascontiguousarray(values_ND, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, d)


def make_table(meta: dict[str, np.ndarray], hooks: dict[str, np.ndarray], dtype: str):
    """Build one Parquet-ready table from per-row metadata arrays and [N, d] hook arrays."""
    import pyarrow as pa

    n_rows = {len(v) for v in meta.values()} | {len(v) for v in hooks.values()}
    if len(n_rows) != 1:
        raise StoreError(f"columns disagree on the number of rows: {sorted(n_rows)}")
    columns = {name: pa.array(np.asarray(meta[name], dtype=kind)) for name, kind in META_COLUMNS.items()}
    for name, values in hooks.items():
        columns[name] = _hook_array(values, dtype)
    return pa.table(columns)


class StoreWriter:
    """Writes parts atomically and keeps the manifest true after each one.

    A part is written to a temp file and renamed, then the manifest is rewritten (also atomically).
    A writer opened on an existing store resumes it: finished parts are kept, never rewritten.
    """

    def __init__(self, root: str | Path, manifest: Manifest):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / MANIFEST).exists():
            old = read_manifest(self.root)
            for key in ("model", "hooks", "dtype", "context_size", "corpus"):
                if getattr(old, key) != getattr(manifest, key):
                    raise StoreError(f"{self.root} already holds a store with {key}={getattr(old, key)!r}, not "
                                     f"{getattr(manifest, key)!r}", reason="store_exists")
            manifest.files = old.files
            manifest.n_tokens = old.n_tokens
        self.manifest = manifest
        write_manifest(self.root, manifest)

    @property
    def done_parts(self) -> set[str]:
        return {f["path"] for f in self.manifest.files}

    @staticmethod
    def part_name(index: int) -> str:
        return f"part-{index:05d}.parquet"

    def write_part(self, index: int, table) -> None:
        import pyarrow.parquet as pq

        name = self.part_name(index)
        if name in self.done_parts:
            return
        missing = [h for h in self.manifest.hooks if h not in table.column_names]
        if missing:
            raise StoreError(f"part {name} lacks hook column(s) {missing}")
        path = self.root / name
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.manifest.files.append({"path": name, "rows": table.num_rows, "sha256": sha256_file(path)})
        self.manifest.files.sort(key=lambda f: f["path"])
        self.manifest.n_tokens = sum(f["rows"] for f in self.manifest.files)
        write_manifest(self.root, self.manifest)


@dataclass(frozen=True)
class StoreProblem:
    path: str
    problem: str


class ActivationStore:
    """Read access to a store written by this project or by anything that follows its schema."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest.hooks)

    @property
    def n_tokens(self) -> int:
        return sum(int(f["rows"]) for f in self.manifest.files)

    def d(self, hook: str) -> int:
        self.check_hook(hook)
        return int(self.manifest.hooks[hook]["d"])

    def check_hook(self, hook: str, d: int | None = None) -> None:
        if hook not in self.manifest.hooks:
            raise StoreError(f"hook {hook!r} is not in store {self.root}; it has {self.hooks}")
        if d is not None and self.manifest.hooks[hook]["d"] != d:
            raise StoreError(
                f"hook {hook!r} in {self.root} has d={self.manifest.hooks[hook]['d']}, but d={d} was asked for"
            )

    def read_columns(self, columns: list[str], file_index: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        entry = self.manifest.files[file_index]
        path = self.root / entry["path"]
        if not path.is_file():
            raise StoreError(f"store file {path} listed in the manifest is missing", reason="missing_part")
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as exc:  # truncated or not Parquet
            raise StoreError(f"store file {path} is unreadable: {exc}", reason="missing_part") from exc
        if table.num_rows != entry["rows"]:
            raise StoreError(f"store file {path} has {table.num_rows} rows, the manifest says {entry['rows']}",
                             reason="missing_part")
        return table

    def read_hook(self, hook: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of one hook as a float32 tensor [N, d], checked for NaN/Inf."""
        d = self.d(hook)
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        parts, offset = [], 0
        for i, entry in enumerate(self.manifest.files):
            rows = int(entry["rows"])
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if lo < hi:
                parts.append(self._hook_values(self.read_columns([hook], i), hook, d)[lo:hi])
            offset += rows
        values = np.concatenate(parts) if parts else np.zeros((0, d), dtype=np.float32)
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
            raise StoreError(f"hook {hook!r} in {self.root} has {bad} row(s) with NaN/Inf activations")
        return tensor

    def _hook_values(self, table, hook: str, d: int) -> np.ndarray:
        if hook not in table.column_names:
            raise StoreError(f"hook column {hook!r} is missing from the Parquet files of {self.root}")
        column = table.column(hook).combine_chunks()
        width = getattr(column.type, "list_size", None)
        if width != d:
            raise StoreError(
                f"hook column {hook!r} has list size {width}, but the manifest says d={d}; the store is inconsistent"
            )
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)

    def read_meta(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        stop = self.n_tokens if stop is None else stop
        cols = list(META_COLUMNS)
        out: dict[str, list[np.ndarray]] = {c: [] for c in cols}
        offset = 0
        for i, entry in enumerate(self.manifest.files):
            rows = int(entry["rows"])
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            if lo < hi:
                table = self.read_columns(cols, i)
                for c in cols:
                    out[c].append(table.column(c).to_numpy()[lo:hi])
            offset += rows
        return {c: (np.concatenate(v) if v else np.zeros(0, dtype=META_COLUMNS[c])) for c, v in out.items()}

    def iter_batches(
        self,
        hook: str | Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
        stop: int | None = None,
        shuffle_buffer: int = 1 << 18,
        loop: bool = True,
        rank: int = 0,
        world: int = 1,
        skip_batches: int = 0,
    ) -> Iterator[torch.Tensor] | Iterator[dict[str, torch.Tensor]]:
        """Yield shuffled float32 batches of rows [start, stop), looping over epochs; given several hooks,
        dicts {hook: batch} whose batches hold the same rows (transcoders read an input and a target
        hook, crosscoders several sources).

        The sequence of global batches of ``batch_size`` rows depends only on ``seed`` and the rows;
        data-parallel rank ``rank`` of ``world`` gets rows [rank * b, (rank + 1) * b) of each, b =
        batch_size // world, so N ranks together see exactly what one would. The first
        ``skip_batches`` global batches (already trained on, when resuming) are passed over.

        Rows are drawn in a seeded permutation of [start, stop), ``shuffle_buffer`` at a time. Note that
        the hook columns are read whole into memory once (``_rows`` caches them), so memory grows with
        the store, not with the buffer.
        """
        single = isinstance(hook, str)
        hooks = [hook] if single else list(hook)
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        if stop - start < batch_size:
            raise StoreError(f"store {self.root} has {stop - start} usable rows, fewer than one batch of {batch_size}",
                             reason="too_few_rows")
        rng = np.random.default_rng(seed)
        chunk = max(batch_size, shuffle_buffer)
        local = batch_size // world
        index = 0
        while True:
            order = rng.permutation(np.arange(start, stop))
            for lo in range(0, len(order), chunk):
                rows = np.sort(order[lo : lo + chunk])
                perm = rng.permutation(len(rows))
                n_batches = len(perm) // batch_size
                if index + n_batches <= skip_batches:
                    index += n_batches
                    continue
                values = {h: self._rows(h, hooks, rows)[perm] for h in hooks}
                for b in range(0, n_batches * batch_size, batch_size):
                    index += 1
                    if index <= skip_batches:
                        continue
                    mine = slice(b + rank * local, b + (rank + 1) * local)
                    yield values[hook][mine] if single else {h: v[mine] for h, v in values.items()}
            if not loop:
                return

    def _rows(self, hook: str, wanted: list[str], rows: np.ndarray) -> torch.Tensor:
        """Rows of ``hook``, from a cache that keeps the hooks of one iteration (``wanted``) only."""
        if not hasattr(self, "_cache"):
            self._cache: dict[str, torch.Tensor] = {}
        for stale in [h for h in self._cache if h not in wanted]:
            del self._cache[stale]
        if hook not in self._cache:
            self._cache[hook] = self.read_hook(hook)
        return self._cache[hook][torch.from_numpy(rows)]

    def verify(self) -> list[StoreProblem]:
        """Check every listed file exists, has the manifest's row count and sha256, and the schema."""
        import pyarrow.parquet as pq

        problems: list[StoreProblem] = []
        total = 0
        for entry in self.manifest.files:
            path = self.root / entry["path"]
            if not path.is_file():
                problems.append(StoreProblem(entry["path"], "missing"))
                continue
            digest = sha256_file(path)
            if entry.get("sha256") and digest != entry["sha256"]:
                problems.append(StoreProblem(entry["path"], f"sha256 {digest[:12]}… != manifest {entry['sha256'][:12]}…"))
                continue
            try:
                meta = pq.read_metadata(path)
                schema = pq.read_schema(path)
            except Exception as exc:  # a corrupted file raises many kinds of errors
                problems.append(StoreProblem(entry["path"], f"unreadable Parquet: {exc}"))
                continue
            if meta.num_rows != entry["rows"]:
                problems.append(StoreProblem(entry["path"], f"{meta.num_rows} rows, manifest says {entry['rows']}"))
            for name in [*META_COLUMNS, *self.manifest.hooks]:
                if name not in schema.names:
                    problems.append(StoreProblem(entry["path"], f"column {name!r} missing"))
            total += meta.num_rows
        if not problems and total != self.manifest.n_tokens:
            problems.append(StoreProblem(MANIFEST, f"n_tokens={self.manifest.n_tokens} but files hold {total} rows"))
        return problems

