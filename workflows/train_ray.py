"""Data-parallel training on Ray Train: every DDP rank runs the one training loop
(workflows/training.py ``run_loop``) on its slice of each global batch; checkpoints survive a lost
worker or node; rank 0 logs to MLflow. Any job runs here, whatever its source and objective.

Data reaches the workers as the job's source says (workflows/sources.py): a store read by every rank
in one seeded order (``data="direct"``: N workers see exactly the batches one worker would, so results
match a single-process run to float tolerance), or Ray Data shards (``data="ray"``, and always for the
live activation stream) handed out by ``ray.train.get_dataset_shard``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_core.io import SAEFormatError, load_checkpoint, save_checkpoint
from sae_core.publish import atomic_write_bytes
from workflows.errors import UserError, check
from workflows.job import TrainJob, saved_job_differences
from workflows.raysession import ensure_ray
from workflows.tracking import MlflowTracker, NullTracker, resolve_tracking_uri
from workflows.training import (
    Member,
    Run,
    build_trainer,
    finish_from_checkpoint,
    run_loop,
    start_job_tracking,
    writing,
)

logger = logging.getLogger(__name__)

RAY_RUN_NAME = "ray-train"
JOB_FILE = "job.json"
RUN_FILE = "run.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Where Ray Train records the checkpoints it has registered, in ``RUN_DIR/ray-train``."""


@dataclass(kw_only=True)
class DistributedOptions:
    """How to run a job on Ray; not part of the job's identity (a resume may change them)."""

    workers: int = 1
    """Data-parallel training workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    checkpoint_every: int = 100
    """Report a checkpoint every this many steps (and at the end)."""
    max_failures: int = 2
    """Worker/node failures to recover from, restarting at the latest checkpoint."""
    data: str = "direct"
    """How a store reaches the workers: direct (every rank reads it in one seeded order) or ray (Ray Data shards)."""
    mlflow_uri: str | None = None
    """Tracking URI; default MLFLOW_TRACKING_URI or sqlite:///./mlflow.db."""
    experiment: str = "sae-ray"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; default the output folder's name."""
    parent_run_id: str | None = None
    """Nest this run under another MLflow run (sweeps)."""

    def __post_init__(self) -> None:
        check(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        check(self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        check(self.data in ("direct", "ray"), f"data must be 'direct' or 'ray', got {self.data!r}")


# -- inside each worker -------------------------------------------------------------------------
def make_reducer(world_size: int):
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}

    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        if world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, op=ops[op])
        return t

    return reduce


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    runs: list[Run] = config["runs"]
    opts = DistributedOptions(**config["options"])
    if not opts.use_gpu:  # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved
        torch.set_num_threads(max(1, int(opts.cpus_per_worker)))
    device, reduce = ray.train.torch.get_device(), make_reducer(world)
    members = [Member(run, build_trainer(run.job, run.widths, world=world, device=device, reduce=reduce),
                      MlflowTracker(config["mlflow_uri"], run_id) if rank == 0 else NullTracker())
               for run, run_id in zip(runs, config["run_ids"], strict=True)]
    checkpoint = ray.train.get_checkpoint()
    states = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            states = member_states(load_checkpoint(folder))
    elif config.get("resume_from"):  # killed before Ray recorded its checkpoints: see latest_checkpoint
        states = member_states(load_checkpoint(config["resume_from"]))
    last = max(run.job.train.steps for run in runs)

    def on_step(step: int) -> None:
        if step % opts.checkpoint_every == 0 or step == last:
            report_checkpoint(members, rank, {"step": step})

    run_loop(members, rank=rank, world=world, checkpoints=states, on_step=on_step)


