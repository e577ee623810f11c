"""One training path: a job (workflows/job.py) = a data source (workflows/sources.py) x an objective
(workflows/objectives.py) x an architecture config x ``TrainConfig``.

:func:`run_loop` is the loop every run executes: in this process it is called with world = 1
(:func:`train_local`), on Ray Train by every DDP rank (workflows/train_ray.py). :func:`finish` is the
one finisher: held-out evaluation, then the SAELens folder with metrics.json and job.json, then MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sae_core
from sae_core.io import load_checkpoint, save_sae
from sae_core.trainer import Trainer
from workflows.job import TrainJob, sae_config_for
from workflows.objectives import json_bytes, objective_for
from workflows.sources import DataFacts, make_source
from workflows.tracking import MlflowTracker, NullTracker

logger = logging.getLogger(__name__)

# What of the output folder goes to MLflow: the SAELens folder and its metrics, not Ray's checkpoints.
SAE_ARTIFACTS = ("cfg.json", "sae_weights.safetensors", "sae_ray.json", "sparsity.safetensors", "metrics.json",
                 "job.json")


class Run:
    """A job's parts, built once on the driver: its source, its objective and the data's site widths."""

    def __init__(self, job: TrainJob, data: str = "direct"):
        self.job = job
        self.objective = objective_for(job)
        self.source = make_source(job, self.objective.needs, data)
        self.objective.prepare(job, self.source)
        self.widths = self.source.widths()
        sae_config_for(job, self.widths)  # refuse a bad config before anything starts


def build_trainer(job: TrainJob, widths: dict[str, int], *, world: int = 1, device: torch.device | str = "cpu",
                  reduce=None) -> Trainer:
    """The job's SAE (identical initial weights on every rank: the job's seed) and its trainer; under DDP
    (world > 1) the forward runs through the DDP wrapper and data-derived state through ``reduce``."""
    torch.manual_seed(job.train.seed)
    sae = sae_core.build(sae_config_for(job, widths)).to(device)
    ddp = nn.parallel.DistributedDataParallel(sae) if world > 1 else None
    kwargs = {"reduce": reduce} if reduce is not None else {}
    return Trainer(sae, job.train, forward_module=ddp, world_size=world, **kwargs)


def run_loop(run: Run, trainer: Trainer, *, rank: int = 0, world: int = 1, tracker: NullTracker | None = None,
             checkpoint: dict[str, Any] | None = None, on_step: Callable[[int], None] | None = None,
             on_metrics: Callable[[dict[str, float]], None] | None = None) -> Trainer:
    """Train ``trainer`` on rank ``rank`` of ``world`` until the job's last step: resume from ``checkpoint``
    or initialise from the objective's sample, then the objective's updates over the source's batches.
    Logged rows go to ``tracker`` and ``on_metrics``; ``on_step(step)`` runs after every update."""
    tracker = tracker or NullTracker()
    job, objective = run.job, run.objective
    objective.bind(job, run.source, trainer.device)
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        logger.info("rank %d resumed at step %d", rank, trainer.step_count)
        tracker.log_metrics({"resumed_from_step": trainer.step_count}, step=trainer.step_count)
    else:
        sample = objective.init_sample(run.source, job.train.init_sample_tokens)
        if sample is not None:  # otherwise the trainer initialises from its first batch
            trainer.initialize(sample)
    batches = run.source.batches(rank, world, trainer.step_count)
    for row in trainer.fit(batches, on_step=on_step, step=objective.step_fn(trainer)):
        tracker.log_metrics(row, step=int(row["step"]))
        if on_metrics is not None:
            on_metrics(row)
    return trainer


def sae_metadata(job: TrainJob, facts: DataFacts) -> dict[str, Any]:
    """The cfg.json metadata: SAELens's fields, the site read (hook_name), a PAIR's output site
    (hook_name_out) and a STACKED wiring's sites in order (hook_names)."""
    meta: dict[str, Any] = {"model_name": facts.model_name, "hook_name": job.hook, "context_size": facts.context_size,
                            "prepend_bos": facts.prepend_bos, "dataset_path": facts.dataset_path,
                            "exclude_special_tokens": facts.exclude_special_tokens}
    if job.out_hook:
        meta["hook_name_out"] = job.out_hook
    if job.sources:
        meta["hook_names"] = list(job.sources)
    return meta


