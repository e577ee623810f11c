"""`sae sweep`: a Ray Tune grid over architectures, width and sparsity; MLflow parent + child runs, Pareto frontiers."""

from __future__ import annotations

import argparse
import json
import os
import time

from workflows.errors import UserError
from workflows.recipes import parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="Ray Tune sweep over width / k / L0 with MLflow Pareto frontiers")
    p.add_argument("--activations", required=True, help="activation store directory (shared by every trial)")
    p.add_argument("--hook", required=True, help="hook column to train on")
    p.add_argument("--arch", action="append", required=True, help="architecture (repeatable: crossed with the grid)")
    p.add_argument("--grid", action="append", default=[], metavar="KNOB=V1,V2,...",
                   help="values of one knob: d_sae, k, l1, l0, target_l0 (k for TopK-family), any architecture "
                        "or training field (repeatable; the grid is the cross product)")
    p.add_argument("--samples", type=int, default=1, help="repeats of the grid, each with its own seed")
    p.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo", help="asha stops trials behind their peers")
    p.add_argument("--asha-metric", default="fvu", help="training metric ASHA minimises (default fvu)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps per trial")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an architecture or training field for every trial, JSON-parsed (repeatable)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial")
    p.add_argument("--model", help="base model, for CE loss recovered (when workflows.evaluate provides it)")
    p.add_argument("--out", help="folder for trial SAEs and Tune state (default runs/sweeps/<experiment>)")
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.set_defaults(func=run)


def parse_grid(items: list[str]) -> dict[str, list[object]]:
    grid: dict[str, list[object]] = {}
    for item in items:
        knob, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not knob.strip() or not values:
            raise UserError(f"--grid expects KNOB=V1,V2,..., got {item!r}")
        if knob.strip() in grid:
            raise UserError(f"--grid {knob.strip()} given twice; list all its values in one --grid")
        grid[knob.strip()] = [parse_value(v) for v in values]
    return grid


def parse_value(raw: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def run(args: argparse.Namespace) -> int:
    from workflows.frontier import format_table
    from workflows.sweep import SweepSpec, run_sweep

    if not args.grid:
        raise UserError("give at least one --grid KNOB=V1,V2,...")
    spec = SweepSpec(activations=os.path.abspath(args.activations), hook=args.hook, archs=args.arch,
                     grid=parse_grid(args.grid), steps=args.steps, experiment=args.experiment,
                     mlflow_uri=args.mlflow_uri, samples=args.samples, scheduler=args.scheduler,
                     asha_metric=args.asha_metric, batch_size=args.batch_size, lr=args.lr, sets=parse_overrides(args.set),
                     out=os.path.abspath(args.out or os.path.join("runs", "sweeps", args.experiment)),
                     model=args.model, cpus_per_trial=args.cpus_per_trial)
    started = time.time()
    result = run_sweep(spec)
    print(f"sweep {result.parent_run_id}: {result.trials} trials, {len(result.finished)} finished, "
          f"{result.failed} failed, {result.stopped} stopped early ({time.time() - started:.0f} s)")
    if result.finished:
        print(format_table(result.finished))
        print(f"frontier files in {result.out / 'frontier'} (and the parent run's artifacts)")
    return 0 if result.finished else 1
