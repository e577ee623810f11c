"""Many SAEs from one pass: `sae train --from-model --grid k=...` (N SAEs on one model forward) against
N separate `sae train --from-model` runs of the same settings, whole commands timed from outside as a
user runs them (Ray start, model load, the stream, training, evaluation, saving).

Timed in turns, separate then grouped, ``--repeats`` times; prints each wall time, the ratio
grouped / separate per repeat and their spread (this machine is shared: read the spread).

    .venv/bin/python benchmarks/group.py [--tokens 40960 --steps 40 --batch-size 1024 --ks 8 16 32 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sae(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "workflows.cli", "train", *args], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise SystemExit(f"sae train failed: {result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=40_960)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=1152)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-group-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    common = ["--from-model", "--hook", args.hook, "--tokens", str(args.tokens), "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--d-sae", str(args.d_sae), "--checkpoint-every", "1000",
              "--cpus-per-worker", "0.5"]  # Ray Data (the model actors) needs the rest of 2 CPUs
    ratios = []
    for r in range(args.repeats):
        separate = sum(sae([*common, "--k", str(k), "--out", str(root / f"r{r}-k{k}")], env) for k in args.ks)
        grouped = sae([*common, "--grid", "k=" + ",".join(map(str, args.ks)), "--out", str(root / f"r{r}-group")], env)
        ratios.append(grouped / separate)
        print(f"repeat {r}: {len(args.ks)} separate runs {separate:.1f} s, one grouped run {grouped:.1f} s, "
              f"ratio {grouped / separate:.3f}", flush=True)
    spread = f" (min {min(ratios):.3f}, max {max(ratios):.3f})" if len(ratios) > 1 else ""
    print(f"grouped / separate: median {statistics.median(ratios):.3f}{spread}; target <= 0.4")


if __name__ == "__main__":
    main()
