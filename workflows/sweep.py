"""Ray Tune sweeps over SAE width and sparsity, one MLflow child run per trial, Pareto frontiers at the end.

Each Tune trial trains in its own Ray actor with ``train_local`` on the shared activation store (the
store is read, never recomputed), reports every logged training row through ``ray.tune.report`` (so
ASHA can stop a bad trial) and finally one row of held-out metrics. When the sweep has more trials than
run at once, trials that read the same data are packed: one Tune trial trains a group of them on one read
of the store, each SAE still with its own MLflow run and folder (workflows/sweep_pack.py; ``pack=False``
turns it off). A trial whose hyperparameters
are impossible (k > d_sae) or whose loss goes NaN fails alone: its MLflow run ends FAILED with an
``error`` tag, and the sweep goes on.

Grid knobs and the architecture fields they set:
- ``d_sae`` and any other architecture field: the field itself;
- ``k`` -> k, ``l1`` -> l1_coefficient, ``l0`` -> l0_coefficient (``workflows.options.resolve_knobs``);
- ``target_l0`` -> the architecture's ``target_l0`` field where it has one (jumprelu: a target loss;
  relu, gated: the trainer's coefficient controller; kl_sparse: rho; PAIR and STACKED wirings through
  their activation; see sae_core/l0.py), else k (topk, batchtopk, matryoshka: L0 is k by construction);
- a TrainConfig field (lr, seed, ...): the training setting.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sae_core
from sae_core.trainer import TrainConfig
from workflows import frontier as fr
from workflows.errors import UserError
from workflows.frontier_report import describe_frontier
from workflows.job import TrainJob
from workflows.options import resolve_knobs
from workflows.sources import StoreSource
from workflows.sweep_pack import plan_groups, run_group_trial
from workflows.tracking import MlflowTracker, NullTracker, resolve_tracking_uri
from workflows.training import Run, start_job_tracking, train_local

logger = logging.getLogger(__name__)

TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(kw_only=True)
class SweepSpec:
    """A whole sweep: what every trial shares, and the grid it varies."""

    activations: str
    """Activation store directory (absolute: trials run in other working directories)."""
    hook: str
    """Hook column to train on."""
    archs: list[str]
    """Architectures; each is crossed with the whole grid."""
    grid: dict[str, list[Any]]
    """Knob -> values (see the module docstring for the knobs)."""
    steps: int
    """Optimizer steps per trial."""
    experiment: str = "sae-ray"
    """MLflow experiment of the parent and child runs."""
    mlflow_uri: str | None = None
    """Tracking URI; default MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db."""
    samples: int = 1
    """Repeats of the grid (Tune's num_samples); with more than one, each trial draws its own seed."""
    scheduler: str = "fifo"
    """"fifo" (run every trial to the end) or "asha" (stop trials behind their peers at the same step)."""
    asha_metric: str = "fvu"
    """Training metric ASHA compares (minimised)."""
    batch_size: int = TrainConfig.batch_size
    """Tokens per step."""
    lr: float = TrainConfig.lr
    """Adam learning rate."""
    sets: dict[str, Any] = field(default_factory=dict)
    """Other architecture or training fields, the same for every trial."""
    out: str = "runs/sweeps"
    """Folder for Tune's state and each trial's SAE folder."""
    model: str | None = None
    """Base model: when given, every trial also measures CE loss recovered on held-out text."""
    cpus_per_trial: float = 1.0
    """CPUs reserved per trial: trials run concurrently as the cluster's CPUs allow."""
    pack: bool = True
    """Train trials that share the data (steps, batch size, seed) in groups, one Tune trial per group, on one
    read of the store, when there are more trials than run at once (fifo only; workflows/sweep_pack.py)."""

    def __post_init__(self) -> None:
        if not self.archs:
            raise UserError("give at least one --arch")
        if not self.grid or any(not values for values in self.grid.values()):
            raise UserError("give at least one --grid KNOB=V1,V2,... with values")
        if self.samples < 1 or self.steps < 1:
            raise UserError(f"--samples and --steps must be >= 1, got {self.samples} and {self.steps}")
        if self.scheduler not in ("fifo", "asha"):
            raise UserError(f"--scheduler must be fifo or asha, got {self.scheduler!r}")
        if self.cpus_per_trial <= 0:
            raise UserError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- knobs -> job ------------------------------------------------------------------------------------
def map_knobs(arch: str, knobs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture fields, training fields) for one trial's knob values; unknown knobs are UserErrors."""
    train = {name: value for name, value in knobs.items() if name in TRAIN_FIELDS}
    sae = {name: value for name, value in knobs.items() if name not in TRAIN_FIELDS}
    fields = {f.name for f in dataclasses.fields(sae_core.get(arch).config_cls)}
    if "target_l0" in sae and "target_l0" not in fields:
        if "k" not in fields:
            raise UserError(f"architecture {arch!r} has neither a target_l0 nor a k setting; sweep its penalty instead")
        if "k" in sae:
            raise UserError("give k or target_l0, not both (target_l0 is k for TopK-family architectures)")
        sae["k"] = sae.pop("target_l0")
    return resolve_knobs(arch, sae), train


def check_spec(spec: SweepSpec) -> None:
    """Everything that can be refused before Ray starts: architectures, knob names, --set fields, the store."""
    for arch in spec.archs:
        map_knobs(arch, {name: values[0] for name, values in spec.grid.items()})
        config_fields = {f.name for f in dataclasses.fields(sae_core.get(arch).config_cls)}
        unknown = sorted(set(spec.sets) - config_fields - TRAIN_FIELDS)
        if unknown:
            raise UserError(f"--set {unknown} is neither a field of architecture {arch!r} nor a training field")
    probe_source(spec)


def probe_source(spec: SweepSpec) -> StoreSource:
    """The store every trial reads, checked (its hook, its size for the batch) before anything runs."""
    return StoreSource(job_for(spec, {"arch": spec.archs[0]}, out="unused"))


def job_for(spec: SweepSpec, config: Mapping[str, Any], out: str) -> TrainJob:
    """The TrainJob of one trial; raises ConfigError for impossible training values."""
    arch = config["arch"]
    sae_knobs, train_knobs = map_knobs(arch, {k: v for k, v in config.items() if k != "arch"})
    train_sets = {k: v for k, v in spec.sets.items() if k in TRAIN_FIELDS}
    sae_sets = {k: v for k, v in spec.sets.items() if k not in TRAIN_FIELDS}
    train = TrainConfig.from_dict({"steps": spec.steps, "batch_size": spec.batch_size, "lr": spec.lr, **train_sets,
                                   **train_knobs})
    return TrainJob(activations=spec.activations, hook=spec.hook, arch=arch, sae={**sae_sets, **sae_knobs},
                    train=train, out=out)


def run_name_for(config: Mapping[str, Any]) -> str:
    return "-".join([config["arch"], *(f"{k}{v}" for k, v in sorted(config.items()) if k != "arch")])


# -- inside each trial -------------------------------------------------------------------------------
class RunHeldOpen(NullTracker):
    """Passes everything to ``inner`` except ``end``: the trial ends the run after the CE hook."""

    def __init__(self, inner: MlflowTracker):
        self.inner, self.run_id = inner, inner.run_id

    def log_params(self, params):
        self.inner.log_params(params)

    def log_metrics(self, metrics, step):
        self.inner.log_metrics(metrics, step)

    def set_tags(self, tags):
        self.inner.set_tags(tags)

    def log_artifacts(self, local_dir, artifact_path=None):
        self.inner.log_artifacts(local_dir, artifact_path)

    def log_artifact(self, local_file, artifact_path=None):
        self.inner.log_artifact(local_file, artifact_path)

    def fail(self, exc):
        self.inner.fail(exc)  # a failure does end the run
        self.ended = True


def run_trial(config: dict[str, Any], *, spec: dict[str, Any], parent_run_id: str, uri: str) -> None:
    """One Tune trial: a child MLflow run, train_local with tune.report per row, held-out metrics last."""
    import torch
    from ray import tune

    sweep = SweepSpec(**spec)
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))  # Ray sets OMP_NUM_THREADS=1 in actors
    trial = tune.get_context()
    name = run_name_for(config)
    out = str(Path(sweep.out) / "saes" / f"{name}-{trial.get_trial_id()}")
    tags = {"sweep_trial": "true", "trial_id": trial.get_trial_id(), "trial_name": trial.get_trial_name()}
    try:
        run = Run(job_for(sweep, config, out))
    except Exception as exc:  # impossible values (k > d_sae, ...): still an MLflow run, FAILED with the reason
        tracker = MlflowTracker.create(uri, sweep.experiment, name, {**tags, "hook": sweep.hook}, parent_run_id)
        tracker.log_params({"arch": config["arch"], "sweep": config})
        tracker.fail(exc)
        raise
    job = run.job
    tracker = start_job_tracking(run, uri=uri, experiment=sweep.experiment, run_name=name,
                                 parent_run_id=parent_run_id, extra_params={"sweep": config})
    tracker.set_tags(tags)
    try:
        final = train_and_measure(run, sweep, tracker)
    except SystemExit:  # how tune.report ends a trial the scheduler stopped: not a failure
        tracker.set_tags({"stopped_early": sweep.scheduler})
        tracker.end("KILLED")
        raise
    except BaseException as exc:
        tracker.fail(exc)
        raise
    tune.report({**final, "step": job.train.steps, "held_out": 1, "mlflow_run_id": tracker.run_id})


