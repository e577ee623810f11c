"""Data-parallel SAE training on Ray Train: DDP workers running the sae_core trainer, checkpoints
that survive a lost worker or node, MLflow from rank 0.

Data reaches the workers in one of two ways:
- ``data="direct"``: every rank reads the store (a shared filesystem on a cluster) in the same seeded
  order and keeps its slice of each global batch. N workers then see exactly the batches one
  worker would, so results match a single-process run to float tolerance.
- ``data="ray"``: Ray Data reads the Parquet parts and each worker takes its shard through
  ``ray.train.get_dataset_shard`` with a seeded local shuffle buffer: scales to stores bigger than
  a node, and is how the live activation stream arrives.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sae_core
from sae_core.io import load_checkpoint, save_checkpoint
from sae_core.store import ActivationStore, atomic_write_bytes
from sae_core.trainer import Trainer
from workflows.errors import UserError
from workflows.raysession import ensure_ray
from workflows.tracking import MlflowTracker, NullTracker, resolve_tracking_uri
from workflows.training import (
    TrainJob,
    finish_run,
    finish_with,
    hook_metadata,
    hook_widths,
    log_final,
    open_checked_store,
    read_examples,
    sae_config_for,
    split_rows,
    start_job_tracking,
    store_batches,
    store_metadata,
    store_widths,
)

logger = logging.getLogger(__name__)

RAY_RUN_NAME = "ray-train"
JOB_FILE = "job.json"
RUN_FILE = "run.json"


@dataclass(kw_only=True)
class DistributedOptions:
    """How to run a TrainJob on Ray; not part of the job's identity (a resume may change them)."""

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
    """"direct" (ranks read the store in one seeded order) or "ray" (Ray Data shards)."""
    mlflow_uri: str | None = None
    """Tracking URI; default MLFLOW_TRACKING_URI or sqlite:///./mlflow.db."""
    experiment: str = "sae-ray"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; default the output folder's name."""
    parent_run_id: str | None = None
    """Nest this run under another MLflow run (sweeps)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.data not in ("direct", "ray"):
            raise UserError(f"data must be 'direct' or 'ray', got {self.data!r}")


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


def direct_batches(job: TrainJob, rank: int, world: int, skip: int) -> Iterator[torch.Tensor]:
    store = ActivationStore(job.activations)
    train_rows, _ = split_rows(store, job)
    local = job.train.batch_size // world
    for i, batch in enumerate(store_batches(store, job, train_rows)):
        if i >= skip:
            if isinstance(batch, tuple):  # a transcoder's (input, target)
                yield tuple(t[rank * local : (rank + 1) * local] for t in batch)
            else:
                yield batch[rank * local : (rank + 1) * local]


def ray_batches(job: TrainJob, world: int) -> Iterator[torch.Tensor]:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    local = job.train.batch_size // world
    epoch = 0
    while True:
        for batch in shard.iter_torch_batches(batch_size=local, drop_last=True, local_shuffle_buffer_size=16 * local,
                                              local_shuffle_seed=job.train.seed + epoch):
            yield job.example(batch)
        epoch += 1


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job = TrainJob.from_dict(config["job"])
    opts = DistributedOptions(**config["options"])
    if not opts.use_gpu:  # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved
        torch.set_num_threads(max(1, int(opts.cpus_per_worker)))
    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    sae = sae_core.build(sae_config_for(job, config["d_in"], config.get("d_out"))).to(ray.train.torch.get_device())
    ddp = torch.nn.parallel.DistributedDataParallel(sae) if world > 1 else None
    trainer = Trainer(sae, job.train, reduce=make_reducer(world), forward_module=ddp, world_size=world)
    tracker = MlflowTracker(config["mlflow_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else NullTracker()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(load_checkpoint(folder))
        logger.info("rank %d resumed at step %d", rank, trainer.step_count)
        tracker.log_metrics({"resumed_from_step": trainer.step_count}, step=trainer.step_count)
    elif job.activations:  # the same sample on every rank; a live stream initialises from its first batch
        store = ActivationStore(job.activations)
        trainer.initialize(read_examples(store, job, 0, min(job.train.init_sample_tokens, store.n_tokens)))
    batches = direct_batches(job, rank, world, trainer.step_count) if opts.data == "direct" else ray_batches(job, world)

    def on_step(step: int) -> None:
        if step % opts.checkpoint_every == 0 or step == job.train.steps:
            report_checkpoint(trainer, rank, {"step": step})

    for row in trainer.fit(batches, on_step=on_step):
        tracker.log_metrics(row, step=int(row["step"]))


def report_checkpoint(trainer: Trainer, rank: int, metrics: dict[str, Any]) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (the state is identical on all ranks)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, trainer.state_dict())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# -- the driver -----------------------------------------------------------------------------------
def check_resources(opts: DistributedOptions, stream: bool = False) -> None:
    import ray

    resources = ray.cluster_resources()
    kind, need = ("GPU", opts.workers) if opts.use_gpu else ("CPU", opts.workers * opts.cpus_per_worker)
    have = resources.get(kind, 0)
    if need > have:
        raise UserError(f"{opts.workers} worker(s) need {need:g} {kind}(s) but the Ray cluster has {have:g}; "
                        "lower --workers or add nodes")
    # Ray Data's tasks need a CPU of their own (and the live stream's model actors half a CPU more),
    # or the training workers wait forever for batches.
    reserve = 0.0 if opts.data != "ray" else (1.5 if stream else 1.0)
    if reserve and not opts.use_gpu and resources.get("CPU", 0) - need < reserve:
        raise UserError(f"{opts.workers} worker(s) x {opts.cpus_per_worker:g} CPU leave less than {reserve:g} of "
                        f"{resources.get('CPU', 0):g} CPU(s) for Ray Data; lower --cpus-per-worker (e.g. 0.5) or --workers")


def ray_dataset(job: TrainJob, store: ActivationStore):
    import ray.data

    train_rows, _ = split_rows(store, job)
    files = [str(store.root / f["path"]) for f in store.manifest.files]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # so limit() keeps exactly the training rows
    return ray.data.read_parquet(files).select_columns(job.columns()).limit(train_rows)


def check_run_dir(job: TrainJob, resume: bool) -> None:
    run_dir = Path(job.out).resolve()
    job_file = run_dir / JOB_FILE
    if resume:
        if not job_file.is_file():
            raise UserError(f"--resume {run_dir}: no {JOB_FILE} there; is this a `sae train` output folder?")
        saved = json.loads(job_file.read_text())
        if saved != job.to_dict():
            diff = sorted(k for k in set(saved) | set(job.to_dict()) if saved.get(k) != job.to_dict().get(k))
            raise UserError(f"--resume {run_dir}: the configuration differs from the checkpoint in {diff}; "
                            "resume with the original settings or train into a new --out")
    elif (run_dir / RAY_RUN_NAME).exists():
        raise UserError(f"{run_dir} already holds a training run; use --resume {run_dir} or another --out")


def prepare_run_dir(job: TrainJob, resume: bool) -> Path:
    run_dir = Path(job.out).resolve()
    job_file = run_dir / JOB_FILE
    if resume:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(job_file, json.dumps(job.to_dict(), indent=2).encode())
    return run_dir


def start_tracking(job: TrainJob, opts: DistributedOptions, run_dir: Path,
                   store: ActivationStore | None) -> MlflowTracker:
    """The run's MLflow run: created once, found again through run.json on resume."""
    run_file = run_dir / RUN_FILE
    if run_file.is_file():
        return MlflowTracker(resolve_tracking_uri(opts.mlflow_uri), json.loads(run_file.read_text())["mlflow_run_id"])
    tracker = start_job_tracking(job, store, uri=opts.mlflow_uri, experiment=opts.experiment, run_name=opts.run_name,
                                 parent_run_id=opts.parent_run_id, extra_params={"workers": opts.workers})
    atomic_write_bytes(run_file, json.dumps({"mlflow_run_id": tracker.run_id, "mlflow_uri": tracker.uri}).encode())
    return tracker


