"""`sae train`: train an SAE on an activation store or on the live model, in process or data-parallel on
Ray Train, with the reconstruction or the end-to-end loss. Flags for config fields are generated from
the configs (help = the field's docstring, default = the field's default)."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

from tqdm import tqdm

import sae_core
from sae_core.architectures.base import Wiring
from sae_core.config import ConfigError
from sae_core.fs import is_uri
from sae_core.trainer import TrainConfig
from workflows.errors import UserError
from workflows.job import LOSSES, TrainJob
from workflows.models import DEFAULT_MODEL
from workflows.options import (
    add_context_size_flag,
    add_field_flags,
    add_sae_knob_flags,
    add_tracking_flags,
    field_values,
    knob_values,
    parse_grid,
    resolve_knobs,
)
from workflows.recipes import parse_overrides
from workflows.sources import default_stream, ready_store
from workflows.tracking import MlflowTracker
from workflows.train_ray import JOB_FILE, DistributedOptions, train_distributed
from workflows.training import Run, start_job_tracking, train_local

TRAIN_FLAGS = ("steps", "batch_size", "lr", "seed")
"""TrainConfig fields with a flag of their own (every other one through --set)."""
RAY_FLAGS = ("use_gpu", "cpus_per_worker", "checkpoint_every", "max_failures", "data")
"""DistributedOptions fields with a flag of their own (--workers is declared apart: omitting it trains here)."""
JOB_SETTABLE = ("kl_coefficient", "downstream_hooks", "eval_tokens", "eval_fraction")
"""TrainJob fields --set reaches (an architecture field of the same name wins)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an SAE on an activation store or the live model")
    p.add_argument("--activations", help="activation store: a folder or an object-storage URI (s3://, gs://, ...)")
    live = p.add_argument_group("training on the live model, without a store (runs on Ray Train)")
    live.add_argument("--from-model", nargs="?", const=DEFAULT_MODEL, metavar="M",
                      help="run this model and train on its activations (or, with --loss e2e, through it) "
                           "(default model if no M)")
    live.add_argument("--corpus", help="text for --from-model (default: the embedded corpus)")
    live.add_argument("--tokens", type=int, help="tokens of text for --from-model (e2e default: steps x batch size)")
    add_context_size_flag(live, note=" for --from-model")
    p.add_argument("--hook", action="append", metavar="HOOK",
                   help="model site to train on (a transcoder's input; repeat for a crosscoder's sources)")
    p.add_argument("--out-hook", metavar="HOOK", help="transcoders: the site to reconstruct, e.g. "
                                                      "blocks.3.hook_mlp_out for --hook blocks.3.hook_mlp_in")
    add_sae_knob_flags(p)
    p.add_argument("--grid", action="append", default=[], metavar="KNOB=V1,V2,...",
                   help="train one SAE per combination (d_sae, k, l1, l0, target_l0, any architecture field, lr) "
                        "on the same batches: one read of the store or one model pass for all; each into "
                        "OUT/<name> with its own MLflow run under one parent")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other architecture, training or job field, JSON-parsed (repeatable)")
    add_field_flags(p, TrainConfig, TRAIN_FLAGS)
    p.add_argument("--out", help="output folder (SAELens format + metrics.json)")
    e2e = p.add_argument_group("end-to-end training through the model (--loss e2e, on Ray Train)")
    add_field_flags(e2e, TrainJob, {"loss": "loss", "downstream_coefficient": "downstream_coef"},
                    choices={"loss": list(LOSSES)})
    ray_group = p.add_argument_group("data-parallel training on Ray Train (used when --workers or --resume is given)")
    ray_group.add_argument("--workers", type=int, help="DDP workers; omit to train in this process without Ray")
    add_field_flags(ray_group, DistributedOptions, RAY_FLAGS, choices={"data": ["direct", "ray"]})
    ray_group.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run to its final step")
    p.add_argument("--overwrite", action="store_true", help="replace a finished SAE already in --out")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every store part before training "
                                                         "(part sizes are always checked)")
    add_tracking_flags(p)
    p.set_defaults(func=run)