def finish(run: Run, trainer: Trainer, tracker: NullTracker) -> dict[str, Any]:
    """Evaluate on the held-out data, publish the SAELens folder with metrics.json and job.json (and the
    objective's files), log it all to MLflow and close the run."""
    job = run.job
    evaluation = run.objective.evaluate(job, trainer, run.source)
    metrics = {**evaluation.metrics, "steps": trainer.step_count}
    files = {"metrics.json": json_bytes(metrics), "job.json": json_bytes(job.to_dict()), **evaluation.files}
    save_sae(trainer.sae, job.out, scaling_factor=trainer.scaling_factor, metadata=sae_metadata(job, run.source.facts()),
             output_scaling_factor=trainer.output_scaling_factor, extra_files=files)
    log_final(tracker, job, metrics, trainer.step_count)
    return metrics


def finish_from_checkpoint(run: Run, state: dict[str, Any] | str | Path, tracker: NullTracker) -> dict[str, Any]:
    """:func:`finish` for a run whose trainer lives in a checkpoint (what Ray Train leaves on the driver)."""
    trainer = build_trainer(run.job, run.widths)
    trainer.load_state_dict(state if isinstance(state, dict) else load_checkpoint(state))
    return finish(run, trainer, tracker)


# -- MLflow ---------------------------------------------------------------------------------------
def start_job_tracking(run: Run, *, uri: str | None, experiment: str, run_name: str | None = None,
                       parent_run_id: str | None = None, extra_params: dict[str, Any] | None = None) -> MlflowTracker:
    """An MLflow run for the job with its params and the model/hook/architecture tags."""
    job = run.job
    tags = {"model": run.source.facts().model_name, "hook": job.hook, "architecture": job.arch,
            **({"out_hook": job.out_hook} if job.out_hook else {}),
            **({"sources": ",".join(job.sources)} if job.sources else {})}
    tracker = MlflowTracker.create(uri, experiment, run_name or Path(job.out).name, tags, parent_run_id)
    tracker.log_params({"arch": job.arch, "sae": job.sae, "train": job.train.to_dict(), "hook": job.hook,
                        "out_hook": job.out_hook, "sources": job.sources, "activations": job.activations,
                        "stream": job.stream or {}, **run.objective.params(job), **(extra_params or {})})
    return tracker


def log_final(tracker: NullTracker, job: TrainJob, metrics: dict[str, Any], step: int) -> None:
    """Held-out metrics as final/*, the SAE folder as the artifact ``sae/``, and the run closed."""
    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=step)
    for name in SAE_ARTIFACTS:
        if (Path(job.out) / name).is_file():
            tracker.log_artifact(Path(job.out) / name, "sae")
    tracker.end("FINISHED")


def end_failed(tracker: NullTracker, exc: BaseException) -> None:
    """Close a run whose command failed: KILLED on Ctrl-C (and on SystemExit: how Tune stops a trial its
    scheduler gave up on), FAILED with the error as a tag otherwise."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        tracker.end("KILLED")
        return
    tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
    tracker.end("FAILED")


# -- in this process ---------------------------------------------------------------------------------
def train_local(job: TrainJob | Run, on_metrics: Callable[[dict[str, float]], None] | None = None,
                tracker: NullTracker | None = None) -> dict[str, Any]:
    """Train in this process (the one loop with world = 1), evaluate on the held-out data, save."""
    run = job if isinstance(job, Run) else Run(job)
    tracker = tracker or NullTracker()
    try:
        trainer = run_loop(run, build_trainer(run.job, run.widths), tracker=tracker, on_metrics=on_metrics)
        return finish(run, trainer, tracker)
    except BaseException as exc:
        end_failed(tracker, exc)
        raise
