"""The activation store: Parquet parts plus ``manifest.json`` (see README, "Activation store").

Rows are tokens. Columns: ``token_id`` int32, ``window_id`` int64, ``position`` int32, ``doc_id`` int64,
and one column per hook point, named exactly as the hook (the format and storage dtypes, bfloat16
included, live in sae_core/store_format.py; every name of it is importable from here).

A store is a local folder or an object-storage prefix (``s3://``, ``gs://``, any URI pyarrow takes;
see sae_core/fs.py). Reading is bounded in memory: :meth:`ActivationStore.read_hook` reads only the
row groups it needs, :meth:`ActivationStore.iter_batches` streams shuffled batches (sae_core/store_batches.py).
pyarrow is imported lazily so that ``import sae_core`` stays light; it is a hard dependency all the same.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from sae_core.fs import Location, is_uri
from sae_core.lock import FileLock
from sae_core.store_format import (
    DTYPES,
    FORMAT,
    MANIFEST,
    META_COLUMNS,
    Manifest,
    StoreError,
    decode_values,
    encode_values,
    has_manifest,
    locate,
    make_table,
    read_manifest,
    storage_numpy_dtype,
    write_manifest,
)

__all__ = [  # the store's public names, whichever module defines them
    "DTYPES", "FORMAT", "MANIFEST", "META_COLUMNS", "ROW_GROUP_ROWS", "SHUFFLE_BUFFER", "ActivationStore", "Manifest",
    "RowGroup", "StoreError", "StoreProblem", "StoreWriter", "decode_values", "encode_values",
    "has_manifest", "locate", "make_table", "read_manifest", "sha256_file", "storage_numpy_dtype", "store_lock", "write_manifest",
]

logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 8192
"""Rows per Parquet row group written by :class:`StoreWriter`: the unit of reading and shuffling."""
SHUFFLE_BUFFER = 1 << 19
"""Default rows held by the batch reader (two fills of half): at context 128 and batches of 4096 its
batches hold about 82% of the distinct windows of a full shuffle (benchmarks/shuffle.py, README)."""
FOOTER_READERS = 8
"""Threads reading Parquet footers of a store whose manifest does not list its row groups."""



def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _NoLock:
    """Object storage: no lock file (a writer there must be the only one by arrangement)."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def store_lock(root: str | Path | Location) -> FileLock | _NoLock:
    """The writer's lock of a store (a FileLock beside a local store; nothing for object storage), for a
    caller that must read the store before opening its :class:`StoreWriter` (which takes it again)."""
    location = root if isinstance(root, Location) else locate(root)
    if not location.local:
        return _NoLock()
    return FileLock(location.path, purpose="writing an activation store")