class StreamSource:
    """The live activation stream: windows split into training (fed to the workers through Ray Data,
    re-run through the model each epoch) and held-out (run once at the end, for evaluation)."""

    def __init__(self, job: TrainJob):
        from workflows.activations import CollectConfig, plan

        self.job = job
        self.cfg = CollectConfig.from_dict({**(job.stream or {}), "hooks": job.columns()})
        self.plan = plan(self.cfg)
        n = self.plan.n_windows
        n_eval = max(1, int(n * job.eval_fraction))
        if n - n_eval < 1:
            raise UserError(f"--tokens {self.cfg.n_tokens} gives {n} window(s): too few to hold some out; raise --tokens")
        self.train_ids, self.eval_ids = np.arange(n - n_eval), np.arange(n - n_eval, n)

    @property
    def widths(self) -> tuple[int, int | None]:
        return hook_widths(self.plan.d, self.job)

    def dataset(self):
        from workflows.activations import _activation_dataset

        return _activation_dataset(self.cfg, self.plan.windows, self.train_ids)

    def held_out(self) -> torch.Tensor:
        from workflows.activations import _activation_dataset

        ds = _activation_dataset(self.cfg, self.plan.windows, self.eval_ids)
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        return self.job.example({h: torch.cat([torch.from_numpy(np.asarray(b[h], dtype=np.float32)) for b in batches])
                                 for h in self.job.columns()})

    def metadata(self) -> dict[str, Any]:
        return {"model_name": self.cfg.model, **hook_metadata(self.job), "context_size": self.cfg.context_size,
                "prepend_bos": True, "dataset_path": self.cfg.corpus, "exclude_special_tokens": True}