def train_and_measure(run: Run, sweep: SweepSpec, tracker: MlflowTracker) -> dict[str, float]:
    from ray import tune

    job = run.job

    def report(row: dict[str, float]) -> None:
        # The last row is followed by the held-out report; ASHA's max_t lies beyond it, so a trial
        # is never stopped between training and saving its results.
        if row["step"] < job.train.steps:
            tune.report({**row, "held_out": 0, "mlflow_run_id": tracker.run_id})

    metrics = train_local(run, on_metrics=report, tracker=RunHeldOpen(tracker))
    final = {k: metrics[k] for k in ("l0", "fvu", "mse", "dead_fraction")}
    if sweep.model:
        from workflows.evaluate import ce_loss_recovered

        final["ce_loss_recovered"] = float(ce_loss_recovered(Path(job.out), model=sweep.model, hook=job.hook))
        tracker.log_metrics({"final/ce_loss_recovered": final["ce_loss_recovered"]}, step=job.train.steps)
    tracker.end("FINISHED")
    return final


# -- the driver ----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class SweepResult:
    parent_run_id: str
    """The sweep's MLflow parent run."""
    trials: int
    """Trials (SAEs) the sweep ran."""
    tune_trials: int
    """Tune trials that ran them: fewer than ``trials`` when trials were packed into groups."""
    finished: list[fr.Trial]
    """Trials that finished, with held-out metrics."""
    failed: int
    """Trials that raised (bad hyperparameters, NaN loss, a lost actor)."""
    stopped: int
    """Trials ASHA stopped early."""
    out: Path
    """Folder holding the trials' SAEs, Tune's state and the frontier files."""


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {"arch": tune.grid_search(list(spec.archs))}
    space.update({name: tune.grid_search(list(values)) for name, values in spec.grid.items()})
    if spec.samples > 1 and "seed" not in spec.grid:
        space["seed"] = tune.randint(0, 2**31 - 1)  # otherwise the repeats would be identical
    return space


