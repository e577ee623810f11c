"""`sae bench` throughput: SAEs evaluated per hour on this machine, and how the work splits over actors.

Saves ``--saes`` random TopK SAEs on one hook of the model (the cost of a bench does not depend on what
the SAE learned), then runs ``workflows.bench_run.run_bench`` on them in this process with each
``--workers`` count, in turns, ``--repeats`` times. Prints per run the wall time, SAEs/hour, and per actor
the SAEs it took and its busy seconds; then per worker count the median SAEs/hour with its spread
(this machine is shared: read the spread).

    .venv/bin/python benchmarks/bench.py [--saes 4 --workers 1 2 --repeats 2 --metrics core,absorption,sparse_probing]
    .venv/bin/python benchmarks/bench.py --tiny     # a random 3-layer Llama (the tests' tiny model): the machinery
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

# Small enough for a 2-core machine: absorption on 300 words, probing on 40 texts per class, 1024 tokens.
OPTIONS = {"absorption": {"max_words": 300, "n_icl": 3},
           "sparse_probing": {"max_per_class": 40, "max_tokens": 48, "ks": [1, 2, 5]}}


def make_saes(root: Path, n: int, model: str, hook: str, d_sae: int, k: int) -> list[Path]:
    from sae_core import build, make_config
    from sae_core.io import save_sae
    from workflows.models import load_config

    config = load_config(model)
    d_in = int(getattr(config, "hidden_size", None) or config.n_embd)
    folders = []
    for i in range(n):
        torch.manual_seed(i)
        sae = build(make_config("topk", d_in=d_in, d_sae=d_sae, k=k))
        folders.append(save_sae(sae, root / f"sae-{i}", metadata={"model_name": model, "hook_name": hook,
                                                                   "context_size": 128}))
    return folders


def main() -> None:
    from workflows.bench import parse_metrics
    from workflows.bench_run import BenchConfig, Target, run_bench
    from workflows.models import DEFAULT_MODEL
    from workflows.raysession import ensure_ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--saes", type=int, default=4)
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--metrics", default="core,absorption,sparse_probing")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny random Llama instead of --model")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-bench-"))
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.workflows.conftest import make_tiny_model, make_tokenizer

        make_tokenizer(root / "tokenizer")
        args.model = str(make_tiny_model(root / "tiny", "llama", root / "tokenizer"))
        args.hook, args.d_sae, args.k = "blocks.1.hook_resid_post", 192, 8
    folders = make_saes(root, args.saes, args.model, args.hook, args.d_sae, args.k)
    ensure_ray()
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    for r in range(args.repeats):
        for workers in args.workers:
            cfg = BenchConfig(metrics=parse_metrics(args.metrics), options=OPTIONS, n_tokens=args.tokens,
                              workers=workers, cpus_per_worker=args.cpus_per_worker)
            summary = run_bench([Target(sae_dir=str(f)) for f in folders], cfg, progress=lambda line: print("   ", line))
            if summary.failed:
                raise SystemExit(f"bench failed: {summary.failed[0]['errors']}")
            rate = len(folders) / summary.wall_seconds * 3600
            rates[workers].append(rate)
            ends = sorted(r["finished"] for r in summary.results)
            marginal = (len(ends) - 1) / max(ends[-1] - ends[0], 1e-9) * 3600 if len(ends) > 1 else float("nan")
            split = ", ".join(f"{w.split(':')[-1]}: {row['saes']} SAEs {row['seconds']:.0f} s busy"
                              for w, row in sorted(summary.per_worker().items()))
            print(f"repeat {r}, {workers} actor(s): {len(folders)} SAEs in {summary.wall_seconds:.1f} s = "
                  f"{rate:.0f} SAEs/hour ({marginal:.0f}/hour after the hook's first SAE); split {split}", flush=True)
    for workers, values in rates.items():
        spread = f" (min {min(values):.0f}, max {max(values):.0f})" if len(values) > 1 else ""
        print(f"{workers} actor(s): median {statistics.median(values):.0f} SAEs/hour{spread}")


if __name__ == "__main__":
    main()
