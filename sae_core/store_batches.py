"""Shuffled training batches from an activation store in bounded memory.

The order is planned on row indices alone, so it is cheap to skip, identical for every world size,
and needs no data to compute:

- epoch ``e`` makes ``passes`` passes over the store's row groups (clipped to [start, stop)); pass
  ``j`` visits them in a permutation seeded by (seed, e, j) and takes every ``passes``-th row of each
  (a seeded offset per group and epoch decides which), so each pass holds a disjoint share of every
  row group and the passes together hold every row once;
- that row sequence is cut into *fills* of ``fill_rows`` rows rounded down to whole batches (the last
  fill of an epoch takes the rest); fill ``f`` permutes its rows with a generator seeded by (seed, e,
  f) and deals them into global batches; the remainder of an epoch (fewer rows than a batch) is left
  out, so an epoch is exactly ``(stop - start) // batch_size`` batches;
- rank ``r`` of ``world`` takes positions [r * b, (r + 1) * b) of each global batch, b = batch_size // world.

Why passes: tokens of one context window are strongly correlated, and a fill of R whole row groups
holds only R / context_size windows, so a batch of B rows drawn from it repeats windows (with
x = context_size * B / R, a batch holds about (1 - e^-x) / x of the distinct windows a full shuffle
would give). Taking 1/passes of each row group lets a fill span ``passes`` times as many windows in
the same memory, at the price of reading each row group ``passes`` times per epoch.
:func:`choose_passes` picks the smallest number that brings x to :data:`TARGET_X` (at most
:data:`MAX_PASSES`); sae_core/shuffle_quality.py measures the result.

Reading: a rank reads the row groups of a fill (several at once, on a thread pool) but keeps only
the rows its slices need, in the storage dtype; a background thread reads fill f + 1 while fill f is
consumed. Every rank still reads each fill's row groups whole: a row of any row group can land in
any rank's slice (splitting them by rank would need batches sorted by row group, and then each
rank's slice would come from 1/world of the fill's windows, which biases per-rank statistics).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from sae_core.store import ActivationStore, RowGroup

READERS = 4
"""Row groups of one fill read at once (pyarrow releases the GIL; object storage likes parallel GETs)."""
TARGET_X = 0.25
"""context_size * batch_size / (passes * fill rows) aimed at: a batch then holds about 88% of the
distinct windows of a full shuffle."""
MAX_PASSES = 4
"""At most this many reads of each row group per epoch: the reader's rows/s is about a plain scan's
divided by the passes, so more would starve a fast (GPU) trainer."""


def choose_passes(*, context_size: int, batch_size: int, fill_rows: int, rows: int) -> int:
    """Passes per epoch for :data:`TARGET_X`; 1 when the fill holds every row (a full shuffle already)
    or the window length is unknown (``context_size`` 0)."""
    if fill_rows >= rows or context_size <= 0:
        return 1
    wanted = math.ceil(context_size * batch_size / (TARGET_X * fill_rows))
    return max(1, min(wanted, MAX_PASSES, math.ceil(rows / fill_rows)))


class Fill(NamedTuple):
    """A run of rows shuffled together: pieces of row groups, in the order they fill the pool."""

    epoch: int
    index: int
    """Its index inside the epoch (part of its permutation's seed)."""
    first_batch: int
    """Global index of its first batch, counted from the first epoch."""
    pieces: list[tuple[RowGroup, range]]
    """(row group, rows of that group), concatenated in this order."""
    rows: int


@dataclass(frozen=True, kw_only=True)
class BatchPlan:
    """Which rows every global batch holds, and which of them one rank takes (see the module docstring)."""

    groups: list[RowGroup]
    """Every row group of the store, in store order."""
    start: int
    """First row (global index) to draw from."""
    stop: int
    """One past the last row to draw from."""
    batch_size: int
    """Rows per global batch."""
    seed: int
    """Seed of the whole order."""
    fill_rows: int
    """Rows shuffled together (rounded down to whole batches, at least one)."""
    passes: int = 1
    """Passes per epoch, each over a 1/passes share of every row group (see the module docstring)."""
    rank: int = 0
    """This reader's data-parallel rank."""
    world: int = 1
    """Number of data-parallel ranks."""

    @property
    def batches_per_epoch(self) -> int:
        return (self.stop - self.start) // self.batch_size

    @property
    def local(self) -> int:
        """Rows of each global batch this rank takes."""
        return self.batch_size // self.world

    def pieces(self, epoch: int) -> Iterator[tuple[RowGroup, range]]:
        """The epoch's row sequence: (row group, its rows in this pass), pass after pass."""
        clipped = [(g, max(self.start - g.start, 0), min(self.stop - g.start, g.rows)) for g in self.groups]
        clipped = [c for c in clipped if c[1] < c[2]]
        offsets = np.random.default_rng([self.seed, epoch, 2]).integers(0, self.passes, len(clipped))
        for j in range(self.passes):
            for k in np.random.default_rng([self.seed, epoch, 0, j]).permutation(len(clipped)):
                group, lo, hi = clipped[k]
                rows = range(lo + (int(offsets[k]) + j) % self.passes, hi, self.passes)
                if len(rows):
                    yield group, rows

    def fills(self, epoch: int) -> Iterator[Fill]:
        size = max(1, self.fill_rows // self.batch_size) * self.batch_size
        current: list[tuple[RowGroup, range]] = []
        have, index, first = 0, 0, epoch * self.batches_per_epoch
        for group, rows in self.pieces(epoch):
            while len(rows):
                take = min(len(rows), size - have)
                current.append((group, rows[:take]))
                have, rows = have + take, rows[take:]
                if have == size:
                    yield Fill(epoch, index, first, current, have)
                    current, have, index, first = [], 0, index + 1, first + size // self.batch_size
        if have >= self.batch_size:
            yield Fill(epoch, index, first, current, have)

    def rank_positions(self, fill: Fill) -> np.ndarray:
        """[n_batches, local] positions in the fill's pool of the rows this rank takes, batch by batch."""
        perm = np.random.default_rng([self.seed, fill.epoch, 1, fill.index]).permutation(fill.rows)
        n_batches = fill.rows // self.batch_size
        batches = perm[: n_batches * self.batch_size].reshape(n_batches, self.batch_size)
        return batches[:, self.rank * self.local : (self.rank + 1) * self.local]

    def schedule(self, *, loop: bool, skip_batches: int) -> Iterator[tuple[Fill, np.ndarray]]:
        """(fill, positions of this rank's remaining batches in it), from global batch ``skip_batches`` on."""
        epoch = skip_batches // self.batches_per_epoch if loop else 0
        while True:
            for fill in self.fills(epoch):
                n_batches = fill.rows // self.batch_size
                if fill.first_batch + n_batches > skip_batches:
                    yield fill, self.rank_positions(fill)[max(skip_batches - fill.first_batch, 0) :]
            if not loop:
                return
            epoch += 1


def _read_rows(store: ActivationStore, hooks: list[str], fill: Fill, positions_BL: np.ndarray,
               pool: ThreadPoolExecutor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """This rank's rows of a fill, in the storage dtype and sorted by pool position, and for each
    (batch, slot) the index of its row in them."""
    wanted = positions_BL.reshape(-1)
    order = np.argsort(wanted, kind="stable")
    sorted_pos = wanted[order]
    slot = np.empty_like(order)
    slot[order] = np.arange(len(order))
    from sae_core.store import storage_numpy_dtype

    dtype = storage_numpy_dtype(store.manifest.dtype)
    out = {h: np.empty((len(wanted), store.d(h)), dtype=dtype) for h in hooks}

    def read(group: RowGroup, rows: np.ndarray, i0: int) -> None:
        table = store.read_group(group, hooks)
        for h in hooks:
            out[h][i0 : i0 + len(rows)] = store.stored_values(table, h)[rows]

    jobs, offset = [], 0
    for group, rows in fill.pieces:
        i0, i1 = np.searchsorted(sorted_pos, [offset, offset + len(rows)])
        if i0 < i1:
            jobs.append(pool.submit(read, group, rows.start + (sorted_pos[i0:i1] - offset) * rows.step, int(i0)))
        offset += len(rows)
    for job in jobs:
        job.result()
    return out, slot.reshape(positions_BL.shape)


class _Prefetcher:
    """Reads the next fill on a background thread; at most one fill waits while one is consumed."""

    def __init__(self, store: ActivationStore, hooks: list[str], schedule: Iterator[tuple[Fill, np.ndarray]]):
        self._ready: queue.Queue = queue.Queue()
        self._slot = threading.Semaphore(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(store, hooks, schedule), daemon=True)
        self._thread.start()

    def _run(self, store: ActivationStore, hooks: list[str], schedule: Iterator[tuple[Fill, np.ndarray]]) -> None:
        try:
            with ThreadPoolExecutor(READERS) as pool:
                for fill, positions in schedule:
                    while not self._slot.acquire(timeout=0.1):  # wakes up to notice an abandoned reader
                        if self._stop.is_set():
                            return
                    if self._stop.is_set():
                        return
                    self._ready.put(_read_rows(store, hooks, fill, positions, pool))
            self._ready.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._ready.put(exc)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        try:
            while True:
                item = self._ready.get()
                self._slot.release()  # the previous fill is dropped: the thread may read the next
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                del item
        finally:
            self._stop.set()


def stream_batches(store: ActivationStore, hooks: list[str], plan: BatchPlan, *, loop: bool,
                   skip_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's float32 batches {hook: [local, d]} in the plan's order (NaN/Inf rows are an error)."""
    for rows, slots_BL in _Prefetcher(store, hooks, plan.schedule(loop=loop, skip_batches=skip_batches)):
        for slots in slots_BL:
            yield {h: store.to_float32(rows[h][slots], h) for h in hooks}
        del rows, slots_BL  # before the next fill is asked for, so at most two are held