def member_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainer states of a checkpoint: one trainer's state, or a group's ``{"members": [...]}``."""
    return state["members"] if "members" in state else [state]


def report_checkpoint(members: list[Member], rank: int, metrics: dict[str, Any]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (the state is identical on all ranks)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    states = [m.trainer.state_dict() for m in members]
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, states[0] if len(states) == 1 else {"members": states})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# -- the driver -----------------------------------------------------------------------------------
def check_resources(opts: DistributedOptions, ray_data: bool, stream: bool) -> None:
    import ray

    resources = ray.cluster_resources()
    kind, need = ("GPU", opts.workers) if opts.use_gpu else ("CPU", opts.workers * opts.cpus_per_worker)
    have = resources.get(kind, 0)
    if need > have:
        raise UserError(f"{opts.workers} worker(s) need {need:g} {kind}(s) but the Ray cluster has {have:g}; "
                        "lower --workers or add nodes")
    # Ray Data's tasks need a CPU of their own (and the live stream's model actors half a CPU more),
    # or the training workers wait forever for batches.
    reserve = 0.0 if not ray_data else (1.5 if stream else 1.0)
    if reserve and not opts.use_gpu and resources.get("CPU", 0) - need < reserve:
        raise UserError(f"{opts.workers} worker(s) x {opts.cpus_per_worker:g} CPU leave less than {reserve:g} of "
                        f"{resources.get('CPU', 0):g} CPU(s) for Ray Data; lower --cpus-per-worker (e.g. 0.5) or --workers")


def check_run_dir(job: TrainJob, resume: bool) -> None:
    run_dir = Path(job.out).resolve()
    job_file = run_dir / JOB_FILE
    if resume:
        if not job_file.is_file():
            raise UserError(f"--resume {run_dir}: no {JOB_FILE} there; is this a `sae train` output folder?")
        diff = saved_job_differences(json.loads(job_file.read_text()), job)
        if diff:
            raise UserError(f"--resume {run_dir}: the configuration differs from the checkpoint in {diff}; "
                            "resume with the original settings or train into a new --out")
    elif (run_dir / RAY_RUN_NAME).exists():
        raise UserError(f"{run_dir} already holds a training run; use --resume {run_dir} or another --out")


def prepare_run_dir(job: TrainJob, resume: bool) -> Path:
    run_dir = Path(job.out).resolve()
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / JOB_FILE, json.dumps(job.to_dict(), indent=2).encode())
    return run_dir


def newest_checkpoint(run_dir: Path) -> tuple[str, list[dict[str, Any]]] | None:
    """The newest checkpoint in ``run_dir`` that loads, with its trainer states (None: there is none).
    Checkpoints are written whole (save_checkpoint), but one being copied into Ray's storage when the
    driver was killed may be cut short: it does not load and the one before it is taken."""
    for folder in sorted((run_dir / RAY_RUN_NAME).glob("checkpoint_*"), reverse=True):  # names hold the time
        try:
            return str(folder), member_states(load_checkpoint(folder))
        except (FileNotFoundError, SAEFormatError):
            logger.warning("skipping unreadable checkpoint %s", folder)
    return None


def latest_checkpoint(run_dir: Path) -> str | None:
    """On ``--resume``, the checkpoint the workers start from when Ray Train has no record of one: Ray
    writes a checkpoint's folder before it records it in its snapshot, so a driver killed in between
    (SIGKILL, a lost machine) leaves checkpoints Ray would ignore, and the run would restart at step 0."""
    if (run_dir / RAY_RUN_NAME / RAY_SNAPSHOT).is_file():
        return None  # Ray restores its own latest recorded checkpoint
    newest = newest_checkpoint(run_dir)
    return newest[0] if newest is not None else None


def start_tracking(run: Run, opts: DistributedOptions, run_dir: Path) -> MlflowTracker:
    """The run's MLflow run: created once, found again through run.json on resume."""
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        return MlflowTracker(resolve_tracking_uri(opts.mlflow_uri), json.loads(run_file.read_text())["mlflow_run_id"])
    tracker = start_job_tracking(run, uri=opts.mlflow_uri, experiment=opts.experiment, run_name=opts.run_name,
                                 parent_run_id=opts.parent_run_id, extra_params={"workers": opts.workers})
    atomic_write_bytes(run_file, json.dumps({"mlflow_run_id": tracker.run_id, "mlflow_uri": tracker.uri}).encode())
    return tracker


def torch_trainer(config: dict[str, Any], opts: DistributedOptions, run_dir: Path, datasets=None):
    """The TorchTrainer: ``opts``' workers, checkpoints and failure recovery in ``run_dir``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=opts.use_gpu,
                                     resources_per_worker=None if opts.use_gpu else {"CPU": opts.cpus_per_worker}),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(run_dir),
                             failure_config=FailureConfig(max_failures=opts.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )


def train_distributed(job: TrainJob, opts: DistributedOptions, *, resume: bool = False,
                      overwrite: bool = False) -> dict[str, Any]:
    """Run ``job`` on Ray Train (connecting to RAY_ADDRESS or starting a local Ray)."""
    run = Run(job, data=opts.data, overwrite=overwrite)  # refuses bad input before Ray starts or anything is written
    check_run_dir(job, resume)
    return train_group_distributed([run], opts, resume=resume)[0]


def train_group_distributed(runs: list[Run], opts: DistributedOptions, *, resume: bool = False,
                            trackers: list[MlflowTracker] | None = None) -> list[dict[str, Any]]:
    """Train ``runs`` (sharing one source) together on Ray Train: one pass over the data for all of them;
    Ray's checkpoints and state live in the first run's folder."""
    with writing(runs):
        return _train_group_distributed(runs, opts, resume, trackers)


def _train_group_distributed(runs: list[Run], opts: DistributedOptions, resume: bool,
                             trackers: list[MlflowTracker] | None) -> list[dict[str, Any]]:
    runs[0].source.check_world(opts.workers)
    if resume:  # killed while finishing, after the last checkpoint: finish from it, without Ray
        run_dir = prepare_run_dir(runs[0].job, resume)
        newest = newest_checkpoint(run_dir)
        if newest is not None and all(int(state["step"]) >= run.job.train.steps
                                      for run, state in zip(runs, newest[1], strict=True)):
            return _finish_all(runs, newest[1], trackers or [start_tracking(runs[0], opts, run_dir)])
    ensure_ray()
    datasets = runs[0].source.datasets()
    check_resources(opts, ray_data=datasets is not None, stream=not runs[0].job.activations)
    run_dir = prepare_run_dir(runs[0].job, resume)
    for run in runs[1:]:
        prepare_run_dir(run.job, resume)
    trackers = trackers or [start_tracking(runs[0], opts, run_dir)]
    config = {"runs": runs, "options": asdict(opts), "run_ids": [t.run_id for t in trackers],
              "mlflow_uri": trackers[0].uri, "resume_from": latest_checkpoint(run_dir) if resume else None}
    try:
        result = torch_trainer(config, opts, run_dir, datasets).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training ended without a checkpoint: {result.error}")
        with result.checkpoint.as_directory() as folder:
            states = member_states(load_checkpoint(folder))
    except BaseException as exc:
        for tracker in trackers:
            tracker.fail(exc)
        raise
    return _finish_all(runs, states, trackers)


def _finish_all(runs: list[Run], states: list[dict[str, Any]], trackers: list[MlflowTracker]) -> list[dict[str, Any]]:
    """Evaluate and publish every run from its final trainer state; close its MLflow run."""
    try:
        metrics = [finish_from_checkpoint(run, state, tracker) for run, state, tracker in zip(runs, states, trackers, strict=True)]
    except BaseException as exc:
        for tracker in trackers:
            tracker.fail(exc)
        raise
    return [{**m, "mlflow_run_id": t.run_id} for m, t in zip(metrics, trackers, strict=True)]
