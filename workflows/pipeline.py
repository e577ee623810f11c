"""`sae run`: the whole job on one recipe — collect -> train (or sweep) -> evaluate -> dashboards.

Every stage writes under one run folder and reuses what a previous run of the same recipe left
there: the cached model, a complete activation store with the same settings, a finished SAE with
the same job. MLflow gets one training run (or one sweep parent with its trials) per pipeline run,
with the evaluation metrics and the dashboard attached.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_core.fs import is_uri
from sae_core.io import is_finished_sae
from sae_core.store import read_manifest
from sae_core.trainer import TrainConfig
from workflows.activations import CollectConfig, collect, complete_manifest
from workflows.errors import UserError
from workflows.job import TrainJob, saved_job_differences
from workflows.links import runs_view_url
from workflows.recipes import Recipe
from workflows.tracking import MlflowTracker, resolve_tracking_uri
from workflows.train_ray import JOB_FILE, DistributedOptions, train_distributed
from workflows.transcoder_set import parse_layers, set_hooks

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PipelineResult:
    """Where everything landed and the numbers a researcher looks at first."""

    out: Path
    sae_dir: Path
    dashboard: Path | None
    metrics: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    mlflow_uri: str = ""
    frontier_plot: Path | None = None
    l0_picks: str = ""
    """The correct-L0 diagnostic's picks over a sweep (one line per architecture and width)."""
    runs_url: str = ""
    """The experiment's runs table in the MLflow UI (`sae ui`)."""


class Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def stage(self, name: str, fn, *args, **kwargs):
        logger.info("stage %s ...", name)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = time.perf_counter() - start
        logger.info("stage %s done in %.1f s", name, self.timings[name])
        return result


def store_of(recipe: Recipe, out: Path) -> str:
    """The recipe's store as an absolute path or a URI."""
    if is_uri(recipe.store):
        return recipe.store
    return str(Path(recipe.store).resolve() if recipe.store else out / "activations")


def collect_stage(recipe: Recipe, out: Path) -> str:
    """Write the activation store, or reuse a complete one with the same settings (collect resumes)."""
    store = store_of(recipe, out)
    hooks = set_hooks(parse_layers(recipe.layers)) if recipe.layers else [recipe.hook]
    cfg = CollectConfig(hooks=hooks, n_tokens=recipe.tokens, model=recipe.model, corpus=recipe.corpus,
                        context_size=recipe.context_size, out=store, dtype=recipe.store_dtype,
                        workers=recipe.collect_workers)
    manifest = complete_manifest(store)
    if manifest is not None:
        recorded = {"model": manifest.model, "hooks": list(manifest.hooks), "corpus": manifest.corpus,
                    "context_size": manifest.context_size, "dtype": manifest.dtype,
                    "tokens": manifest.extra.get("collect", {}).get("n_tokens")}
        wanted = {"model": recipe.model, "hooks": hooks, "corpus": recipe.corpus,
                  "context_size": recipe.context_size, "dtype": recipe.store_dtype, "tokens": recipe.tokens}
        differ = sorted(k for k in wanted if recorded[k] != wanted[k])
        if not differ:
            logger.info("reusing the activation store %s (%d tokens)", store, manifest.n_tokens)
            return store
        if differ != ["tokens"]:  # more tokens of the same settings: collect appends the missing parts
            raise UserError(f"{store} holds a store collected with other settings ({', '.join(differ)}: "
                            f"{[recorded[k] for k in differ]}); choose another --out or delete it")
    collect(cfg)
    return store


def train_job(recipe: Recipe, store: str, out: Path) -> TrainJob:
    return TrainJob(activations=store, hook=recipe.hook, arch=recipe.arch, sae=dict(recipe.sae),
                    train=TrainConfig.from_dict(dict(recipe.train)), out=str((out / "sae").resolve()))


