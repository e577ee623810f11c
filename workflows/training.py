"""Single-process training from an activation store: the job description and its runner.

The Ray Train path (workflows/train_ray.py) runs the same job data-parallel.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import sae_core
from sae_core.io import save_sae
from sae_core.store import ActivationStore, StoreError
from sae_core.trainer import TrainConfig, Trainer, evaluate
from workflows.errors import UserError
from workflows.tracking import MlflowTracker, NullTracker

logger = logging.getLogger(__name__)

# Architectures trained on (input hook, output hook) pairs, and those reading several hooks at once.
PAIR_ARCHS = ("transcoder", "skip_transcoder")
MULTI_SOURCE_ARCHS = ("crosscoder",)

# Short CLI names for the sparsity knobs, mapped to the config field each architecture calls them.
SPARSITY_ALIASES = {"l1": ("l1_coefficient",), "l0": ("l0_coefficient",), "kl": ("kl_coefficient",)}


@dataclass(kw_only=True)
class TrainJob:
    """Everything a training run needs; goes whole into MLflow params and checkpoints."""

    activations: str = ""
    """Activation store directory (or empty, with ``stream`` set)."""
    hook: str
    """Hook column to train on (a transcoder's input, a crosscoder's first source)."""
    out_hook: str = ""
    """Transcoders: the hook column to reconstruct (e.g. blocks.L.hook_mlp_out for hook blocks.L.hook_mlp_in)."""
    sources: list[str] = field(default_factory=list)
    """Crosscoders: every hook the dictionary reads and writes, ``hook`` first; empty otherwise."""
    arch: str = "topk"
    """Registered architecture name."""
    sae: dict[str, Any] = field(default_factory=dict)
    """Architecture config fields (d_sae, k, ...); d_in comes from the store."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings."""
    out: str = "runs/sae"
    """Output folder: the SAELens folder, metrics.json, job.json."""
    eval_fraction: float = 0.05
    """Fraction of the store's rows (its end) held out for evaluation."""
    stream: dict[str, Any] | None = None
    """Train on the live model stream instead of a store: CollectConfig fields (model, corpus, n_tokens, ...)."""

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if bool(self.activations) == bool(self.stream):
            raise UserError("give exactly one data source: an activation store (--activations) or a live model "
                            "stream (--from-model/--corpus/--tokens)")
        if not 0 < self.eval_fraction < 1:
            raise UserError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        self._check_hooks()

    def _check_hooks(self) -> None:
        pairs = self.arch in PAIR_ARCHS
        if pairs and not self.out_hook:
            raise UserError(f"architecture {self.arch!r} maps one hook to another: name its target with --out-hook "
                            "(e.g. --hook blocks.3.hook_mlp_in --out-hook blocks.3.hook_mlp_out)")
        if self.out_hook and not pairs:
            raise UserError(f"--out-hook is for transcoders ({', '.join(PAIR_ARCHS)}), not {self.arch!r}; drop it "
                            "or choose --arch transcoder")
        if len(self.sources) > 1 and self.arch not in MULTI_SOURCE_ARCHS:
            raise UserError(f"several --hook values need a multi-source architecture ({', '.join(MULTI_SOURCE_ARCHS)}), "
                            f"not {self.arch!r}; give --hook once")
        if self.sources and self.sources[0] != self.hook:
            raise UserError(f"sources {self.sources} must start with hook {self.hook!r}")
        if len(set(self.sources)) != len(self.sources):
            raise UserError(f"--hook names a source twice: {self.sources}")

    def columns(self) -> list[str]:
        """Every store column the job reads: its sources (or hook), then the transcoder target."""
        return [*(self.sources or [self.hook]), *([self.out_hook] if self.out_hook else [])]

    def example(self, columns: dict[str, torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """What the trainer takes, from a dict of equal-length per-hook tensors: x [N, D]; a crosscoder's
        [N, S, D] stack of its sources; a transcoder's (input, target) pair."""
        x = torch.stack([columns[h] for h in self.sources], dim=1) if self.sources else columns[self.hook]
        return (x, columns[self.out_hook]) if self.out_hook else x

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"] = self.train.to_dict()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainJob:
        return cls(**raw)


def sae_config_for(job: TrainJob, d_in: int, d_out: int | None = None) -> sae_core.SAEConfig:
    """The architecture config of ``job`` for inputs of width ``d_in`` (and a transcoder's targets of
    width ``d_out``; a crosscoder gets ``n_sources`` from the job's sources)."""
    derived = {"d_in": d_in, "d_out": d_out if job.out_hook else None,
               "n_sources": len(job.sources) if job.sources else None}
    derived = {name: value for name, value in derived.items() if value is not None}
    sources = {"d_in": f"store hook {job.hook!r} has d", "d_out": f"store hook {job.out_hook!r} has d",
               "n_sources": "the --hook values give n_sources"}
    for name, actual in derived.items():
        given = job.sae.get(name)
        if given is not None and given != actual:
            raise UserError(f"{sources[name]}={actual}, but the SAE was asked for {name}={given}; drop that setting")
    return sae_core.make_config(job.arch, **{**job.sae, **derived})


def store_widths(store: ActivationStore, job: TrainJob) -> tuple[int, int | None]:
    """(d_in, d_out) of the job's hooks in ``store``; a crosscoder's sources must share one width."""
    return hook_widths({h: store.d(h) for h in job.columns()}, job)


def hook_widths(widths: dict[str, int], job: TrainJob) -> tuple[int, int | None]:
    sources = job.sources or [job.hook]
    if len({widths[h] for h in sources}) > 1:
        raise UserError(f"crosscoder sources must have one width, got {({h: widths[h] for h in sources})}; "
                        "choose hooks of the same kind (e.g. residual streams of several layers)")
    return widths[sources[0]], (widths[job.out_hook] if job.out_hook else None)


def read_examples(store: ActivationStore, job: TrainJob, start: int, stop: int):
    """Rows [start, stop) of the job's columns, as the trainer takes them (see TrainJob.example)."""
    return job.example({h: store.read_hook(h, start, stop) for h in job.columns()})


def store_batches(store: ActivationStore, job: TrainJob, stop: int):
    """The job's seeded, looping training batches from rows [0, stop) of ``store``."""
    for columns in store.iter_batches(job.columns(), job.train.batch_size, seed=job.train.seed, stop=stop):
        yield job.example(columns)


def resolve_sparsity_args(arch: str, values: dict[str, Any]) -> dict[str, Any]:
    """Map CLI knobs (k, l1, l0, ...) onto the architecture's config fields; unknown knobs are errors."""
    config_fields = {f.name for f in dataclasses.fields(sae_core.get(arch).config_cls)}
    resolved: dict[str, Any] = {}
    for knob, value in values.items():
        if value is None:
            continue
        candidates = SPARSITY_ALIASES.get(knob, (knob,))
        match = next((name for name in candidates if name in config_fields), None)
        if match is None:
            raise UserError(f"architecture {arch!r} has no {knob!r} setting (its fields: {sorted(config_fields)})")
        resolved[match] = value
    return resolved


def split_rows(store: ActivationStore, job: TrainJob) -> tuple[int, int]:
    """(train_rows, total_rows): the last eval_fraction of rows are held out."""
    total = store.n_tokens
    n_eval = max(int(total * job.eval_fraction), 1)
    if total - n_eval < job.train.batch_size:
        raise UserError(
            f"store {job.activations} has {total} rows: too few for a batch of {job.train.batch_size} plus "
            f"{n_eval} held-out rows; collect more tokens or lower --batch-size"
        )
    return total - n_eval, total


def open_checked_store(job: TrainJob) -> ActivationStore:
    try:
        store = ActivationStore(job.activations)
        for hook in job.columns():
            store.check_hook(hook)
    except StoreError as exc:
        raise UserError(str(exc)) from exc
    return store


def finish_run(job: TrainJob, trainer: Trainer, store: ActivationStore, metadata: dict[str, Any]) -> dict[str, Any]:
    """Evaluate on the store's held-out rows, write the SAELens folder, metrics.json and job.json."""
    train_rows, total = split_rows(store, job)
    return finish_with(job, trainer, read_examples(store, job, train_rows, total), metadata)


def finish_with(job: TrainJob, trainer: Trainer, held_out, metadata: dict[str, Any]) -> dict[str, Any]:
    """Evaluate on ``held_out`` examples (TrainJob.example), write the SAELens folder, metrics.json, job.json."""
    x, targets = held_out if isinstance(held_out, tuple) else (held_out, None)
    result = evaluate(trainer.sae, x, scaling_factor=trainer.scaling_factor, targets_NO=targets,
                      output_scaling_factor=trainer.output_scaling_factor)
    out = Path(job.out)
    save_sae(trainer.sae, out, scaling_factor=trainer.scaling_factor, metadata={**metadata, **hook_metadata(job)},
             output_scaling_factor=trainer.output_scaling_factor)
    (out / "metrics.json").write_text(json.dumps({**result, "steps": trainer.step_count}, indent=2))
    (out / "job.json").write_text(json.dumps(job.to_dict(), indent=2))
    return result


def hook_metadata(job: TrainJob) -> dict[str, Any]:
    """The cfg.json metadata naming the hooks: SAELens's hook_name (and hook_name_out for transcoders);
    a crosscoder's sources in order as hook_names."""
    meta: dict[str, Any] = {"hook_name": job.hook}
    if job.out_hook:
        meta["hook_name_out"] = job.out_hook
    if job.sources:
        meta["hook_names"] = list(job.sources)
    return meta


def store_metadata(store: ActivationStore, job: TrainJob) -> dict[str, Any]:
    manifest = store.manifest
    return {"model_name": manifest.model, "hook_name": job.hook, "context_size": manifest.context_size,
            "prepend_bos": manifest.bos_token_id is not None, "dataset_path": manifest.corpus,
            "exclude_special_tokens": bool(manifest.excluded)}


# What of the output folder goes to MLflow: the SAELens folder and its metrics, not Ray's checkpoints.
SAE_ARTIFACTS = ("cfg.json", "sae_weights.safetensors", "sae_ray.json", "sparsity.safetensors", "metrics.json",
                 "job.json")


def start_job_tracking(job: TrainJob, store: ActivationStore | None, *, uri: str | None, experiment: str,
                       run_name: str | None = None, parent_run_id: str | None = None,
                       extra_params: dict[str, Any] | None = None) -> MlflowTracker:
    """An MLflow run for ``job`` with its params and the model/hook/architecture tags."""
    model = store.manifest.model if store is not None else str((job.stream or {}).get("model", ""))
    tags = {"model": model, "hook": job.hook, "architecture": job.arch, **({"out_hook": job.out_hook} if job.out_hook else {}),
            **({"sources": ",".join(job.sources)} if job.sources else {})}
    tracker = MlflowTracker.create(uri, experiment, run_name or Path(job.out).name, tags, parent_run_id)
    tracker.log_params({"arch": job.arch, "sae": job.sae, "train": job.train.to_dict(), "hook": job.hook,
                        "out_hook": job.out_hook, "sources": job.sources, "activations": job.activations, "stream": job.stream or {}, **(extra_params or {})})
    return tracker


def log_final(tracker: NullTracker, job: TrainJob, metrics: dict[str, Any], step: int) -> None:
    """Held-out metrics as final/*, the SAE folder as the artifact ``sae/``, and the run closed."""
    tracker.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=step)
    for name in SAE_ARTIFACTS:
        if (Path(job.out) / name).is_file():
            tracker.log_artifact(Path(job.out) / name, "sae")
    tracker.end("FINISHED")


def train_local(job: TrainJob, on_metrics: Callable[[dict[str, float]], None] | None = None,
                tracker: NullTracker | None = None) -> dict[str, Any]:
    """Train in this process: read the store, train, evaluate on held-out rows, save."""
    tracker = tracker or NullTracker()
    store = open_checked_store(job)
    sae_cfg = sae_config_for(job, *store_widths(store, job))
    torch.manual_seed(job.train.seed)
    sae = sae_core.build(sae_cfg)
    trainer = Trainer(sae, job.train)
    train_rows, _ = split_rows(store, job)
    trainer.initialize(read_examples(store, job, 0, min(job.train.init_sample_tokens, train_rows)))
    for row in trainer.fit(store_batches(store, job, train_rows)):
        tracker.log_metrics(row, step=int(row["step"]))
        if on_metrics is not None:
            on_metrics(row)
    metrics = finish_run(job, trainer, store, store_metadata(store, job))
    log_final(tracker, job, metrics, trainer.step_count)
    return metrics