class StoreWriter:
    """Writes parts atomically and keeps the manifest true after each one; one writer per store.

    A part is published whole (temp file + rename locally, one upload on object storage), then the
    manifest is rewritten (also atomically), so a reader never sees a listed part that is not there;
    each part's entry records its rows, byte size and sha256. A writer opened on an existing store
    resumes it: finished parts are kept, never rewritten.

    A local store is written by one process at a time: the writer holds the store's lock
    (sae_core/lock.py) from opening to :meth:`close` (or :meth:`finish`, or its end as a context
    manager or object); a second writer gets a LockError naming the holder, and a dead holder's lock is
    taken over. Object storage has no such lock. A writer whose manifest says ``"complete": false``
    marks the store unfinished until :meth:`finish`, and readers refuse to train on it
    (:meth:`ActivationStore.check_ready`); a manifest without the key (another writer's) counts as
    finished.
    """

    def __init__(self, root: str | Path, manifest: Manifest):
        self.location = locate(root)
        self.root: Path | str = root if is_uri(root) else Path(root)
        lock = store_lock(self.location)
        lock.acquire()  # before the old manifest is read: the store is ours until close()
        self._release = weakref.finalize(self, lock.release)
        try:
            self._open(manifest)
        except BaseException:
            self.close()
            raise

    def _open(self, manifest: Manifest) -> None:
        self.location.makedirs()
        if has_manifest(self.location):
            old = read_manifest(self.location)
            for key in ("model", "hooks", "dtype", "context_size", "corpus"):
                if getattr(old, key) != getattr(manifest, key):
                    raise StoreError(f"{self.location.display} already holds a store with {key}={getattr(old, key)!r}, "
                                     f"not {getattr(manifest, key)!r}", reason="store_exists")
            manifest.files = old.files
            manifest.n_tokens = old.n_tokens
        self.location.remove_stale(".part-*.tmp")  # left by a killed writer: we hold the lock, no one else writes
        self.manifest = manifest
        write_manifest(self.location, manifest)

    def close(self) -> None:
        """Release the store's lock (the store stays as it is: unfinished if it was)."""
        self._release()

    def finish(self) -> None:
        """Mark the store complete (``"complete": true``) and release it."""
        self.manifest.extra["complete"] = True
        write_manifest(self.location, self.manifest)
        self.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def done_parts(self) -> set[str]:
        return {f["path"] for f in self.manifest.files}

    @staticmethod
    def part_name(index: int) -> str:
        return f"part-{index:05d}.parquet"

    def forget_part(self, index: int) -> None:
        """Drop part ``index`` from the manifest (its file stays until rewritten), e.g. to rewrite it longer."""
        self.manifest.files = [f for f in self.manifest.files if f["path"] != self.part_name(index)]
        self.manifest.n_tokens = sum(f["rows"] for f in self.manifest.files)
        write_manifest(self.location, self.manifest)

    def write_part(self, index: int, table) -> None:
        import pyarrow.parquet as pq

        name = self.part_name(index)
        if name in self.done_parts:
            return
        missing = [h for h in self.manifest.hooks if h not in table.column_names]
        if missing:
            raise StoreError(f"part {name} lacks hook column(s) {missing}")
        tmp = self.location.scratch_file(name)
        try:
            # Dictionary pages suit the id columns, not activations (pyarrow would try one and fall back).
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, use_dictionary=list(META_COLUMNS))
            digest, size = sha256_file(Path(tmp)), Path(tmp).stat().st_size
            groups = [min(ROW_GROUP_ROWS, table.num_rows - s) for s in range(0, table.num_rows, ROW_GROUP_ROWS)]
            self.location.publish_file(tmp, name)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.manifest.files.append({"path": name, "rows": table.num_rows, "bytes": size, "sha256": digest,
                                    "row_groups": groups})
        self.manifest.files.sort(key=lambda f: f["path"])
        self.manifest.n_tokens = sum(f["rows"] for f in self.manifest.files)
        write_manifest(self.location, self.manifest)


@dataclass(frozen=True)
class StoreProblem:
    path: str
    problem: str


class RowGroup(NamedTuple):
    """One Parquet row group of a store: the unit of reading."""

    file: int
    """Index of its file in the manifest."""
    group: int
    """Row-group index inside that file."""
    start: int
    """Global row index of its first row."""
    rows: int
    """Rows it holds."""


