"""Transcoder sets: one (skip) transcoder per MLP of a model, trained together, evaluated together.

A set is what circuit tracing needs (workflows/attribution.py): every MLP it covers is replaced by a
sparse transcoder reading ``blocks.L.hook_mlp_in`` and writing ``blocks.L.hook_mlp_out``. One pass of the
model collects both hooks of every requested layer into one store (the collector records several hooks
per store); then each layer's transcoder trains as its own Ray Tune trial (concurrent as the cluster's
CPUs allow), each with its own MLflow child run under one parent run. The set folder holds one SAELens
folder per member (``layer_NN/``) and the manifest ``transcoder_set.json`` (model, layers, hooks, each
member's folder, metrics and MLflow run), published atomically once every member has finished.

:func:`workflows.set_eval.evaluate_set` splices every member at once (each transcoder reads the MLP input of the spliced
model, so errors compound as in the full replacement model) and reports CE loss recovered against
zeroing every covered MLP output, KL, and the replacement model's top-1 agreement with the real model.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_core.io import is_finished_sae, load_sae
from sae_core.publish import atomic_write_bytes
from sae_core.trainer import TrainConfig
from workflows.errors import UserError
from workflows.job import TrainJob, saved_job_differences

logger = logging.getLogger(__name__)

SET_FILE = "transcoder_set.json"
SET_FORMAT = "sae-ray-transcoder-set"
HOOK_IN = "blocks.{layer}.hook_mlp_in"
HOOK_OUT = "blocks.{layer}.hook_mlp_out"


def parse_layers(value: Any) -> list[int]:
    """Layers from a list of ints or a string "0-5", "0,2,4" or "0-3,8"; sorted, no repeats."""
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in filter(None, value.replace(" ", "").split(",")):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not match:
                raise UserError(f"layers {value!r}: expected numbers and ranges like 0-5,8")
            lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
            out.extend(range(lo, hi + 1))
        value = out
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
        raise UserError(
            f"layers must be a non-empty list of layer numbers (or a range like 0-5), got {value!r}"
        )
    if len(set(value)) != len(value):
        raise UserError(f"layers repeat a layer: {value}")
    return sorted(value)


def set_hooks(layers: list[int]) -> list[str]:
    """The store columns a set trains on: MLP in and out of every layer."""
    return [h.format(layer=layer) for layer in layers for h in (HOOK_IN, HOOK_OUT)]


@dataclass(kw_only=True)
class SetSpec:
    """A transcoder set to train on a store holding MLP in/out of every layer."""

    activations: str
    """Activation store (absolute path or URI) with ``set_hooks(layers)``."""
    layers: list[int]
    """Layers whose MLPs get a transcoder each."""
    out: str
    """Set folder: layer_NN/ per member and the manifest."""
    arch: str = "skip_transcoder"
    """A PAIR-wired architecture (transcoder, skip_transcoder)."""
    sae: dict[str, Any] = field(default_factory=dict)
    """Architecture fields shared by every member."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields shared by every member."""
    cpus_per_trial: float = 1.0
    """CPUs reserved per member's trial (its torch threads); trials run concurrently as CPUs allow."""
    experiment: str = "sae-transcoder-set"
    """MLflow experiment of the parent and child runs."""
    mlflow_uri: str | None = None
    """Tracking URI; default MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db."""
    run_name: str = "transcoder-set"
    """MLflow parent run name."""

    def __post_init__(self) -> None:
        self.layers = parse_layers(self.layers)
        if self.cpus_per_trial <= 0:
            raise UserError(f"cpus_per_trial must be > 0, got {self.cpus_per_trial}")

    def member_dir(self, layer: int) -> Path:
        return Path(self.out).resolve() / f"layer_{layer:02d}"

    def job(self, layer: int) -> TrainJob:
        return TrainJob(
            activations=self.activations,
            hook=HOOK_IN.format(layer=layer),
            out_hook=HOOK_OUT.format(layer=layer),
            arch=self.arch,
            sae=dict(self.sae),
            train=TrainConfig.from_dict(dict(self.train)),
            out=str(self.member_dir(layer)),
        )