def split_sets(args: argparse.Namespace) -> tuple[dict, dict, dict, dict]:
    """--set values -> (architecture, training, job, stream) fields."""
    arch_fields = set(sae_core.get(args.arch).fields)
    sets = parse_overrides(args.set)
    stream = {k: sets.pop(k) for k in list(sets) if k == "text_field"}
    job = {k: sets.pop(k) for k in list(sets) if k in JOB_SETTABLE and k not in arch_fields}
    train = {k: sets.pop(k) for k in list(sets) if k in TrainConfig.__dataclass_fields__ and k not in arch_fields}
    return sets, train, job, stream


def data_source(args: argparse.Namespace, stream_sets: dict) -> tuple[str, dict | None]:
    """(store, stream) of the job: the store given, or the model run over text (always, for --loss e2e)."""
    store = args.activations if args.activations is None or is_uri(args.activations) else os.path.abspath(args.activations)
    if args.from_model is None and args.loss != "e2e":
        if store is None:
            raise UserError("missing --activations (required unless --from-model or --resume is given)")
        return store, None
    if store and args.loss != "e2e":
        raise UserError("give either --activations or --from-model, not both")
    tokens = args.tokens or (args.steps * args.batch_size if args.loss == "e2e" else None)
    if tokens is None:
        raise UserError("missing --tokens (required with --from-model unless --resume is given)")
    stream = default_stream(args.from_model or DEFAULT_MODEL, tokens, args.context_size, args.corpus, **stream_sets)
    return store or "", stream  # a store beside an e2e stream is refused by the job, with the reason


