"""Training throughput: `sae train` on Ray Train with 1 and 2 workers vs the single-process trainer.

Same synthetic store, same job. Throughput is steady-state: tokens between the first and last
logged step divided by the time between them (MLflow metric timestamps), so Ray's start-up and the
final evaluation are not counted; the whole call's wall time is printed beside it.

    .venv/bin/python benchmarks/train.py [--d 576 --d-sae 4608 --k 32 --batch-size 4096 --steps 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient

from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from sae_core.trainer import TrainConfig
from workflows.job import TrainJob
from workflows.train_ray import DistributedOptions, train_distributed
from workflows.training import Run, start_job_tracking, train_local


def steady_tokens_per_s(uri: str, run_id: str, batch_size: int) -> float:
    history = sorted(MlflowClient(uri).get_metric_history(run_id, "loss"), key=lambda m: m.step)
    first, last = history[0], history[-1]
    return (last.step - first.step) * batch_size / max((last.timestamp - first.timestamp) / 1000, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    store = root / "store"
    write_synthetic_store(store, SyntheticConfig(d=args.d, n_features=4 * args.d, mean_active=16), 
                          args.batch_size * 12)

    def job(name: str) -> TrainJob:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, log_every=5, dead_after_tokens=10**9)
        return TrainJob(activations=str(store), hook="synthetic", arch="topk",
                        sae={"d_sae": args.d_sae, "k": args.k}, train=cfg, out=str(root / name))

    rows = []
    torch.set_num_threads(2)
    local = Run(job("local"))
    tracker = start_job_tracking(local, uri=uri, experiment="bench")
    start = time.perf_counter()
    train_local(local, tracker=tracker)
    rows.append(("single process (2 threads)", steady_tokens_per_s(uri, tracker.run_id, args.batch_size),
                 time.perf_counter() - start))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for workers, cpus in ((1, 2.0), (2, 1.0)):
        start = time.perf_counter()
        result = train_distributed(job(f"ray{workers}"), DistributedOptions(
            workers=workers, cpus_per_worker=cpus, mlflow_uri=uri, experiment="bench", checkpoint_every=args.steps))
        rows.append((f"sae train --workers {workers} ({cpus:g} CPU each)",
                     steady_tokens_per_s(uri, result["mlflow_run_id"], args.batch_size), time.perf_counter() - start))
    ray.shutdown()
    base = rows[0][1]
    print(f"store: d={args.d}, topk d_sae={args.d_sae} k={args.k}, batch {args.batch_size}, {args.steps} steps")
    print(f"{'run':40s} {'tokens/s':>10s} {'vs single':>10s} {'wall s':>8s}")
    for name, tps, wall in rows:
        print(f"{name:40s} {tps:10.0f} {tps / base:10.2f} {wall:8.1f}")
    print(json.dumps({name: round(tps) for name, tps, _ in rows}))


if __name__ == "__main__":
    main()
