"""One training path: a job (workflows/job.py) = a data source (workflows/sources.py) x an objective
(workflows/objectives.py) x an architecture config x ``TrainConfig``.

:func:`run_loop` is the loop every run executes: in this process it is called with world = 1
(:func:`train_local`), on Ray Train by every DDP rank (workflows/train_ray.py). :func:`finish` is the
one finisher: held-out evaluation, then the SAELens folder with metrics.json and job.json, then MLflow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sae_core
from sae_core.io import SAEFormatError, is_finished_sae, save_sae
from sae_core.lock import locked
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
    """A job's parts, built once on the driver: its source, its objective and the data's site widths.
    Runs of one group share one ``source`` (one read of the store, one model pass)."""

    def __init__(self, job: TrainJob, data: str = "direct", source: Any = None, overwrite: bool = False):
        self.job, self.overwrite = job, overwrite
        if is_finished_sae(job.out) and not overwrite:  # refused before any training, not after it
            raise SAEFormatError(f"{job.out} already holds an SAE", reason="sae_exists")
        self.objective = objective_for(job)
        self.source = source if source is not None else make_source(job, self.objective.needs, data)
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


@dataclass
class Member:
    """One SAE being trained: its run, its trainer and its MLflow run. A group trains several members
    on the same batches; most runs are a group of one."""

    run: Run
    trainer: Trainer
    tracker: NullTracker = field(default_factory=NullTracker)
    error: BaseException | None = None
    """Why this member stopped training, when the group isolates failures (``run_loop(isolate=True)``)."""


def start_members(members: list[Member], rank: int, checkpoints: list[dict[str, Any]] | None) -> None:
    """Bind each objective, then resume every member from its checkpoint or initialise it from the
    objective's sample (the same sample on every rank, so the estimates match a single worker's)."""
    for i, m in enumerate(members):
        m.run.objective.bind(m.run.job, m.run.source, m.trainer.device)
        if checkpoints is not None:
            m.trainer.load_state_dict(checkpoints[i])
            logger.info("rank %d resumed at step %d", rank, m.trainer.step_count)
            m.tracker.log_metrics({"resumed_from_step": m.trainer.step_count}, step=m.trainer.step_count)
            continue
        sample = m.run.objective.init_sample(m.run.source, m.run.job.train.init_sample_tokens)
        if sample is not None:  # otherwise the trainer initialises from its first batch
            m.trainer.initialize(sample)


def run_loop(members: list[Member], *, rank: int = 0, world: int = 1,
             checkpoints: list[dict[str, Any]] | None = None, on_step: Callable[[int], None] | None = None,
             on_metrics: Callable[[int, dict[str, float]], None] | None = None, isolate: bool = False) -> None:
    """The training loop of every run: rank ``rank`` of ``world`` takes its slice of each global batch of
    the members' shared source and every member not yet at its last step makes one update on it (its
    objective's step). Logged rows go to the member's tracker and ``on_metrics(member_index, row)``;
    ``on_step(step)`` runs after every batch (checkpointing). With ``isolate`` (one process only: under DDP
    every rank must take every step), a member whose step raises keeps the error in ``Member.error``, its
    MLflow run fails, and the others train on."""
    start_members(members, rank, checkpoints)
    steps = [m.run.objective.step_fn(m.trainer) for m in members]
    done = min(m.trainer.step_count for m in members)  # members are checkpointed together
    last = max(m.run.job.train.steps for m in members)
    for batch in members[0].run.source.batches(rank, world, done):
        if done >= last or all(m.error is not None for m in members):
            break
        for i, (m, step) in enumerate(zip(members, steps, strict=True)):
            if m.trainer.step_count >= m.run.job.train.steps or m.error is not None:
                continue
            try:
                row = step(batch)
            except Exception as exc:
                if not isolate:
                    raise
                logger.warning("%s failed at step %d: %s", m.run.job.out, m.trainer.step_count + 1, exc)
                m.error = exc
                m.tracker.fail(exc)
                continue
            n, cfg = m.trainer.step_count, m.run.job.train
            if row is not None and (n % cfg.log_every == 0 or n == cfg.steps):
                m.tracker.log_metrics(row, step=n)
                if on_metrics is not None:
                    on_metrics(i, row)
        done += 1
        if on_step is not None:
            on_step(done)
    if done < last:
        logger.warning("batches ran out at step %d of %d", done, last)


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
             output_scaling_factor=trainer.output_scaling_factor, extra_files=files, overwrite=run.overwrite)
    log_final(tracker, job, metrics, trainer.step_count)
    return metrics


def finish_from_checkpoint(run: Run, state: dict[str, Any], tracker: NullTracker) -> dict[str, Any]:
    """:func:`finish` for a run whose trainer lives in a checkpoint (what Ray Train leaves on the driver)."""
    trainer = build_trainer(run.job, run.widths)
    trainer.load_state_dict(state)
    return finish(run, trainer, tracker)


# -- MLflow ---------------------------------------------------------------------------------------
def start_job_tracking(run: Run, *, uri: str | None, experiment: str, run_name: str | None = None,
                       parent_run_id: str | None = None, extra_params: dict[str, Any] | None = None) -> MlflowTracker:
    """An MLflow run for the job with its params and the model/hook/architecture tags."""
    job = run.job
    tags = {"model": run.source.facts().model_name, "hook": job.hook, "architecture": job.arch,
            "sae_dir": str(Path(job.out).resolve()),  # where `sae bench --experiment` finds the SAE
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


# -- in this process ---------------------------------------------------------------------------------
SHARED_TRAIN = ("batch_size", "seed", "shuffle_buffer", "init_sample_tokens", "normalize_activations", "b_dec_init")
"""Training fields that decide the data or its initial estimates: the same for every SAE of a group."""


def train_local(job: TrainJob | Run, on_metrics: Callable[[dict[str, float]], None] | None = None,
                tracker: NullTracker | None = None) -> dict[str, Any]:
    """Train in this process (the one loop with world = 1), evaluate on the held-out data, save."""
    run = job if isinstance(job, Run) else Run(job)
    member = Member(run, build_trainer(run.job, run.widths), tracker or NullTracker())
    return train_group_local([member], on_metrics=None if on_metrics is None else lambda i, row: on_metrics(row))[0]


def train_group_local(members: list[Member], on_metrics: Callable[[int, dict[str, float]], None] | None = None,
                      isolate: bool = False) -> list[dict[str, Any] | None]:
    """Train a group in this process on one pass over its shared source; finish every member. With
    ``isolate`` a member that fails is left out (None in its place) and the others finish."""
    with writing([m.run for m in members]):
        try:
            run_loop(members, on_metrics=on_metrics, isolate=isolate)
            return [finish(m.run, m.trainer, m.tracker) if m.error is None else None for m in members]
        except BaseException as exc:
            for m in members:
                if m.error is None:
                    m.tracker.fail(exc)
            raise


@contextlib.contextmanager
def writing(runs: list[Run]) -> Iterator[None]:
    """Hold the lock of every output folder of ``runs`` (one writer at a time; a second one is refused)."""
    with contextlib.ExitStack() as stack:
        for run in runs:
            Path(run.job.out).parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(locked(run.job.out, purpose="training"))
        yield
