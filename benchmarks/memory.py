"""Peak memory of `sae train` on a small and a large store, and the reader's rows/s against a plain scan.

    python benchmarks/memory.py                                  # 0.5 GB vs 4 GB stores (float32, d=576)
    python benchmarks/memory.py --sizes-gb 0.25 1 --repeats 2    # quicker
    python benchmarks/memory.py --collect-model M --collect-tokens 100000 1000000   # sae collect's driver

For each size it writes a store of random float32 activations (same settings, only the row count
differs), runs ``sae train`` in process on it (TopK, d_sae 1024, batch 4096, --steps) as a child
process and reads the child's peak RSS; then it times ``iter_batches`` (the trainer's reader, once its
buffer is full and its read-ahead used up) against a plain pyarrow
scan of the same files delivering the same number of float32 rows, the two interleaved. Every number
is the median of --repeats runs with their min-max spread; a ratio is the median (and spread) of the
repeat-by-repeat ratios. Both stores use one --shuffle-buffer, by default 131072 rows (0.3 GB at
d=576 float32), below the small store's 217k rows: with sae train's default of 524288 rows the 0.5 GB
store would fit whole in its buffer, and the comparison would be buffer against buffer, not small
store against large. To time the code before a change, run this file with PYTHONPATH pointing at
the older checkout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_core.store import ROW_GROUP_ROWS, SHUFFLE_BUFFER, ActivationStore, Manifest, StoreWriter, make_table
from sae_core.store_batches import QUEUED_BATCHES, READ_AHEAD

HOOK = "h"
ROWS_PER_PART = 65536


def write_store(root: Path, rows: int, d: int) -> ActivationStore:
    writer = StoreWriter(root, Manifest(model="bench", hooks={HOOK: {"d": d}}, dtype="float32", context_size=128))
    rng = np.random.default_rng(0)
    for part, lo in enumerate(range(0, rows, ROWS_PER_PART)):
        r = np.arange(lo, min(lo + ROWS_PER_PART, rows))
        meta = {"token_id": np.zeros(len(r)), "window_id": r // 128, "position": r % 128, "doc_id": r // 512}
        values = rng.standard_normal((len(r), d), dtype=np.float32)
        writer.write_part(part, make_table(meta, {HOOK: values}, "float32"))
    return ActivationStore(root)


def train_peak_rss_mb(store: Path, out: Path, steps: int, shuffle_buffer: int) -> float:
    """Peak RSS (MB) of an in-process `sae train` child."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "workflows.cli", "train", "--activations", str(store), "--hook", HOOK, "--arch",
           "topk", "--d-sae", "1024", "--k", "32", "--steps", str(steps), "--batch-size", "4096", "--out", str(out),
           "--shuffle-buffer", str(shuffle_buffer)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"sae train failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def collect_peak_rss_mb(model: str, tokens: int, out: Path) -> float:
    """Peak RSS (MB) of the `sae collect` driver process (Ray's own processes are not its children)."""
    cmd = [sys.executable, "-m", "workflows.cli", "collect", "--model", model, "--hook", "blocks.0.hook_resid_post",
           "--tokens", str(tokens), "--out", str(out), "--batch-size", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"sae collect failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def reader_rows_per_s(store: ActivationStore, n_batches: int, shuffle_buffer: int) -> float:
    batches = store.iter_batches(HOOK, 4096, seed=0, shuffle_buffer=shuffle_buffer)
    # The buffer is filled before the first step; what counts is keeping up after it, once the row
    # groups read ahead and the batches queued meanwhile are used up.
    for _ in range(1 + READ_AHEAD * ROW_GROUP_ROWS // 4096 + QUEUED_BATCHES):
        next(batches)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    return n_batches * 4096 / (time.perf_counter() - start)


def scan_rows_per_s(store: ActivationStore, n_batches: int) -> float:
    """A plain sequential pyarrow scan delivering float32 tensors of 4096 rows (no shuffle)."""
    import pyarrow.parquet as pq

    fs, paths = store.part_paths()
    d, seen = store.d(HOOK), 0
    start = time.perf_counter()
    for path in paths:
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=4096, columns=[HOOK]):
            values = batch.column(0).flatten().to_numpy().reshape(-1, d)
            torch.from_numpy(values.astype(np.float32, copy=True))  # a tensor the trainer may own
            seen += 1
            if seen == n_batches:
                return n_batches * 4096 / (time.perf_counter() - start)
    return seen * 4096 / (time.perf_counter() - start)


def summary(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):.{digits}f} (spread {min(values):.{digits}f}-{max(values):.{digits}f})"


def ratios(top: list[float], bottom: list[float]) -> str:
    """Median and spread of the repeat-by-repeat ratios (each pair measured back to back)."""
    return summary([a / b for a, b in zip(top, bottom, strict=True)], 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs=2, default=[0.5, 4.0])
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batches", type=int, default=100, help="batches timed per rows/s measurement")
    p.add_argument("--tmp", help="folder for the stores (default: the system's temp folder)")
    p.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_BUFFER // 4,
                   help="rows of the reader's buffer, for both stores: below the small store's rows, so that its "
                        "buffer is as large as the large store's (default: a quarter of sae train's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--collect-model", help="measure `sae collect` with this (small) model instead of training")
    p.add_argument("--collect-tokens", type=int, nargs=2, default=[100_000, 1_000_000])
    args = p.parse_args()
    if args.collect_model:
        with tempfile.TemporaryDirectory() as folder:
            peaks = {n: [collect_peak_rss_mb(args.collect_model, n, Path(folder) / f"c{n}-{i}")
                         for i in range(args.repeats)] for n in args.collect_tokens}
        for n, values in peaks.items():
            print(f"sae collect {n} tokens: driver peak RSS {summary(values)} MB")
        small, large = (peaks[n] for n in args.collect_tokens)
        print(f"driver peak RSS ratio large/small: {ratios(large, small)} (target <= 1.15)")
        return
    peaks: dict[float, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        for size in args.sizes_gb:
            rows = int(size * 1e9 / (args.d * 4))
            root = Path(folder) / f"store-{size}"
            store = write_store(root, rows, args.d)
            peaks[size] = [train_peak_rss_mb(root, Path(folder) / f"sae-{size}-{i}", args.steps, args.shuffle_buffer)
                           for i in range(args.repeats)]
            print(f"store {size:g} GB ({rows} rows, d={args.d}): sae train peak RSS {summary(peaks[size])} MB")
            ours, scan = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                ours.append(reader_rows_per_s(store, args.batches, args.shuffle_buffer))
                scan.append(scan_rows_per_s(store, args.batches))
            print(f"  rows/s: iter_batches {summary(ours)}, plain pyarrow scan {summary(scan)}, "
                  f"ratio {ratios(ours, scan)} (target >= 0.8)")
            shutil.rmtree(root)
    small, large = (peaks[s] for s in args.sizes_gb)
    buffer_mb = args.shuffle_buffer * args.d * 4 / 1e6
    print(f"peak RSS ratio large/small: {ratios(large, small)} (target <= 1.15); shuffle buffer {buffer_mb:.0f} MB, "
          f"large peak {statistics.median(large):.0f} MB (target <= buffer + 1500 MB = {buffer_mb + 1500:.0f} MB)")


if __name__ == "__main__":
    main()
