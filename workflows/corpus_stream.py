"""The corpus as a stream of context windows for Ray Data, packed in a read task, part by part.

`sae collect` used to pack the whole corpus on the driver (every window's tokens as numpy arrays
and a Python dict per window) before the first forward pass, so the driver grew with the corpus.
Here one Ray Data read task tokenizes and packs as it goes (workflows/corpus.py iter_window_chunks)
and yields one block per store part: the part's windows, except parts already in the store, each
row carrying ``part_rows``, the rows (kept tokens) its part will hold, so the driver knows when a
part is complete however the actor pool reorders batches. Ray Data's streaming execution keeps only
a few blocks in flight.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from workflows.corpus import Windows, iter_documents, iter_window_chunks
from workflows.models import load_tokenizer


def part_blocks(cfg: dict[str, Any], done: set[int], windows: tuple[int, int] | None = None) -> Iterator[Any]:
    """One pyarrow table per part not in ``done``: window_id, token_ids, doc_ids, keep, part_rows; with
    ``windows`` = (lo, hi), only the windows of ids lo <= id < hi (a live stream's training or held-out
    share; ``part_rows`` then still counts the whole part)."""
    model, cache_dir, pw = cfg["model"], cfg.get("cache_dir"), cfg["part_windows"]
    tokenizer = load_tokenizer(model, cache_dir)
    docs = iter_documents(cfg["corpus"], text_field=cfg["text_field"])
    pending: list[Windows] = []
    have, part = 0, 0
    wanted = windows or (0, np.iinfo(np.int64).max)
    for chunk in iter_window_chunks(docs, tokenizer, context_size=cfg["context_size"], n_tokens=cfg["n_tokens"],
                                    chunk_windows=pw):
        pending.append(chunk)
        have += len(chunk.token_ids)
        while have >= pw:
            packed = Windows(*(np.concatenate(a) for a in zip(*pending, strict=True)))
            if part not in done:
                yield from _block(Windows(*(a[:pw] for a in packed)), part * pw, wanted)
            pending, have, part = [Windows(*(a[pw:] for a in packed))], have - pw, part + 1
            if part * pw >= wanted[1]:
                return
    if have and part not in done:
        yield from _block(Windows(*(np.concatenate(a) for a in zip(*pending, strict=True))), part * pw, wanted)


def _block(windows: Windows, first_window: int, wanted: tuple[int, int]) -> Iterator[Any]:
    """The part's table, cut to the window ids in [wanted[0], wanted[1]) (nothing if none is)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n = len(windows.token_ids)
    lo, hi = max(wanted[0] - first_window, 0), min(wanted[1] - first_window, n)
    if lo >= hi:
        return
    yield pa.table({
        "window_id": np.arange(first_window + lo, first_window + hi, dtype=np.int64),
        "token_ids": ArrowTensorArray.from_numpy(windows.token_ids[lo:hi]),
        "doc_ids": ArrowTensorArray.from_numpy(windows.doc_ids[lo:hi]),
        "keep": ArrowTensorArray.from_numpy(windows.keep[lo:hi]),
        "part_rows": np.full(hi - lo, int(windows.keep.sum()), dtype=np.int64),
    })


def window_dataset(cfg: dict[str, Any], done: set[int], windows: tuple[int, int] | None = None):
    """A Ray Data dataset of the windows of the parts not in ``done`` (and, given ``windows`` = (lo, hi),
    of ids in [lo, hi)), packed as it is read."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class WindowSource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(lambda: part_blocks(cfg, done, windows), meta)]

    # No CPU of its own: the packer is light next to the model actors, and a CPU reserved for it
    # could leave too few for the actors on a small node.
    return ray.data.read_datasource(WindowSource(), num_cpus=0)
