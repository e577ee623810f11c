"""Shuffled training batches from an activation store in bounded memory.

The order is planned on row indices alone, so it is cheap to skip, identical for every world size,
and needs no data to compute:

- epoch ``e`` visits the store's row groups (clipped to [start, stop)) in a permutation seeded by
  (seed, e), and cuts that row sequence into *fills* of ``fill_rows`` rows rounded down to whole
  batches (the last fill of an epoch takes the rest);
- fill ``f`` permutes its rows with a generator seeded by (seed, e, f) and deals them into global
  batches; the remainder of an epoch (fewer rows than a batch) is left out, so an epoch is exactly
  ``(stop - start) // batch_size`` batches;
- rank ``r`` of ``world`` takes positions [r * b, (r + 1) * b) of each global batch, b = batch_size // world.

Reading: a rank reads the row groups of a fill (several at once, on a thread pool) but keeps only
the rows its slices need, in the storage dtype; a background thread reads fill f + 1 while fill f is
consumed. Every rank still reads each fill's row groups whole: a row of any row group can land in
any rank's slice (splitting them by rank would need batches sorted by row group, and then each
rank's slice would come from 1/world of the fill's windows, which biases per-rank statistics).
"""

from __future__ import annotations

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


class Fill(NamedTuple):
    """A run of rows shuffled together: pieces of row groups, in the order they fill the pool."""

    epoch: int
    index: int
    """Its index inside the epoch (part of its permutation's seed)."""
    first_batch: int
    """Global index of its first batch, counted from the first epoch."""
    pieces: list[tuple[RowGroup, int, int]]
    """(row group, lo, hi): rows [lo, hi) of that group, concatenated in this order."""
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

    def fills(self, epoch: int) -> Iterator[Fill]:
        pieces = [(g, max(self.start - g.start, 0), min(self.stop - g.start, g.rows)) for g in self.groups]
        pieces = [p for p in pieces if p[1] < p[2]]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(pieces))
        size = max(1, self.fill_rows // self.batch_size) * self.batch_size
        current: list[tuple[RowGroup, int, int]] = []
        have, index, first = 0, 0, epoch * self.batches_per_epoch
        for k in order:
            group, lo, hi = pieces[k]
            while lo < hi:
                take = min(hi - lo, size - have)
                current.append((group, lo, lo + take))
                have, lo = have + take, lo + take
                if have == size:
                    yield Fill(epoch, index, first, current, have)
                    current, have, index, first = [], 0, index + 1, first + size // self.batch_size
        if have >= self.batch_size:
            yield Fill(epoch, index, first, current, have)

    def rank_positions(self, fill: Fill) -> np.ndarray:
        """[n_batches, local] positions in the fill's pool of the rows this rank takes, batch by batch."""
        perm = np.random.default_rng([self.seed, fill.epoch, fill.index]).permutation(fill.rows)
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
    for group, lo, hi in fill.pieces:
        i0, i1 = np.searchsorted(sorted_pos, [offset, offset + hi - lo])
        if i0 < i1:
            jobs.append(pool.submit(read, group, sorted_pos[i0:i1] - offset + lo, int(i0)))
        offset += hi - lo
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
