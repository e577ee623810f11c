"""`sae sweep`: a Ray Tune grid over architectures, width and sparsity; MLflow parent + child runs, Pareto frontiers."""

from __future__ import annotations

import argparse
import os
import time

from sae_core.fs import is_uri
from workflows.errors import UserError
from workflows.options import add_field_flags, add_tracking_flags, field_values, parse_grid
from workflows.recipes import parse_overrides

SPEC_FLAGS = ("samples", "scheduler", "asha_metric", "steps", "batch_size", "lr", "cpus_per_trial", "model", "pack")
"""SweepSpec fields with a flag of their own: help and default come from the field."""


def register(sub: argparse._SubParsersAction) -> None:
    from workflows.sweep import SweepSpec

    p = sub.add_parser("sweep", help="Ray Tune sweep over width / k / L0 with MLflow Pareto frontiers")
    p.add_argument("--activations", required=True, help="activation store (shared by every trial)")
    p.add_argument("--hook", required=True, help="model site to train on")
    p.add_argument("--arch", action="append", required=True, help="architecture (repeatable: crossed with the grid)")
    p.add_argument("--grid", action="append", default=[], metavar="KNOB=V1,V2,...",
                   help="values of one knob: d_sae, k, l1, l0, target_l0 (k for TopK-family), any architecture "
                        "or training field (repeatable; the grid is the cross product)")
    add_field_flags(p, SweepSpec, SPEC_FLAGS, required=["steps"], choices={"scheduler": ["fifo", "asha"]})
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an architecture or training field for every trial, JSON-parsed (repeatable)")
    p.add_argument("--out", help="folder for trial SAEs and Tune state (default runs/sweeps/<experiment>)")
    add_tracking_flags(p, experiment_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workflows.frontier import format_table
    from workflows.frontier_report import format_picks, l0_picks
    from workflows.links import runs_view_url
    from workflows.sweep import SweepSpec, run_sweep

    if not args.grid:
        raise UserError("give at least one --grid KNOB=V1,V2,...")
    store = args.activations if is_uri(args.activations) else os.path.abspath(args.activations)
    spec = SweepSpec(activations=store, hook=args.hook, archs=args.arch, grid=parse_grid(args.grid),
                     experiment=args.experiment, mlflow_uri=args.mlflow_uri, sets=parse_overrides(args.set),
                     out=os.path.abspath(args.out or os.path.join("runs", "sweeps", args.experiment)),
                     **field_values(args, SPEC_FLAGS))
    started = time.time()
    result = run_sweep(spec)
    packed = f" in {result.tune_trials} packed Tune trials" if result.tune_trials < result.trials else ""
    print(f"sweep {result.parent_run_id}: {result.trials} trials{packed}, {len(result.finished)} finished, "
          f"{result.failed} failed, {result.stopped} stopped early ({time.time() - started:.0f} s)")
    if result.finished:
        print(format_table(result.finished))
        print(f"frontier files in {result.out / 'frontier'} (and the parent run's artifacts)")
        picks = l0_picks(result.finished)
        if picks:
            print("the correct-L0 diagnostic picks:\n" + format_picks(picks))
    print(f"runs table: {runs_view_url(args.mlflow_uri, args.experiment)}")
    return 0 if result.finished else 1
