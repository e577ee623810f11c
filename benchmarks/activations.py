"""Tokens/s of the Ray Data activation pipeline against a plain single-process loop, and peak RSS.

Both run the same model, hook and windows, and both end with the stored rows as numpy arrays.
The pipeline is timed twice: end to end (actor start and model load included) and steady state
(from its first batch on); the loop's model load is timed apart. RSS is sampled every 0.1 s over
this process and all its descendants (Ray's GCS, raylet and workers included).

    .venv/bin/python benchmarks/activations.py --hook blocks.6.hook_resid_post --tokens 20000
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import psutil
import torch

from workflows.activations import CollectConfig, activation_dataset, plan
from workflows.corpus import iter_documents, pack_windows
from workflows.hooks import run_with_hooks
from workflows.models import DEFAULT_MODEL, load_model, load_tokenizer


class TreeMonitor:
    """Samples this process tree in a background thread: peak summed RSS and CPU seconds used.

    CPU seconds are a second measure beside wall time, steadier on a machine shared with other jobs.
    """

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}

    def _sample(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
                times = proc.cpu_times()
                self._cpu_last[proc.pid] = times.user + times.system
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def mark(self) -> None:
        """Remember the CPU seconds used so far (e.g. at the pipeline's first batch)."""
        self._sample()
        self.cpu_at_mark = self.cpu_seconds

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self._cpu_start.get(pid, 0.0) for pid, v in self._cpu_last.items())

    def __enter__(self) -> TreeMonitor:
        self._sample()
        self._cpu_start = dict(self._cpu_last)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_loop(cfg: CollectConfig, windows) -> tuple[float, float, int]:
    """(load seconds, run seconds, rows) of a plain loop in this process."""
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    model = load_model(cfg.model, dtype=cfg.model_dtype).model
    loaded = time.perf_counter()
    rows = 0
    for lo in range(0, len(windows.token_ids), cfg.batch_size):
        ids = torch.from_numpy(windows.token_ids[lo : lo + cfg.batch_size]).long()
        keep = torch.from_numpy(windows.keep[lo : lo + cfg.batch_size])
        with torch.inference_mode():
            acts = run_with_hooks(model, ids, capture=cfg.hooks).activations
        out = {h: acts[h][keep].float().numpy().astype(cfg.dtype) for h in cfg.hooks}
        rows += len(out[cfg.hooks[0]])
    return loaded - start, time.perf_counter() - loaded, rows


def run_pipeline(cfg: CollectConfig, on_first=lambda: None) -> tuple[float, float, int, int]:
    """(total seconds, seconds after the first batch, rows, rows after the first batch) on Ray Data (the
    corpus packed in its read task)."""
    start = time.perf_counter()
    ds = activation_dataset(cfg)
    first, rows, rows_first = None, 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if first is None:
            first, rows_first = time.perf_counter(), len(batch["window_id"])
            on_first()
        rows += len(batch["window_id"])
    end = time.perf_counter()
    return end - start, end - first, rows, rows - rows_first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--corpus", default="builtin:stdlib")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    cfg = CollectConfig(model=args.model, hooks=[args.hook], corpus=args.corpus, n_tokens=args.tokens,
                        context_size=args.context_size, batch_size=args.batch_size, workers=args.workers)
    p = plan(cfg)
    windows = pack_windows(iter_documents(cfg.corpus), load_tokenizer(cfg.model), context_size=cfg.context_size,
                           n_tokens=cfg.n_tokens)  # the plain loop's input, packed beforehand
    print(f"{p.n_windows} windows x {cfg.context_size} tokens, {int(windows.keep.sum())} stored rows, "
          f"hook {args.hook}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    with TreeMonitor() as loop_rss:
        load_s, loop_s, rows = run_loop(cfg, windows)
    print(f"loop:     {rows / loop_s:8.0f} tok/s  ({rows} rows in {loop_s:.1f} s; model load {load_s:.1f} s) "
          f"peak RSS {loop_rss.peak / 2**30:.2f} GiB, {loop_rss.cpu_seconds:.0f} CPU s")
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    with TreeMonitor() as pipe_rss:
        total_s, steady_s, rows, steady_rows = run_pipeline(cfg, on_first=pipe_rss.mark)
    ray.shutdown()
    # The loop runs again after the pipeline, so a change in machine load hits both sides alike.
    with TreeMonitor() as loop2_rss:
        load2_s, loop2_s, _ = run_loop(cfg, windows)
    print(f"loop again: {rows / loop2_s:6.0f} tok/s  ({loop2_s:.1f} s), {loop2_rss.cpu_seconds:.0f} CPU s")
    loop_cpu = (loop_rss.cpu_seconds + loop2_rss.cpu_seconds) / 2
    load_s, loop_s = (load_s + load2_s) / 2, (loop_s + loop2_s) / 2
    loop_tps = rows / loop_s
    steady_tps, total_tps = steady_rows / steady_s, rows / total_s
    print(f"pipeline: {steady_tps:8.0f} tok/s steady ({steady_rows} rows in {steady_s:.1f} s after the first batch), "
          f"{total_tps:.0f} tok/s end to end ({total_s:.1f} s) peak RSS {pipe_rss.peak / 2**30:.2f} GiB "
          f"(driver + Ray + {cfg.workers} actor(s)), {pipe_rss.cpu_seconds:.0f} CPU s")
    print(f"ratio pipeline/loop (mean of both loops): {steady_tps / loop_tps:.2f}x steady, "
          f"{total_tps / (rows / (loop_s + load_s)):.2f}x end to end with model load in both; "
          f"CPU seconds loop/pipeline {loop_cpu / pipe_rss.cpu_seconds:.2f}x overall, "
          f"{(loop_cpu / rows) / ((pipe_rss.cpu_seconds - pipe_rss.cpu_at_mark) / steady_rows):.2f}x per token "
          "after the first batch")


if __name__ == "__main__":
    main()
