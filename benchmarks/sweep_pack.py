"""`sae sweep` with its trials packed into groups vs one Tune trial per SAE: whole sweeps on one local Ray,
alternating, the ratio per repeat.

    python benchmarks/sweep_pack.py --repeats 2 --trials 8 --steps 200

Both sweeps train the same SAEs on the same batches (tests/workflows/test_sweep.py checks the metrics agree);
what differs is how many times the store is read and how many trials start (actor, store, MLflow run).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from workflows.sweep import SweepSpec, run_sweep


def sweep(store: Path, work: Path, tag: str, pack: bool, trials: int, steps: int, d: int) -> tuple[float, int, int]:
    ks = [2 ** (i + 1) for i in range(trials // 2)]
    spec = SweepSpec(activations=str(store), hook="synthetic", archs=["topk"], grid={"k": ks, "d_sae": [4 * d, 8 * d]},
                     steps=steps, batch_size=1024, lr=3e-3, experiment=tag, mlflow_uri=f"sqlite:///{work / 'mlflow.db'}",
                     out=str(work / tag), pack=pack, sets={"log_every": max(steps // 4, 1)})
    started = time.perf_counter()
    result = run_sweep(spec)
    assert len(result.finished) == result.trials, f"{result.failed} trials failed"
    return time.perf_counter() - started, result.trials, result.tune_trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trials", type=int, default=8, help="SAEs per sweep (even: k values x 2 widths)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--d", type=int, default=64, help="activation width of the synthetic store")
    parser.add_argument("--tokens", type=int, default=200_000)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = write_synthetic_store(work / "store", SyntheticConfig(d=args.d, n_features=4 * args.d, mean_active=8),
                                      args.tokens)
        ratios = []
        for repeat in range(args.repeats):
            separate, n, _ = sweep(store, work, f"separate-{repeat}", False, args.trials, args.steps, args.d)
            packed, _, groups = sweep(store, work, f"packed-{repeat}", True, args.trials, args.steps, args.d)
            ratios.append(packed / separate)
            print(f"repeat {repeat}: {n} SAEs, separate {separate:.1f} s ({n} Tune trials), packed {packed:.1f} s "
                  f"({groups} Tune trials): ratio {ratios[-1]:.3f}", flush=True)
    print(f"packed / separate: median {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] "
          f"over {len(ratios)} repeats")
    ray.shutdown()


if __name__ == "__main__":
    main()
