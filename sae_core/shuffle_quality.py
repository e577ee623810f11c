"""How well a store reader shuffles: distinct context windows and documents per batch, against a
uniform shuffle of the whole row range.

Tokens of one window (and of one document) are strongly correlated, so a batch that holds many rows
of few windows is worth less than its size. For the batches :meth:`ActivationStore.iter_batches`
yields (taken from its plan: the same rows, no activations read), this counts the distinct
``window_id`` and ``doc_id`` values per batch, and computes what a uniform draw of ``batch_size``
rows without replacement from [start, stop) would give in expectation:
sum over windows w of 1 - C(N - n_w, B) / C(N, B), with n_w the rows of window w.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from sae_core.store import SHUFFLE_BUFFER, ActivationStore


@dataclass(kw_only=True)
class ShuffleQuality:
    """Mean distinct windows and documents per batch: the reader's, and a full shuffle's expectation."""

    batches: int
    """Batches measured."""
    windows_per_batch: float
    """Distinct window_id values in a batch of the reader, averaged."""
    docs_per_batch: float
    """Distinct doc_id values in a batch of the reader, averaged."""
    full_windows_per_batch: float
    """Expected distinct windows in a batch of a uniform shuffle of the same rows."""
    full_docs_per_batch: float
    """Expected distinct documents in a batch of a uniform shuffle of the same rows."""

    @property
    def window_ratio(self) -> float:
        return self.windows_per_batch / self.full_windows_per_batch

    @property
    def doc_ratio(self) -> float:
        return self.docs_per_batch / self.full_docs_per_batch

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "window_ratio": self.window_ratio, "doc_ratio": self.doc_ratio}


def expected_distinct(sizes: np.ndarray, n_rows: int, batch_size: int) -> float:
    """E[distinct groups] in ``batch_size`` rows drawn without replacement from ``n_rows`` rows that
    form groups of ``sizes`` rows."""
    values, counts = np.unique(sizes, return_counts=True)
    total = 0.0
    for size, count in zip(values.tolist(), counts.tolist(), strict=True):
        i = np.arange(size, dtype=np.float64)
        # P(no row of a group of `size` rows is drawn) = prod_i (N - B - i) / (N - i)
        none = np.prod(np.clip((n_rows - batch_size - i) / (n_rows - i), 0.0, None))
        total += count * (1.0 - none)
    return float(total)


def _group_sizes(store: ActivationStore, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows per distinct window_id and doc_id in [start, stop), one row group's metadata at a time."""
    uniques: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"window_id": [], "doc_id": []}
    for group in store.row_groups():
        lo, hi = max(start - group.start, 0), min(stop - group.start, group.rows)
        if lo >= hi:
            continue
        table = store.read_group(group, list(uniques))
        for column, found in uniques.items():
            found.append(np.unique(table.column(column).to_numpy()[lo:hi], return_counts=True))
    sizes = {}
    for column, found in uniques.items():
        ids = np.concatenate([u for u, _ in found])
        counts = np.concatenate([c for _, c in found])
        _, inverse = np.unique(ids, return_inverse=True)
        sizes[column] = np.bincount(inverse, weights=counts).astype(np.int64)
    return sizes


class _MetaCache:
    """window_id and doc_id of any rows, read one row group at a time and kept (a measuring tool: it
    holds the metadata of the row groups the measured batches touch)."""

    def __init__(self, store: ActivationStore):
        self.store, self.groups = store, store.row_groups()
        self.starts = np.array([g.start for g in self.groups])
        self.columns: dict[int, dict[str, np.ndarray]] = {}

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        owner = np.searchsorted(self.starts, rows, side="right") - 1
        out = {"window_id": np.empty(len(rows), np.int64), "doc_id": np.empty(len(rows), np.int64)}
        for k in np.unique(owner).tolist():
            if k not in self.columns:
                table = self.store.read_group(self.groups[k], list(out))
                self.columns[k] = {c: table.column(c).to_numpy() for c in out}
            mine = owner == k
            for c in out:
                out[c][mine] = self.columns[k][c][rows[mine] - self.groups[k].start]
        return out


def shuffle_quality(store: ActivationStore, batch_size: int, *, shuffle_buffer: int = SHUFFLE_BUFFER, seed: int = 0,
                    start: int = 0, stop: int | None = None, max_batches: int = 200) -> ShuffleQuality:
    """Distinct windows/documents per batch of ``store.iter_batches(..., batch_size, seed=seed,
    start=start, stop=stop, shuffle_buffer=shuffle_buffer)`` over its first ``max_batches`` batches,
    against a uniform shuffle of rows [start, stop). Reads only the metadata columns."""
    plan = store.batch_plan(batch_size, seed=seed, start=start, stop=stop, shuffle_buffer=shuffle_buffer)
    meta = _MetaCache(store)
    windows, docs = [], []
    for rows in plan.global_batches(0):
        batch = meta(rows)
        windows.append(len(np.unique(batch["window_id"])))
        docs.append(len(np.unique(batch["doc_id"])))
        if len(windows) >= max_batches:
            break
    sizes = _group_sizes(store, plan.start, plan.stop)
    n_rows = plan.stop - plan.start
    return ShuffleQuality(batches=len(windows), windows_per_batch=float(np.mean(windows)),
                          docs_per_batch=float(np.mean(docs)),
                          full_windows_per_batch=expected_distinct(sizes["window_id"], n_rows, batch_size),
                          full_docs_per_batch=expected_distinct(sizes["doc_id"], n_rows, batch_size))


def training_fvu(store: ActivationStore, held_out_ND: torch.Tensor, *, shuffle_buffer: int, steps: int,
                 batch_size: int, d_sae: int, k: int, lr: float = 3e-3, seed: int = 0, hook: str = "h") -> float:
    """Held-out fraction of variance unexplained of a TopK SAE trained for ``steps`` batches read from
    ``store`` through a shuffle buffer of ``shuffle_buffer`` rows (a buffer holding every row is a full
    shuffle): how much a reader's shuffle costs the trainer. ``held_out_ND`` should be a uniform sample
    of the data's distribution, not the store's last rows (in a document-ordered store those are a few
    documents)."""
    import sae_core
    from sae_core.trainer import TrainConfig, Trainer, evaluate

    torch.manual_seed(seed)
    sae = sae_core.build(sae_core.make_config("topk", d_in=store.d(hook), d_sae=d_sae, k=k))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, shuffle_buffer=shuffle_buffer, seed=seed,
                      log_every=steps)
    trainer = Trainer(sae, cfg)
    batches = store.iter_batches(hook, batch_size, seed=seed, shuffle_buffer=shuffle_buffer)
    trainer.initialize(next(store.iter_batches(hook, cfg.init_sample_tokens, seed=seed + 1, shuffle_buffer=store.n_tokens)))
    for _ in range(steps):
        trainer.step(next(batches))
    return evaluate(trainer.sae, held_out_ND, scaling_factor=trainer.scaling_factor)["fvu"]