# -- training ------------------------------------------------------------------------------------------
def finished_member(spec: SetSpec, layer: int) -> dict[str, Any] | None:
    """A member folder already holding this exact job's finished transcoder: its manifest entry."""
    folder = spec.member_dir(layer)
    job_file, metrics_file, run_file = (
        folder / "job.json",
        folder / "metrics.json",
        folder / "set_member.json",
    )
    if not (is_finished_sae(folder) and job_file.is_file() and metrics_file.is_file() and run_file.is_file()):
        return None
    if saved_job_differences(json.loads(job_file.read_text()), spec.job(layer)):
        return None
    return json.loads(run_file.read_text())


def train_member(config: dict[str, Any], *, spec: dict[str, Any], parent_run_id: str, uri: str) -> None:
    """One Tune trial: train layer ``config["layer"]``'s transcoder in this actor with its own MLflow child run."""
    from ray import tune

    from workflows.training import Run, start_job_tracking, train_local

    s = SetSpec(**spec)
    layer = int(config["layer"])
    torch.set_num_threads(max(1, int(s.cpus_per_trial)))  # Ray sets OMP_NUM_THREADS=1 in actors
    run = Run(s.job(layer), overwrite=True)
    tracker = start_job_tracking(
        run,
        uri=uri,
        experiment=s.experiment,
        run_name=f"layer_{layer:02d}",
        parent_run_id=parent_run_id,
        extra_params={"set_layer": layer},
    )
    tracker.set_tags({"transcoder_set": "true", "layer": str(layer)})
    metrics = train_local(run, tracker=tracker)  # ends the child run FINISHED (or FAILED on an error)
    entry = member_entry(s, layer, metrics, tracker.run_id)
    atomic_write_bytes(s.member_dir(layer) / "set_member.json", json.dumps(entry).encode())
    tune.report(
        {"layer": layer, "mlflow_run_id": tracker.run_id, **{k: float(v) for k, v in metrics.items()}}
    )


def member_entry(spec: SetSpec, layer: int, metrics: dict[str, Any], run_id: str | None) -> dict[str, Any]:
    return {
        "layer": layer,
        "path": spec.member_dir(layer).name,
        "hook_in": HOOK_IN.format(layer=layer),
        "hook_out": HOOK_OUT.format(layer=layer),
        "mlflow_run_id": run_id,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def train_set(spec: SetSpec) -> dict[str, Any]:
    """Train every member not already finished as concurrent Tune trials; write and return the manifest."""
    from sae_core.store import read_manifest
    from workflows.tracking import MlflowTracker, resolve_tracking_uri

    store = read_manifest(spec.activations)
    missing = [h for h in set_hooks(spec.layers) if h not in store.hooks]
    if missing:
        raise UserError(
            f"the store {spec.activations} lacks {missing}; collect MLP in and out of every layer"
        )
    for layer in spec.layers:  # a bad architecture or field fails here, before any trial starts
        spec.job(layer)
    uri = resolve_tracking_uri(spec.mlflow_uri)
    done = {layer: entry for layer in spec.layers if (entry := finished_member(spec, layer)) is not None}
    todo = [layer for layer in spec.layers if layer not in done]
    parent = MlflowTracker.create(
        uri,
        spec.experiment,
        spec.run_name,
        {"transcoder_set": "true", "model": store.model, "arch": spec.arch},
    )
    parent.log_params(
        {
            "layers": ",".join(map(str, spec.layers)),
            "arch": spec.arch,
            "sae": spec.sae,
            "train": spec.train,
            "activations": spec.activations,
            "reused_layers": sorted(done),
        }
    )
    try:
        if todo:
            run_member_trials(spec, todo, parent.run_id, uri)
        manifest = finish_set(spec, store, done, todo, parent)
    except BaseException as exc:
        parent.fail(exc)
        raise
    parent.end("FINISHED")
    return manifest


def run_member_trials(spec: SetSpec, layers: list[int], parent_run_id: str, uri: str) -> None:
    """One Tune trial per layer, run concurrently; raises naming the first failed member."""
    from ray import tune

    from workflows.raysession import ensure_ray

    ensure_ray()
    trainable = tune.with_resources(
        tune.with_parameters(train_member, spec=asdict(spec), parent_run_id=parent_run_id, uri=uri),
        {"cpu": spec.cpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"layer": tune.grid_search(layers)},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(spec.out).resolve() / "tune"),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    errors = [str(r.error).splitlines()[0] for r in tuner.fit() if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(layers)} members failed: {errors[0]}")


def finish_set(spec: SetSpec, store: Any, done: dict[int, dict], trained: list[int], parent: Any) -> dict[str, Any]:
    """The manifest of every member (reused ones in ``done``, the ``trained`` ones read back from their
    folders), written atomically and logged to the parent run with each member's metrics."""
    for layer in trained:
        entry = finished_member(spec, layer)
        if entry is None:
            raise RuntimeError(
                f"layer {layer}'s trial ended without a finished transcoder in {spec.member_dir(layer)}"
            )
        done[layer] = entry
    manifest = write_manifest(spec, store, [done[layer] for layer in spec.layers], parent.run_id)
    for entry in manifest["members"]:
        metrics = {f"layer_{entry['layer']:02d}/{k}": v for k, v in entry["metrics"].items() if math.isfinite(v)}
        parent.log_metrics(metrics, step=0)
    parent.log_artifact(Path(spec.out) / SET_FILE, "set")
    return manifest


def write_manifest(
    spec: SetSpec, store: Any, members: list[dict[str, Any]], parent_run_id: str | None
) -> dict[str, Any]:
    manifest = {
        "format": SET_FORMAT,
        "version": 1,
        "model": store.model,
        "corpus": store.corpus,
        "context_size": store.context_size,
        "layers": spec.layers,
        "hook_in": HOOK_IN,
        "hook_out": HOOK_OUT,
        "arch": spec.arch,
        "activations": spec.activations,
        "mlflow_parent_run_id": parent_run_id,
        "train_tokens": store.n_tokens,
        "members": members,
    }
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / SET_FILE, json.dumps(manifest, indent=2).encode())
    return manifest


