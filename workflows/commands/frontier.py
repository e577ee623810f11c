"""`sae frontier`: the Pareto frontier over every finished sweep trial of an MLflow experiment."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from workflows.options import add_tracking_flags

    p = sub.add_parser("frontier", help="Pareto frontier (L0 vs FVU, and vs CE) over all sweep trials of an experiment")
    p.add_argument("--hook", help="only trials on this hook (required when the experiment spans several)")
    p.add_argument("--out", help="also write frontier.png, trials.csv and frontier_*.csv/.json here")
    add_tracking_flags(p, experiment_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workflows.errors import UserError
    from workflows.frontier import (
        L0_CE,
        collect_trials,
        format_table,
        frontier,
        single_hook,
        write_frontier_files,
    )

    trials = collect_trials(args.experiment, uri=args.mlflow_uri, hook=args.hook)
    if not trials:
        raise UserError(f"experiment {args.experiment!r} has no finished sweep trials"
                        + (f" on hook {args.hook!r}" if args.hook else ""))
    single_hook(trials)
    print(f"L0 vs FVU frontier over {len(trials)} finished trials:")
    print(format_table(trials))
    if frontier(trials, L0_CE)[0]:
        print("\nL0 vs 1 - CE loss recovered frontier:")
        print(format_table(trials, L0_CE))
    if args.out:
        written = write_frontier_files(trials, Path(args.out))
        print(f"wrote {', '.join(p.name for p in written)} to {args.out}")
    return 0