def torch_trainer(loop, config: dict[str, Any], opts: DistributedOptions, run_dir: Path, datasets=None):
    """The TorchTrainer every Ray Train workflow runs: ``opts``' workers, checkpoints and failure
    recovery in ``run_dir``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=opts.workers, use_gpu=opts.use_gpu,
                                     resources_per_worker=None if opts.use_gpu else {"CPU": opts.cpus_per_worker}),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(run_dir),
                             failure_config=FailureConfig(max_failures=opts.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )


def train_distributed(job: TrainJob, opts: DistributedOptions, *, resume: bool = False) -> dict[str, Any]:
    """Run ``job`` on Ray Train (connecting to RAY_ADDRESS or starting a local Ray)."""
    if job.train.batch_size % opts.workers:
        raise UserError(f"--batch-size {job.train.batch_size} is not divisible by --workers {opts.workers}")
    if job.stream:
        opts.data = "ray"  # the stream reaches the workers as a Ray Dataset
    store = open_checked_store(job) if job.activations else None
    check_run_dir(job, resume)
    ensure_ray()
    source = StreamSource(job) if store is None else None
    d_in, d_out = store_widths(store, job) if store is not None else source.widths
    sae_config_for(job, d_in, d_out)  # refuse a bad config before starting anything
    check_resources(opts, stream=source is not None)
    run_dir = prepare_run_dir(job, resume)
    tracker = start_tracking(job, opts, run_dir, store)
    config = {"job": job.to_dict(), "options": asdict(opts), "d_in": d_in, "d_out": d_out, "run_id": tracker.run_id,
              "mlflow_uri": tracker.uri}
    datasets = None
    if source is not None:
        datasets = {"train": source.dataset()}
    elif opts.data == "ray":
        datasets = {"train": ray_dataset(job, store)}
    trainer = torch_trainer(train_loop_per_worker, config, opts, run_dir, datasets)
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end("KILLED")
        raise
    return finish_distributed(job, result, store if store is not None else source, tracker, d_in, d_out)


def finish_distributed(job: TrainJob, result, source: ActivationStore | StreamSource, tracker: MlflowTracker,
                       d_in: int, d_out: int | None) -> dict[str, Any]:
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error}")
    torch.manual_seed(job.train.seed)
    trainer = Trainer(sae_core.build(sae_config_for(job, d_in, d_out)), job.train)
    with result.checkpoint.as_directory() as folder:
        trainer.load_state_dict(load_checkpoint(folder))
    if isinstance(source, StreamSource):
        metrics = finish_with(job, trainer, source.held_out(), source.metadata())
    else:
        metrics = finish_run(job, trainer, source, store_metadata(source, job))
    log_final(tracker, job, metrics, trainer.step_count)
    return {**metrics, "steps": trainer.step_count, "mlflow_run_id": tracker.run_id}
