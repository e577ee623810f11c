"""`sae bench`: downstream evaluations (core, absorption, sparse probing, auto-interp) of one SAE, many, or
every child run of an MLflow experiment, on a Ray actor pool; results into MLflow and bench.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workflows.bench_run import BenchConfig

CONFIG_FLAGS = {"n_tokens": "tokens", "corpus": "corpus", "context_size": "context_size", "model": "model",
                "seed": "seed", "workers": "workers", "cpus_per_worker": "cpus_per_worker", "device": "device",
                "cache_dir": "cache_dir"}
SHOWN = ("bench/core/l0", "bench/core/fvu", "bench/core/ce_loss_recovered", "bench/absorption/mean_absorption_fraction",
         "bench/absorption/mean_full_absorption", "bench/sparse_probing/top_1_accuracy",
         "bench/sparse_probing/llm_accuracy")


def register(sub: argparse._SubParsersAction) -> None:
    from workflows.bench import METRICS
    from workflows.options import add_field_flags, add_mlflow_uri_flag

    p = sub.add_parser("bench", help="downstream evaluations of SAE folders or a whole sweep, on Ray")
    p.add_argument("sae_dirs", nargs="*", metavar="SAE_DIR", help="SAE folders (any format `sae eval` reads)")
    p.add_argument("--experiment", help="evaluate every finished child run of this MLflow experiment")
    p.add_argument("--parent-run-id", help="with --experiment: only the children of this run (one sweep)")
    p.add_argument("--metrics", default="core,absorption,sparse_probing",
                   help=f"comma-separated, from: {', '.join(METRICS)} (default: core,absorption,sparse_probing)")
    p.add_argument("--option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="a metric's option, e.g. absorption.max_words=500 or sparse_probing.tasks=data.jsonl "
                        "(VALUE parsed as JSON when it is JSON)")
    p.add_argument("--mlflow-run-id", help="with one SAE_DIR: log into this MLflow run")
    p.add_argument("--download-dir", default="runs/bench-artifacts",
                   help="where SAEs only found as MLflow artifacts are downloaded (default: runs/bench-artifacts)")
    p.add_argument("--json", action="store_true", help="print every SAE's flat metrics as JSON lines")
    add_field_flags(p, BenchConfig, CONFIG_FLAGS)
    add_mlflow_uri_flag(p)
    p.set_defaults(func=run)


def parse_options(items: list[str]) -> dict[str, dict]:
    from workflows.errors import UserError
    from workflows.options import parse_value

    options: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        metric, dot, name = key.strip().partition(".")
        if not sep or not dot or not metric or not name:
            raise UserError(f"--option expects METRIC.KEY=VALUE, got {item!r}")
        options.setdefault(metric, {})[name] = parse_value(raw)
    return options


def run(args: argparse.Namespace) -> int:
    from workflows.bench import get_metric, parse_metrics
    from workflows.bench_run import Target, experiment_targets, run_bench
    from workflows.errors import UserError
    from workflows.options import field_values

    if bool(args.sae_dirs) == bool(args.experiment):
        raise UserError("give SAE folders or --experiment, not both and not neither")
    if args.mlflow_run_id and len(args.sae_dirs) != 1:
        raise UserError("--mlflow-run-id goes with exactly one SAE_DIR")
    values = field_values(args, CONFIG_FLAGS)
    cfg = BenchConfig(metrics=parse_metrics(args.metrics), options=parse_options(args.option), **values)
    for name in cfg.metrics:  # a metric whose module this checkout lacks fails here, before Ray starts
        get_metric(name)
    if args.experiment:
        targets = experiment_targets(args.experiment, uri=args.mlflow_uri, parent_run_id=args.parent_run_id,
                                     download_dir=args.download_dir)
        if not targets:
            raise UserError(f"experiment {args.experiment!r} has no finished child run holding an SAE")
    else:
        for folder in args.sae_dirs:
            if not Path(folder).exists():
                raise UserError(f"{folder} does not exist")
        targets = [Target(sae_dir=d, run_id=args.mlflow_run_id or run_json_id(d)) for d in args.sae_dirs]
    print(f"benchmarking {len(targets)} SAE(s) on {min(cfg.workers, len(targets))} actor(s): {', '.join(cfg.metrics)}")
    summary = run_bench(targets, cfg, mlflow_uri=args.mlflow_uri)
    print_summary(summary, args.json)
    return 1 if summary.failed else 0


def run_json_id(folder: str) -> str | None:
    """The MLflow run `sae run` recorded beside an SAE folder (run.json), if any."""
    try:
        return json.loads((Path(folder) / "run.json").read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


def print_summary(summary, as_json: bool) -> None:
    from workflows.bench_run import flat_metrics

    rate = len(summary.results) / summary.wall_seconds * 3600 if summary.wall_seconds else float("nan")
    print(f"{len(summary.results)} SAE(s) in {summary.wall_seconds:.1f} s ({rate:.0f} SAEs/hour) on "
          f"{summary.workers} actor(s)")
    for worker, row in sorted(summary.per_worker().items()):
        print(f"  {worker}: {row['saes']} SAE(s), {row['seconds']:.1f} s busy")
    for out in summary.results:
        flat = flat_metrics(out["results"])
        shown = {k.split("/", 1)[1]: round(v, 4) for k, v in flat.items() if k in SHOWN}
        print(f"{out['target']['name']}: {json.dumps(shown)}" + (f"  ERRORS {out['errors']}" if out["errors"] else ""))
        if as_json:
            print(json.dumps({"sae": out["target"]["sae_dir"], "run_id": out["target"].get("run_id"),
                              "worker": out["worker"], "started": out["started"], "finished": out["finished"], **flat}))