class ActivationStore:
    """Read access to a store written by this project or by anything that follows its schema, on a
    local path or a URI (see sae_core/fs.py)."""

    def __init__(self, root: str | Path):
        self.location = locate(root)
        self.root: Path | str = root if is_uri(root) else Path(root)
        """The folder (a Path) or the URI as given."""
        self.manifest = read_manifest(self.location)
        self._row_groups: list[RowGroup] | None = None

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
            raise StoreError(f"hook {hook!r} is not in store {self.location.display}; it has {self.hooks}")
        if d is not None and self.manifest.hooks[hook]["d"] != d:
            raise StoreError(f"hook {hook!r} in {self.location.display} has d={self.manifest.hooks[hook]['d']}, "
                             f"but d={d} was asked for")

    def part_paths(self) -> tuple[Any, list[str]]:
        """(pyarrow filesystem, paths of the parts on it), e.g. for ``ray.data.read_parquet(paths, filesystem=fs)``."""
        return self.location.fs, [self.location.join(f["path"]) for f in self.manifest.files]

    # -- row groups: the unit of every read ------------------------------------------------------------
    def parquet_file(self, file_index: int):
        """An open ``pyarrow.parquet.ParquetFile`` of one part (a missing part is a StoreError)."""
        import pyarrow.parquet as pq

        name = self.manifest.files[file_index]["path"]
        import pyarrow as pa

        path = self.location.join(name)
        try:
            source = self.location.fs.open_input_file(path)
        except FileNotFoundError as exc:
            raise StoreError(f"store file {path} listed in the manifest is missing", reason="missing_part") from exc
        try:
            parquet = pq.ParquetFile(source, pre_buffer=not self.location.local)
        except (pa.ArrowException, OSError) as exc:  # truncated or not Parquet
            raise StoreError(f"store file {path} is unreadable: {exc}", reason="missing_part") from exc
        rows = self.manifest.files[file_index]["rows"]
        if parquet.metadata.num_rows != rows:
            raise StoreError(f"store file {path} has {parquet.metadata.num_rows} rows, the manifest says {rows}",
                             reason="missing_part")
        return parquet

    def row_groups(self) -> list[RowGroup]:
        """Every row group in store order; from the manifest's ``row_groups`` where listed, else the footers."""
        if self._row_groups is None:
            def sizes(i: int) -> list[int]:
                listed = self.manifest.files[i].get("row_groups")
                if listed is not None:
                    return [int(n) for n in listed]
                meta = self.parquet_file(i).metadata
                return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

            with ThreadPoolExecutor(FOOTER_READERS) as pool:
                per_file = list(pool.map(sizes, range(len(self.manifest.files))))
            groups, offset = [], 0
            for i, (entry, counts) in enumerate(zip(self.manifest.files, per_file, strict=True)):
                if sum(counts) != int(entry["rows"]):
                    raise StoreError(f"store file {entry['path']} holds {sum(counts)} rows, the manifest says "
                                     f"{entry['rows']}; the store is inconsistent")
                for g, n in enumerate(counts):
                    groups.append(RowGroup(i, g, offset, n))
                    offset += n
            self._row_groups = groups
        return self._row_groups

    def read_group(self, group: RowGroup, columns: list[str]):
        """One row group's columns as a pyarrow Table."""
        return self.parquet_file(group.file).read_row_group(group.group, columns=columns)

    def stored_values(self, table, hook: str) -> np.ndarray:
        """A hook column of a table read from this store as [N, d] values in the storage dtype (no copy
        where pyarrow allows)."""
        d = self.d(hook)
        if hook not in table.column_names:
            raise StoreError(f"hook column {hook!r} is missing from the Parquet files of {self.location.display}")
        column = table.column(hook).combine_chunks()
        width = getattr(column.type, "list_size", None)
        if width != d:
            raise StoreError(f"hook column {hook!r} has list size {width}, but the manifest says d={d}; "
                             "the store is inconsistent")
        values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
        want = storage_numpy_dtype(self.manifest.dtype)
        if values.dtype != want:
            raise StoreError(f"hook column {hook!r} holds {values.dtype} values, but the manifest's dtype "
                             f"{self.manifest.dtype!r} is stored as {want}; the store is inconsistent")
        return values

    def to_float32(self, stored_ND: np.ndarray, hook: str) -> torch.Tensor:
        """Stored values as float32, refusing NaN/Inf."""
        tensor = decode_values(stored_ND, self.manifest.dtype)
        finite_ND = np.isfinite(tensor.numpy())  # numpy's check is ~10x faster than torch's on one thread
        if not finite_ND.all():
            bad = int((~finite_ND).any(axis=1).sum())
            raise StoreError(f"hook {hook!r} in {self.location.display} has {bad} row(s) with NaN/Inf activations")
        return tensor

    def _groups_between(self, start: int, stop: int) -> Iterator[tuple[RowGroup, int, int]]:
        """(group, lo, hi): the row groups overlapping rows [start, stop) and the local slice of each."""
        for group in self.row_groups():
            lo, hi = max(start - group.start, 0), min(stop - group.start, group.rows)
            if lo < hi:
                yield group, lo, hi

    def read_hook(self, hook: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of one hook as a float32 tensor [N, d], checked for NaN/Inf; reads only the
        row groups holding those rows."""
        d = self.d(hook)
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        out = np.empty((max(stop - start, 0), d), dtype=storage_numpy_dtype(self.manifest.dtype))
        for group, lo, hi in self._groups_between(start, stop):
            at = group.start + lo - start
            out[at : at + hi - lo] = self.stored_values(self.read_group(group, [hook]), hook)[lo:hi]
        return self.to_float32(out, hook)

    def read_meta(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the metadata columns (token_id, window_id, position, doc_id)."""
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        out: dict[str, list[np.ndarray]] = {c: [] for c in META_COLUMNS}
        for group, lo, hi in self._groups_between(start, stop):
            table = self.read_group(group, list(META_COLUMNS))
            for c in META_COLUMNS:
                out[c].append(table.column(c).to_numpy()[lo:hi])
        return {c: (np.concatenate(v) if v else np.zeros(0, dtype=META_COLUMNS[c])) for c, v in out.items()}

    def iter_batches(
        self,
        hook: str | Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
        stop: int | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        loop: bool = True,
        rank: int = 0,
        world: int = 1,
        skip_batches: int = 0,
    ) -> Iterator[torch.Tensor] | Iterator[dict[str, torch.Tensor]]:
        """Yield shuffled float32 batches of rows [start, stop), looping over epochs (one epoch with
        ``loop=False``); given several hooks, dicts {hook: batch} whose batches hold the same rows
        (transcoders read an input and a target hook, crosscoders several sources).

        The sequence of global batches of ``batch_size`` rows depends only on ``seed``, the rows and
        ``shuffle_buffer``; data-parallel rank ``rank`` of ``world`` gets rows [rank * b, (rank + 1) * b)
        of each, b = batch_size // world, so N ranks together see exactly what one would. The first
        ``skip_batches`` global batches (already trained on, when resuming) are passed over without
        reading their data.

        Memory is bounded by the buffer, not the store: each epoch visits the row groups in a seeded
        order (in a few passes, each over a share of every row group, so a fill spans more context
        windows), cut into fills of ``shuffle_buffer / 2`` rows (rounded down to whole batches); a
        fill's rows are permuted and dealt into batches. A rank keeps only its share of a fill, in the
        storage dtype, and a background thread reads the next fill (its row groups concurrently)
        while this one is consumed: at most about shuffle_buffer / world rows are held. Each epoch
        yields (stop - start) // batch_size batches. See sae_core/store_batches.py.
        """
        from sae_core.store_batches import stream_batches

        single = isinstance(hook, str)
        hooks = [hook] if single else list(hook)
        for h in hooks:
            self.check_hook(h)
        plan = self.batch_plan(batch_size, seed=seed, start=start, stop=stop, shuffle_buffer=shuffle_buffer,
                               rank=rank, world=world)
        batches = stream_batches(self, hooks, plan, loop=loop, skip_batches=skip_batches)
        return (b[hook] for b in batches) if single else batches

    def batch_plan(self, batch_size: int, *, seed: int = 0, start: int = 0, stop: int | None = None,
                   shuffle_buffer: int = SHUFFLE_BUFFER, rank: int = 0, world: int = 1, passes: int | None = None):
        """The :class:`sae_core.store_batches.BatchPlan` behind :meth:`iter_batches` (same arguments;
        ``passes`` overrides :func:`~sae_core.store_batches.choose_passes`, for measurements)."""
        from sae_core.store_batches import BatchPlan, choose_passes

        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        if stop - start < batch_size:
            raise StoreError(f"store {self.location.display} has {stop - start} usable rows, fewer than one batch "
                             f"of {batch_size}", reason="too_few_rows")
        fill_rows = shuffle_buffer // 2  # the fill being consumed and the next one, read ahead
        if passes is None:
            passes = choose_passes(context_size=self.manifest.context_size, batch_size=batch_size,
                                   fill_rows=fill_rows, rows=stop - start)
        return BatchPlan(groups=self.row_groups(), start=start, stop=stop, batch_size=batch_size, seed=seed,
                         fill_rows=fill_rows, passes=passes, rank=rank, world=world)

    @property
    def complete(self) -> bool:
        """False while the store's writer has not finished it (its manifest says ``"complete": false``)."""
        return self.manifest.extra.get("complete") is not False

    def part_sizes(self) -> list[int | None]:
        """Each listed part's size in bytes from the filesystem's file info (one request per part on object
        storage, no data read); None for a part that is not there."""
        import pyarrow.fs as pafs

        infos = self.location.fs.get_file_info([self.location.join(f["path"]) for f in self.manifest.files])
        return [info.size if info.type == pafs.FileType.File else None for info in infos]

    def check_ready(self, *, verify: bool = False) -> None:
        """Refuse (StoreError) a store to train on that its writer has not finished (reason "incomplete"), or
        whose listed parts are missing or not of the byte size the manifest records ("missing_part",
        "bad_part"); with ``verify``, also any problem :meth:`verify` finds (sha256, rows, schema).
        Parts listed without a size (stores of other writers) are checked for presence only."""
        where = self.location.display
        if not self.complete:
            raise StoreError(f"store {where} is incomplete: its writer stopped before finishing it",
                             reason="incomplete")
        for entry, size in zip(self.manifest.files, self.part_sizes(), strict=True):
            path = self.location.join(entry["path"])
            if size is None:
                raise StoreError(f"store file {path} listed in the manifest is missing", reason="missing_part")
            if entry.get("bytes") is not None and size != entry["bytes"]:
                raise StoreError(f"store file {path} is {size} bytes, the manifest says {entry['bytes']}",
                                 reason="bad_part")
        if verify:
            problems = self.verify()
            if problems:
                more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
                raise StoreError(f"store file {self.location.join(problems[0].path)}: {problems[0].problem}{more}",
                                 reason="bad_part")

    def verify(self) -> list[StoreProblem]:
        """Check the store is finished and every listed file exists, has the manifest's byte size, row count
        and sha256, and the schema."""
        import pyarrow.parquet as pq

        problems: list[StoreProblem] = []
        if not self.complete:
            problems.append(StoreProblem(MANIFEST, "incomplete: its writer stopped before finishing it"))
        total = 0
        for entry, size in zip(self.manifest.files, self.part_sizes(), strict=True):
            name = entry["path"]
            if size is None:
                problems.append(StoreProblem(name, "missing"))
                continue
            if entry.get("bytes") is not None and size != entry["bytes"]:
                problems.append(StoreProblem(name, f"{size} bytes, manifest says {entry['bytes']}"))
                continue
            digest = self.location.sha256(name)
            if entry.get("sha256") and digest != entry["sha256"]:
                problems.append(StoreProblem(name, f"sha256 {digest[:12]}… != manifest {entry['sha256'][:12]}…"))
                continue
            try:
                with self.location.fs.open_input_file(self.location.join(name)) as fh:
                    parquet = pq.ParquetFile(fh)
                    meta, schema = parquet.metadata, parquet.schema_arrow
            except Exception as exc:  # a corrupted file raises many kinds of errors
                problems.append(StoreProblem(name, f"unreadable Parquet: {exc}"))
                continue
            if meta.num_rows != entry["rows"]:
                problems.append(StoreProblem(name, f"{meta.num_rows} rows, manifest says {entry['rows']}"))
            for column in [*META_COLUMNS, *self.manifest.hooks]:
                if column not in schema.names:
                    problems.append(StoreProblem(name, f"column {column!r} missing"))
            total += meta.num_rows
        if not problems and total != self.manifest.n_tokens:
            problems.append(StoreProblem(MANIFEST, f"n_tokens={self.manifest.n_tokens} but files hold {total} rows"))
        return problems