def train_stage(recipe: Recipe, store: str, out: Path, uri: str, experiment: str,
                overwrite: bool = False) -> tuple[Path, str]:
    """Train on Ray Train; reuse a finished SAE of exactly the same job, resume an unfinished one; an SAE or
    a run of other settings is refused (naming the settings that differ) unless ``overwrite``."""
    job = train_job(recipe, store, out)
    sae_dir = Path(job.out)
    run_file, job_file = sae_dir / "run.json", sae_dir / JOB_FILE
    differ = saved_job_differences(json.loads(job_file.read_text()), job) if job_file.is_file() else []
    if is_finished_sae(sae_dir) and job_file.is_file() and not differ and run_file.is_file():
        logger.info("reusing the trained SAE in %s", sae_dir)
        return sae_dir, json.loads(run_file.read_text())["mlflow_run_id"]
    if differ and not overwrite:
        raise UserError(f"{sae_dir} holds an SAE or a run trained with other settings ({', '.join(differ)}); "
                        "pass --overwrite to replace it, or another --out")
    if overwrite and (sae_dir / "ray-train").exists():
        shutil.rmtree(sae_dir / "ray-train")  # the replaced run's checkpoints must not be resumed
        run_file.unlink(missing_ok=True)
    resume = job_file.is_file() and (sae_dir / "ray-train").is_dir()
    opts = DistributedOptions(workers=recipe.workers, cpus_per_worker=recipe.cpus_per_worker, mlflow_uri=uri,
                              experiment=experiment, run_name=recipe.name, checkpoint_every=100)
    result = train_distributed(job, opts, resume=resume, overwrite=overwrite)
    return sae_dir, result["mlflow_run_id"]


def sweep_stage(recipe: Recipe, store: str, out: Path, uri: str,
                experiment: str) -> tuple[Path, str, Path | None, str]:
    """A small Tune sweep over ``recipe.sweep``; the lowest-FVU trial's SAE is fetched for the later stages.
    Also returns the correct-L0 diagnostic's picks (empty when the sweep varies no L0)."""
    from mlflow.tracking import MlflowClient

    from workflows.frontier_report import format_picks, l0_picks
    from workflows.sweep import SweepSpec, run_sweep

    train = dict(recipe.train)
    sets = {k: v for k, v in train.items() if k not in ("steps", "batch_size", "lr")}
    sets.update({k: v for k, v in recipe.sae.items() if k not in recipe.sweep})
    spec = SweepSpec(activations=store, hook=recipe.hook, archs=[recipe.arch],
                     grid={k: list(v) for k, v in recipe.sweep.items()}, steps=recipe.sweep_steps,
                     experiment=experiment, mlflow_uri=uri, sets=sets, out=str(out / "sweeps"),
                     cpus_per_trial=recipe.cpus_per_worker, **{k: train[k] for k in ("batch_size", "lr") if k in train})
    result = run_sweep(spec)
    if not result.finished:
        raise UserError(f"no sweep trial finished ({result.failed} failed); see MLflow run {result.parent_run_id}")
    best = min(result.finished, key=lambda t: t.metrics.get("fvu", float("inf")))
    target = out / "best-sae"
    target.mkdir(parents=True, exist_ok=True)
    MlflowClient(uri).download_artifacts(best.run_id, "sae", str(target))
    plots = sorted(result.out.glob("frontier/*.png"))
    return target / "sae", best.run_id, plots[0] if plots else None, format_picks(l0_picks(result.finished))


def eval_stage(recipe: Recipe, sae_dir: Path, store: str, tracker: MlflowTracker) -> dict[str, float]:
    """CE loss recovered and friends on fresh windows after the training tokens."""
    from sae_core.io import load_sae
    from workflows.evaluate import evaluate_sae, held_out_windows, write_outputs
    from workflows.models import load_model

    loaded = load_model(recipe.model)
    windows = held_out_windows(loaded.tokenizer, corpus=recipe.corpus, context_size=recipe.context_size,
                               n_tokens=recipe.eval_tokens, skip_tokens=read_manifest(store).n_tokens)
    result = evaluate_sae(load_sae(sae_dir), loaded.model, recipe.hook, windows)
    files = write_outputs(result, sae_dir.parent / "eval", sparsity_dir=sae_dir)
    metrics = result.metrics()
    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
    tracker.log_artifact(files["eval"], "eval")
    tracker.log_artifact(files["histogram"], "eval")
    return metrics


def dashboard_stage(recipe: Recipe, sae_dir: Path, out: Path, tracker: MlflowTracker) -> Path:
    from workflows.dashboard import DashboardConfig, build_dashboard

    site = out / "dashboard"
    build_dashboard(DashboardConfig(sae=str(sae_dir), n_tokens=recipe.dashboard_tokens, out=str(site),
                                    hook=recipe.hook, model=recipe.model, corpus=recipe.corpus,
                                    context_size=recipe.context_size, top_density=recipe.dashboard_features))
    tracker.log_artifacts(site, "dashboard")
    return site