# -- reading a set ---------------------------------------------------------------------------------------
def is_set(path: str | Path) -> bool:
    return (Path(path) / SET_FILE).is_file()


def read_set(path: str | Path) -> dict[str, Any]:
    """The manifest of a set folder; a clear error for anything else."""
    file = Path(path) / SET_FILE
    if not file.is_file():
        raise UserError(
            f"{path} is not a transcoder set (no {SET_FILE}); train one with `sae run --recipe "
            "smollm2-transcoders` or a recipe with --set layers=..."
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != SET_FORMAT:
        raise UserError(f"{file} is not a {SET_FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def load_set(path: str | Path, device: str | torch.device = "cpu") -> dict[int, Any]:
    """layer -> the member's module in eval mode (its scaling factors folded in: it reads raw activations)."""
    manifest = read_set(path)
    return {
        int(m["layer"]): load_sae(Path(path) / m["path"], device=device).eval() for m in manifest["members"]
    }


# -- `sae run` on a recipe with layers ---------------------------------------------------------------------
def set_pipeline(recipe: Any, store: str, out: Path, uri: str, experiment: str, clock: Any) -> Any:
    """The rest of `sae run` for a set recipe: train the set (Tune trials), then evaluate it spliced whole."""
    from workflows.links import runs_view_url
    from workflows.pipeline import PipelineResult
    from workflows.set_eval import evaluate_set_folder

    spec = SetSpec(
        activations=store,  # an absolute path or a URI (pipeline.store_of)
        layers=parse_layers(recipe.layers),
        out=str(out / "set"),
        arch=recipe.arch,
        sae=dict(recipe.sae),
        train=dict(recipe.train),
        cpus_per_trial=recipe.cpus_per_worker,
        experiment=experiment,
        mlflow_uri=uri,
        run_name=recipe.name,
    )
    manifest = clock.stage("train", train_set, spec)
    metrics = clock.stage(
        "evaluate", evaluate_set_folder, spec.out, n_tokens=recipe.eval_tokens, mlflow_uri=uri
    )
    return PipelineResult(
        out=out,
        sae_dir=Path(spec.out),
        dashboard=None,
        metrics=metrics,
        timings=clock.timings,
        mlflow_run_id=manifest["mlflow_parent_run_id"],
        mlflow_uri=uri,
        runs_url=runs_view_url(uri, experiment),
    )
