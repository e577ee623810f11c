"""Shuffled training batches from an activation store in bounded memory: a sliding shuffle buffer.

The order is planned on row indices alone (no data), identical for every world size, and replayable:

- epoch ``e`` streams the store's row groups (clipped to [start, stop)) once, in a permutation seeded by
  (seed, e), each row group's rows in order;
- a buffer of ``buffer_rows`` slots is filled from the stream; then each global batch takes
  ``batch_size`` distinct slots drawn uniformly (a generator seeded by (seed, e) draws every batch of
  the epoch in turn), and the stream's next rows refill those slots;
- once the stream is spent, the rows left in the buffer are permuted and dealt into batches; the last
  rows (fewer than a batch) are left out, so an epoch is exactly ``(stop - start) // batch_size``
  batches and every row is in at most one of them;
- rank ``r`` of ``world`` takes positions [r * b, (r + 1) * b) of each global batch, b = batch_size // world.

Why a sliding buffer rather than shuffling fills one after another: tokens of one context window are
strongly correlated. A row stays in the buffer for a geometric time (mean ``buffer_rows`` rows of
stream), so a batch mixes rows of every window read over the last few buffers, most of them
represented by one row: with x = context_size * batch_size / buffer_rows, a batch holds about
Ein(x) / x of the distinct windows a full shuffle gives (Ein(x) = the integral of (1 - e^-t) / t from
0 to x; 0.80 at x = 1, 0.89 at x = 0.5), where shuffling independent fills of F rows gives
(1 - e^-x') / x' with x' = context_size * batch_size / F (0.63 at x' = 1), and each row group is read
once per epoch. sae_core/shuffle_quality.py measures the result.

Reading: every rank mirrors the whole buffer (``buffer_rows`` rows in the storage dtype: which rows a
rank needs is known only when they leave the buffer, long after they are read), and a background
thread executes the plan: it reads upcoming row groups on a thread pool (several at once; pyarrow
releases the GIL, and object storage likes parallel GETs), scatters new rows into the slots a batch
freed, and hands out this rank's slices as float32 tensors through a short queue, so the training
step waits on I/O only when the disk is slower than the trainer. Resuming at global batch k replays
the plan to k (indices only) and reads just the row groups holding the rows then in the buffer.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from sae_core.store import ActivationStore, RowGroup

READERS = 4
"""Row groups read at once."""
READ_AHEAD = 2 * READERS
"""Row groups read (or being read) ahead of the one being scattered into the buffer."""
QUEUED_BATCHES = 4
"""Finished batches waiting for the trainer."""
PLANNED_AHEAD = 512
"""At most this many planned operations waiting (their index arrays), however few row groups they read."""


class Take(NamedTuple):
    """Global batch ``batch`` is the rows now in ``slots`` (in batch order)."""

    batch: int
    slots: np.ndarray


class Fill(NamedTuple):
    """Rows ``rows`` of ``group`` go into ``slots``; ``before`` is the first global batch that sees them."""

    group: RowGroup
    rows: slice | np.ndarray
    slots: np.ndarray
    before: int


class _Epoch:
    """One epoch of the plan as a sequence of Fill and Take operations. The buffer state (``ids``, the
    global row in each slot, and ``live``, whether a slot still holds a row to hand out) is the state
    *before* the operation last yielded: its effect is applied when the next one is asked for."""

    def __init__(self, plan: BatchPlan, epoch: int):
        self.plan, self.epoch = plan, epoch
        self.first = epoch * plan.batches_per_epoch
        self.ids = np.full(plan.capacity, -1, dtype=np.int64)
        self.live = np.zeros(plan.capacity, dtype=bool)

    def stream(self) -> list[tuple[RowGroup, int, int]]:
        """(group, lo, hi): the epoch's row groups, clipped, in their seeded order."""
        p = self.plan
        clipped = [(g, max(p.start - g.start, 0), min(p.stop - g.start, g.rows)) for g in p.groups]
        clipped = [c for c in clipped if c[1] < c[2]]
        return [clipped[k] for k in np.random.default_rng([p.seed, self.epoch, 0]).permutation(len(clipped))]

    def _fills(self, pieces: Iterator[tuple[RowGroup, int, int]], pending: list, slots: np.ndarray,
               before: int) -> Iterator[Fill]:
        """Fills of ``len(slots)`` stream rows (``pending`` holds the unread rest of the current piece)."""
        at = 0
        while at < len(slots):
            if not pending:
                pending.append(next(pieces))
            group, lo, hi = pending.pop()
            take = min(hi - lo, len(slots) - at)
            fill = Fill(group, slice(lo, lo + take), slots[at : at + take], before)
            yield fill
            self.ids[fill.slots] = group.start + np.arange(lo, lo + take)
            self.live[fill.slots] = True
            at += take
            if lo + take < hi:
                pending.append((group, lo + take, hi))

    def __iter__(self) -> Iterator[Fill | Take]:
        p = self.plan
        stream = self.stream()
        remaining = sum(hi - lo for _, lo, hi in stream)
        pieces, pending = iter(stream), []
        rng = np.random.default_rng([p.seed, self.epoch, 1])
        yield from self._fills(pieces, pending, np.arange(p.capacity), self.first)
        remaining -= p.capacity
        batch = self.first
        while remaining > 0:
            slots = rng.choice(p.capacity, p.batch_size, replace=False)
            yield Take(batch, slots)
            self.live[slots] = False
            refill = slots[: min(remaining, p.batch_size)]
            yield from self._fills(pieces, pending, refill, batch + 1)
            remaining -= len(refill)
            batch += 1
        rest = rng.permutation(np.flatnonzero(self.live))
        for i in range(len(rest) // p.batch_size):
            slots = rest[i * p.batch_size : (i + 1) * p.batch_size]
            yield Take(batch, slots)
            self.live[slots] = False
            batch += 1
        if batch != self.first + p.batches_per_epoch:
            raise AssertionError(f"epoch {self.epoch} planned {batch - self.first} batches")

    def restore(self, batch: int) -> list[Fill]:
        """Fills putting back, slot for slot, the live rows of the buffer's current state (to resume at
        global batch ``batch``), one per row group holding some."""
        slots = np.flatnonzero(self.live)
        ids = self.ids[slots]
        starts = np.array([g.start for g in self.plan.groups])
        owner = np.searchsorted(starts, ids, side="right") - 1
        fills = []
        for k in np.unique(owner).tolist():
            mine = owner == k
            group = self.plan.groups[k]
            fills.append(Fill(group, ids[mine] - group.start, slots[mine], batch))
        return fills


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
    buffer_rows: int
    """Slots of the shuffle buffer (at least one batch)."""
    rank: int = 0
    """This reader's data-parallel rank."""
    world: int = 1
    """Number of data-parallel ranks."""

    def __post_init__(self) -> None:
        if self.buffer_rows < self.batch_size:
            raise ValueError(f"a shuffle buffer of {self.buffer_rows} rows cannot hold a batch of {self.batch_size}")

    @property
    def batches_per_epoch(self) -> int:
        return (self.stop - self.start) // self.batch_size

    @property
    def capacity(self) -> int:
        """Slots actually used: the buffer, or every row when the rows fit in it (a full shuffle)."""
        return min(self.buffer_rows, self.stop - self.start)

    @property
    def local(self) -> int:
        """Rows of each global batch this rank takes."""
        return self.batch_size // self.world

    def epoch(self, epoch: int) -> _Epoch:
        return _Epoch(self, epoch)

    def schedule(self, *, loop: bool, skip_batches: int) -> Iterator[Fill | Take]:
        """The operations that yield global batches ``skip_batches``, ``skip_batches + 1``, ...: those of
        the epoch holding ``skip_batches`` from that batch on (after fills that restore the buffer if it
        is inside the epoch), then, with ``loop``, the following epochs."""
        epoch = skip_batches // self.batches_per_epoch if loop else 0
        while True:
            plan = self.epoch(epoch)
            resuming = skip_batches > plan.first
            for op in plan:
                if resuming:
                    if isinstance(op, Fill) or op.batch < skip_batches:
                        continue
                    yield from plan.restore(op.batch)
                    resuming = False
                yield op
            if not loop:
                return
            epoch += 1

    def global_batches(self, epoch: int = 0) -> Iterator[np.ndarray]:
        """The global row indices of each batch of an epoch, in order (no data read)."""
        plan = self.epoch(epoch)
        for op in plan:
            if isinstance(op, Take):
                yield plan.ids[op.slots]


class _Producer:
    """Runs a schedule on a background thread: reads row groups ahead on a thread pool, keeps the
    buffer, and queues this rank's batches as float32 tensors."""

    def __init__(self, store: ActivationStore, hooks: list[str], plan: BatchPlan,
                 schedule: Iterator[Fill | Take]):
        self.store, self.hooks, self.plan = store, hooks, plan
        self._ready: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(schedule,), daemon=True)
        self._thread.start()

    def _read(self, group: RowGroup) -> dict[str, np.ndarray]:
        table = self.store.read_group(group, self.hooks)
        return {h: self.store.stored_values(table, h) for h in self.hooks}

    def _put(self, item) -> bool:
        while not self._stop.is_set():  # wakes up to notice an abandoned reader
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, schedule: Iterator[Fill | Take]) -> None:
        try:
            with ThreadPoolExecutor(READERS) as pool:
                if self._execute(schedule, pool):
                    self._put(None)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._put(exc)

    def _execute(self, schedule: Iterator[Fill | Take], pool: ThreadPoolExecutor) -> bool:
        from sae_core.store import storage_numpy_dtype

        dtype = storage_numpy_dtype(self.store.manifest.dtype)
        buffer = {h: np.empty((self.plan.capacity, self.store.d(h)), dtype=dtype) for h in self.hooks}
        ahead: deque[Fill | Take] = deque()
        reads: dict[RowGroup, tuple[Future, int]] = {}  # group -> (its read, fills still to use it)
        ops = iter(schedule)
        lo, hi = self.plan.rank * self.plan.local, (self.plan.rank + 1) * self.plan.local

        def want(fill: Fill) -> None:
            future, uses = reads.get(fill.group, (None, 0))
            reads[fill.group] = (future or pool.submit(self._read, fill.group), uses + 1)

        def look_ahead() -> bool:
            """Pull operations until READ_AHEAD groups are wanted; False once the schedule is spent."""
            while not ahead or (len(reads) < READ_AHEAD and len(ahead) < PLANNED_AHEAD):
                op = next(ops, None)
                if op is None:
                    return bool(ahead)
                ahead.append(op)
                if isinstance(op, Fill):
                    want(op)
            return True

        def scatter(fill: Fill) -> None:
            future, uses = reads[fill.group]
            values = future.result()
            for h in self.hooks:
                buffer[h][fill.slots] = values[h][fill.rows]
            if uses > 1:
                reads[fill.group] = (future, uses - 1)
            else:
                del reads[fill.group]

        while look_ahead():
            op = ahead.popleft()
            if isinstance(op, Take):
                mine = op.slots[lo:hi]
                if not self._put({h: self.store.to_float32(buffer[h][mine], h) for h in self.hooks}):
                    return False
            else:
                scatter(op)
        return True

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            while True:
                item = self._ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()


def stream_batches(store: ActivationStore, hooks: list[str], plan: BatchPlan, *, loop: bool,
                   skip_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's float32 batches {hook: [local, d]} in the plan's order (NaN/Inf rows are an error)."""
    yield from _Producer(store, hooks, plan, plan.schedule(loop=loop, skip_batches=skip_batches))