def make_scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler == "fifo":
        return FIFOScheduler()
    log_every = int(spec.sets.get("log_every", TrainConfig.log_every))
    return ASHAScheduler(time_attr="step", metric=spec.asha_metric, mode="min", max_t=spec.steps + 1,
                         grace_period=min(max(spec.steps // 4, log_every), spec.steps), reduction_factor=2)


def start_parent(spec: SweepSpec, uri: str, model: str, groups: list[list[dict[str, Any]]] | None) -> MlflowTracker:
    tags = {"sweep": "true", "hook": spec.hook, "archs": ",".join(spec.archs), "model": model,
            "scheduler": spec.scheduler, "packed_groups": str(len(groups)) if groups else "none"}
    parent = MlflowTracker.create(uri, spec.experiment, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags)
    parent.log_params({"grid": {k: ",".join(map(str, v)) for k, v in spec.grid.items()}, "archs": ",".join(spec.archs),
                       "steps": spec.steps, "batch_size": spec.batch_size, "lr": spec.lr, "samples": spec.samples,
                       "set": spec.sets, "activations": spec.activations, "hook": spec.hook,
                       "trials": len(spec.archs) * spec.samples * math.prod(len(v) for v in spec.grid.values())})
    return parent


def run_sweep(spec: SweepSpec) -> SweepResult:
    """Run the sweep on the connected (or a new local) Ray; the parent run ends holding the frontiers."""
    from ray import tune

    from workflows.raysession import ensure_ray

    check_spec(spec)
    uri = resolve_tracking_uri(spec.mlflow_uri)
    ensure_ray()
    check_cpus(spec)
    groups = plan_groups(spec, slots=concurrent_trials(spec))
    parent = start_parent(spec, uri, probe_source(spec).facts().model_name, groups)
    out = Path(spec.out).resolve() / f"sweep-{parent.run_id[:8]}"
    trial_spec = {**spec.to_dict(), "out": str(out)}
    if groups is None:
        trainable = tune.with_parameters(run_trial, spec=trial_spec, parent_run_id=parent.run_id, uri=uri)
        space, samples = param_space(spec), spec.samples
    else:
        trainable = tune.with_parameters(run_group_trial, spec=trial_spec, groups=groups, parent_run_id=parent.run_id,
                                         uri=uri)
        space, samples = {"group": tune.grid_search(list(range(len(groups))))}, 1
    errors = trial_errors_callback()
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": spec.cpus_per_trial}), param_space=space,
                       tune_config=tune.TuneConfig(num_samples=samples, scheduler=make_scheduler(spec),
                                                   reuse_actors=True),  # torch and mlflow import once per actor
                       run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0, callbacks=[errors],
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    try:
        grid = tuner.fit()
    except BaseException:
        parent.end("KILLED")
        raise
    n_trials = len(grid) if groups is None else sum(map(len, groups))
    return finish_sweep(spec, parent, grid, errors.errors, out, n_trials)


def concurrent_trials(spec: SweepSpec) -> int:
    """Trials the Ray cluster runs at once: its CPUs / ``cpus_per_trial``."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 0) // spec.cpus_per_trial))


def check_cpus(spec: SweepSpec) -> None:
    import ray

    have = ray.cluster_resources().get("CPU", 0)
    if spec.cpus_per_trial > have:
        raise UserError(f"--cpus-per-trial {spec.cpus_per_trial:g} exceeds the Ray cluster's {have:g} CPUs")


def trial_errors_callback():
    """A Tune callback that remembers, per trial id, why an errored trial failed (for runs left open)."""
    from ray import tune

    class TrialErrors(tune.Callback):
        def __init__(self) -> None:
            self.errors: dict[str, str] = {}

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            error = trial.get_error()
            lines = str(error).strip().splitlines() if error is not None else []
            self.errors[trial.trial_id] = lines[-1] if lines else "the trial's actor failed"

    return TrialErrors()


def settle_runs(spec: SweepSpec, parent: MlflowTracker, errors: Mapping[str, str]) -> tuple[int, int]:
    """Close child runs left RUNNING (stopped by ASHA, or an actor that died); (failed, stopped) counts."""
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    failed = stopped = 0
    for run in parent.client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
                                         max_results=10000):
        status, trial_id = run.info.status, run.data.tags.get("trial_id", "")
        child = MlflowTracker(parent.uri, run.info.run_id)
        if status == "RUNNING" and trial_id in errors:
            child.fail(RuntimeError(errors[trial_id]))
            status = "FAILED"
        elif status == "RUNNING":
            child.set_tags({"stopped_early": spec.scheduler})
            child.end("KILLED")
            status = "KILLED"
        failed += status == "FAILED"
        stopped += status == "KILLED"
    return failed, stopped


def finish_sweep(spec: SweepSpec, parent: MlflowTracker, grid, errors: Mapping[str, str], out: Path,
                 n_trials: int) -> SweepResult:
    failed, stopped = settle_runs(spec, parent, errors)
    trials = fr.collect_trials(spec.experiment, uri=parent.uri, parent_run_id=parent.run_id)
    on_front = fr.frontier_run_ids(trials)
    for trial in trials:
        tags = {"pareto": str(trial.run_id in on_front["l0_fvu"]).lower()}
        if trial.run_id in {t.run_id for t in fr.frontier(trials, fr.L0_CE)[0]}:
            tags["pareto_ce"] = str(trial.run_id in on_front["l0_ce"]).lower()
        MlflowTracker(parent.uri, trial.run_id).set_tags(tags)
    if trials:
        parent.log_artifacts(fr.write_frontier_files(trials, out / "frontier")[0].parent, "frontier")
        describe_frontier(parent.uri, spec.experiment, parent.run_id)
    parent.log_metrics({"trials": n_trials, "tune_trials": len(grid), "finished": len(trials), "failed": failed,
                        "stopped": stopped, "pareto_size": len(on_front["l0_fvu"])}, step=0)
    parent.end("FINISHED" if trials else "FAILED")
    return SweepResult(parent_run_id=parent.run_id, trials=n_trials, tune_trials=len(grid), finished=trials,
                       failed=failed, stopped=stopped, out=out)