def bench_stage(metrics: str, sae_dir: Path, run_id: str, sweep: bool, out: Path, uri: str,
                experiment: str) -> dict[str, Any]:
    """`sae bench` over every trial of the sweep just run (or the one trained SAE); bench/* into their runs."""
    from mlflow.tracking import MlflowClient

    from workflows.bench import parse_metrics
    from workflows.bench_run import BenchConfig, Target, experiment_targets, run_bench

    if sweep:
        parent = MlflowClient(uri).get_run(run_id).data.tags["mlflow.parentRunId"]
        targets = experiment_targets(experiment, uri=uri, parent_run_id=parent, download_dir=out / "bench-artifacts")
    else:
        targets = [Target(sae_dir=str(sae_dir), run_id=run_id)]
    summary = run_bench(targets, BenchConfig(metrics=parse_metrics(metrics)), mlflow_uri=uri, progress=logger.info)
    return {"saes": len(summary.results), "failed": len(summary.failed), "seconds": summary.wall_seconds}


def run_pipeline(recipe: Recipe, *, out: str | Path, sweep: bool = False, mlflow_uri: str | None = None,
                 experiment: str | None = None, overwrite: bool = False, bench: str | None = None) -> PipelineResult:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    uri = resolve_tracking_uri(mlflow_uri)
    experiment = experiment or f"sae-run-{recipe.name}"
    clock = Stopwatch()
    store = clock.stage("collect", collect_stage, recipe, out)
    if recipe.layers:
        from workflows.transcoder_set import set_pipeline

        return set_pipeline(recipe, store, out, uri, experiment, clock)
    plot, picks = None, ""
    if sweep:
        sae_dir, run_id, plot, picks = clock.stage("sweep", sweep_stage, recipe, store, out, uri, experiment)
    else:
        sae_dir, run_id = clock.stage("train", train_stage, recipe, store, out, uri, experiment, overwrite)
    tracker = MlflowTracker(uri, run_id)
    metrics = clock.stage("evaluate", eval_stage, recipe, sae_dir, store, tracker)
    site = clock.stage("dashboard", dashboard_stage, recipe, sae_dir, out, tracker) \
        if recipe.dashboard_features > 0 else None
    if bench:
        clock.stage("bench", bench_stage, bench, sae_dir, run_id, sweep, out, uri, experiment)
    tracker.log_metrics({f"time/{k}": v for k, v in clock.timings.items()}, step=0)
    return PipelineResult(out=out, sae_dir=sae_dir, dashboard=site, metrics=metrics, timings=clock.timings,
                          mlflow_run_id=run_id, mlflow_uri=uri, frontier_plot=plot, l0_picks=picks,
                          runs_url=runs_view_url(uri, experiment))


def summary(result: PipelineResult) -> str:
    m = result.metrics
    lines = ["", "=" * 72, "sae run: summary", "=" * 72]
    lines += [f"  {k:<22s} {m[k]:.4f}" for k in ("l0", "fvu", "mse", "ce_loss_recovered", "kl_div",
                                                    "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero",
                                                    "dead_fraction", "dense_fraction", "top1_agreement") if k in m]
    lines.append("  stage timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
                 + f" (total {sum(result.timings.values()):.1f} s)")
    lines.append(f"  SAE (SAELens folder):   {result.sae_dir}")
    if result.dashboard:
        lines.append(f"  dashboard:              {result.dashboard / 'index.html'}")
    if result.frontier_plot:
        lines.append(f"  Pareto frontier plot:   {result.frontier_plot}")
    if result.l0_picks:
        lines.append("  correct-L0 diagnostic:  " + result.l0_picks.replace("\n", "\n" + " " * 26))
    lines.append(f"  MLflow run:             {result.mlflow_run_id} in {result.mlflow_uri}")
    lines.append(f"  browse runs:            sae ui --mlflow-uri {result.mlflow_uri}, then {result.runs_url}")
    return "\n".join(lines)


def result_json(result: PipelineResult) -> dict[str, Any]:
    return {"out": str(result.out), "sae_dir": str(result.sae_dir),
            "dashboard": str(result.dashboard) if result.dashboard else None, "metrics": result.metrics,
            "timings": result.timings, "mlflow_run_id": result.mlflow_run_id, "mlflow_uri": result.mlflow_uri,
            "frontier_plot": str(result.frontier_plot) if result.frontier_plot else None}
