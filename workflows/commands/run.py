"""`sae run`: the whole pipeline on a recipe (collect -> train or sweep -> evaluate -> dashboards)."""

from __future__ import annotations

import argparse
import json

from workflows.options import add_tracking_flags
from workflows.pipeline import result_json, run_pipeline, summary
from workflows.recipes import RECIPES, get_recipe, parse_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole job on a recipe: activations, SAE, evaluation, dashboards")
    p.add_argument("--recipe", default="smollm2-topk", help=f"one of: {', '.join(sorted(RECIPES))}")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, dotted for nested ones (sae.k=64, train.steps=2000)")
    p.add_argument("--sweep", action="store_true", help="a small Ray Tune sweep instead of one training run")
    p.add_argument("--bench", nargs="?", const="core,absorption,sparse_probing", metavar="METRICS",
                   help="end with `sae bench` on every trial of the sweep (or on the SAE): bench/* metrics in their "
                        "MLflow runs, for `sae frontier --y bench/...` (default metrics: core,absorption,sparse_probing)")
    p.add_argument("--out", help="run folder (default runs/<recipe>)")
    add_tracking_flags(p, experiment=None, experiment_help="MLflow experiment (default: sae-run-<recipe>)")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an SAE the run folder holds from other settings (otherwise refused)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipe = get_recipe(args.recipe, parse_overrides(args.set))
    result = run_pipeline(recipe, out=args.out or f"runs/{recipe.name}", sweep=args.sweep,
                          mlflow_uri=args.mlflow_uri, experiment=args.experiment, overwrite=args.overwrite,
                          bench=args.bench)
    print(summary(result))
    if args.json:
        print(json.dumps(result_json(result)))
    return 0