def job_from_args(args: argparse.Namespace) -> TrainJob:
    d_sae = args.knob_d_sae if args.knob_d_sae is not None or not args.grid else "grid"
    missing = [flag for flag, value in (("--hook", args.hook), ("--d-sae", d_sae), ("--out", args.out)) if value is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (required unless --resume is given)")
    if args.downstream_coefficient and args.loss != "e2e":
        raise UserError("--downstream-coef is a term of the e2e loss: add --loss e2e or drop it")
    sae_sets, train_sets, job_sets, stream_sets = split_sets(args)
    try:
        sae = {**resolve_knobs(args.arch, knob_values(args)), **sae_sets}
        train = TrainConfig(**field_values(args, TRAIN_FLAGS), **train_sets)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    activations, stream = data_source(args, stream_sets)
    hooks = list(args.hook)
    stacked = sae_core.get(args.arch).wiring is Wiring.STACKED
    return TrainJob(activations=activations, stream=stream, hook=hooks[0], out_hook=args.out_hook or "",
                    sources=hooks if stacked or len(hooks) > 1 else [], arch=args.arch, sae=sae, train=train,
                    out=os.path.abspath(args.out), loss=args.loss, downstream_coefficient=args.downstream_coefficient,
                    **job_sets)


def resumed_job(args: argparse.Namespace) -> TrainJob:
    job_file = os.path.join(args.resume, JOB_FILE)
    if not os.path.isfile(job_file):
        raise UserError(f"--resume {args.resume}: no {JOB_FILE} there; is this a `sae train --workers` output folder?")
    with open(job_file) as fh:
        saved = TrainJob.from_dict(json.load(fh))
    if args.activations is None and args.from_model is None and args.hook is None:  # only --resume: as it was
        return saved
    args.out = args.out or args.resume
    if args.loss == TrainJob.loss and saved.loss != args.loss:
        args.loss = saved.loss  # --loss need not be repeated
    return job_from_args(args)  # given settings are compared with the saved ones by train_distributed


def run(args: argparse.Namespace) -> int:
    if args.grid:
        return run_group(args)
    job = resumed_job(args) if args.resume else job_from_args(args)
    if args.verify and job.activations:
        ready_store(job.activations, verify=True)
    if args.workers is None and not args.resume and job.activations and job.loss == "mse":
        return run_local(job, args)
    opts = DistributedOptions(workers=1 if args.workers is None else args.workers, mlflow_uri=args.mlflow_uri,
                              experiment=args.experiment, **field_values(args, RAY_FLAGS))
    result = train_distributed(job, opts, resume=bool(args.resume), overwrite=args.overwrite)
    print(json.dumps(result, indent=2))
    print(f"saved SAE to {job.out}")
    return 0


def run_local(job: TrainJob, args: argparse.Namespace) -> int:
    run = Run(job, overwrite=args.overwrite)  # refuses a bad config before the progress bar starts
    tracker = start_job_tracking(run, uri=args.mlflow_uri, experiment=args.experiment)
    with tqdm(total=job.train.steps, desc="train", unit="step") as bar:
        def show(row: dict[str, float]) -> None:
            bar.update(row["step"] - bar.n)
            bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", fvu=f"{row['fvu']:.3f}")

        result = train_local(run, on_metrics=show, tracker=tracker)
    print(json.dumps(result, indent=2))
    print(f"saved SAE to {job.out}")
    return 0


# -- several SAEs on one pass over the data (--grid) ------------------------------------------------------
def group_jobs(base: TrainJob, grid: dict[str, list]) -> list[TrainJob]:
    """One job per grid combination, each in its own folder under ``base.out``."""
    from workflows.sweep import map_knobs, run_name_for
    from workflows.training import SHARED_TRAIN

    jobs = []
    for values in itertools.product(*grid.values()):
        knobs = dict(zip(grid, values, strict=True))
        sae_knobs, train_knobs = map_knobs(base.arch, knobs)
        varied = sorted(set(train_knobs) & set(SHARED_TRAIN))
        if varied:
            raise UserError(f"--grid over {varied} changes the data each SAE sees; SAEs trained on one pass share "
                            "it (run `sae sweep` to vary it)")
        try:
            train = TrainConfig.from_dict({**base.train.to_dict(), **train_knobs})
        except ConfigError as exc:
            raise UserError(str(exc)) from exc
        name = run_name_for({"arch": base.arch, **knobs})
        jobs.append(dataclasses.replace(base, sae={**base.sae, **sae_knobs}, train=train,
                                        out=os.path.join(base.out, name)))
    return jobs


def run_group(args: argparse.Namespace) -> int:
    from workflows.train_ray import train_group_distributed
    from workflows.training import Member, build_trainer, train_group_local

    if args.resume:
        raise UserError("--resume continues one SAE's run; a --grid group is trained again instead")
    from workflows.train_ray import check_run_dir

    base, grid = job_from_args(args), parse_grid(args.grid)
    if args.verify and base.activations:
        ready_store(base.activations, verify=True)
    jobs = group_jobs(base, grid)
    for job in jobs:
        check_run_dir(job, resume=False)
    first = Run(jobs[0], data=args.data, overwrite=args.overwrite)  # refuses bad input before anything starts
    runs = [first, *(Run(job, data=args.data, source=first.source, overwrite=args.overwrite) for job in jobs[1:])]
    parent = MlflowTracker.create(args.mlflow_uri, args.experiment, os.path.basename(base.out),
                                  {"group": "true", "hook": base.hook, "architecture": base.arch})
    parent.log_params({"grid": {k: ",".join(map(str, v)) for k, v in grid.items()},
                       "members": len(runs)})
    trackers = [start_job_tracking(run, uri=args.mlflow_uri, experiment=args.experiment, run_name=os.path.basename(
        run.job.out), parent_run_id=parent.run_id) for run in runs]
    try:
        if args.workers is None and base.activations and base.loss == "mse":
            members = [Member(run, build_trainer(run.job, run.widths), tracker) for run, tracker in zip(runs, trackers, strict=True)]
            results = train_group_local(members)
        else:
            opts = DistributedOptions(workers=args.workers or 1, mlflow_uri=args.mlflow_uri,
                                      experiment=args.experiment, **field_values(args, RAY_FLAGS))
            results = train_group_distributed(runs, opts, trackers=trackers)
    except BaseException as exc:
        parent.fail(exc)
        raise
    parent.end("FINISHED")
    for job, result in zip(jobs, results, strict=True):
        print(f"{job.out}: " + json.dumps({k: result[k] for k in ("l0", "fvu") if k in result}))
    return 0
