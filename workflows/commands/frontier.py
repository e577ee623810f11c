"""`sae frontier`: the Pareto frontier over every finished sweep trial of an MLflow experiment, on any two
logged metrics, with the correct-L0 diagnostic's pick per architecture and width; table and plot in MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from workflows.options import add_tracking_flags

    p = sub.add_parser("frontier", help="Pareto frontier over all sweep trials of an experiment (any two metrics)")
    p.add_argument("--x", help="horizontal axis METRIC[:min|max] of the trials' final/* metrics (default l0)")
    p.add_argument("--y", help="vertical axis METRIC[:min|max] (default fvu; ce_loss_recovered defaults to max); "
                               "without --x/--y: the L0-FVU and L0-CE frontiers")
    p.add_argument("--hook", help="only trials on this hook (required when the experiment spans several)")
    p.add_argument("--out", help="also write frontier.png, trials.csv, frontier_*.csv/.json, l0_picks.* here")
    p.add_argument("--no-log", action="store_true", help="do not log the table and plot to MLflow")
    add_tracking_flags(p, experiment_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from workflows.errors import UserError
    from workflows.frontier import (
        KINDS,
        collect_trials,
        format_table,
        frontier,
        kind_for,
        parse_axis,
        single_hook,
        write_frontier_files,
    )
    from workflows.frontier_report import format_picks, l0_picks, publish
    from workflows.links import runs_view_url
    from workflows.tracking import resolve_tracking_uri

    trials = collect_trials(args.experiment, uri=args.mlflow_uri, hook=args.hook)
    if not trials:
        raise UserError(f"experiment {args.experiment!r} has no finished sweep trials"
                        + (f" on hook {args.hook!r}" if args.hook else ""))
    single_hook(trials)
    custom = args.x is not None or args.y is not None
    kinds = (kind_for(parse_axis(args.x or "l0"), parse_axis(args.y or "fvu")),) if custom else KINDS
    if custom:
        check_metrics(trials, kinds[0])
    for index, kind in enumerate(k for k in kinds if frontier(trials, k)[0]):
        title = f"{kind.x.label} vs {kind.y.label} frontier"
        print(f"{title} over {len(trials)} finished trials:" if index == 0 else f"\n{title}:")
        print(format_table(trials, kind))
    picks = l0_picks(trials)
    if picks:
        print("\nCorrect-L0 diagnostic (decoder cosine; Chanin & Garriga-Alonso 2025):")
        print(format_picks(picks))
    if args.out:
        written = write_frontier_files(trials, Path(args.out), kinds)
        print(f"wrote {', '.join(p.name for p in written)} to {args.out}")
    uri = resolve_tracking_uri(args.mlflow_uri)
    if not args.no_log:
        run_id, artifact_path = publish(trials, kinds, uri, args.experiment)
        print(f"logged to MLflow run {run_id}, artifacts {artifact_path}/")
    print(f"runs table: {runs_view_url(uri, args.experiment)}")
    return 0


def check_metrics(trials, kind) -> None:
    from workflows.errors import UserError
    from workflows.frontier import frontier

    if not frontier(trials, kind)[0]:
        logged = sorted({name for t in trials for name in t.metrics})
        raise UserError(f"no finished trial logged both {kind.x.metric!r} and {kind.y.metric!r}; "
                        f"their held-out metrics: {', '.join(logged)}")
