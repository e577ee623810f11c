"""`sae train`: train an SAE on an activation store, in process or data-parallel on Ray Train."""

from __future__ import annotations

import argparse
import json
import os

from tqdm import tqdm

from sae_core.architectures.base import ConfigError
from sae_core.fs import is_uri
from sae_core.trainer import TrainConfig
from workflows.corpus import DEFAULT_CORPUS
from workflows.e2e import E2EJob, saved_e2e_job, train_e2e
from workflows.errors import UserError
from workflows.models import DEFAULT_MODEL
from workflows.recipes import parse_overrides
from workflows.train_ray import JOB_FILE, DistributedOptions, train_distributed
from workflows.training import (
    MULTI_SOURCE_ARCHS,
    TrainJob,
    open_checked_store,
    resolve_sparsity_args,
    sae_config_for,
    start_job_tracking,
    store_widths,
    train_local,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an SAE on an activation store")
    p.add_argument("--activations", help="activation store directory or URI (s3://bucket/prefix, gs://...)")
    live = p.add_argument_group("training from the live model stream, without a store (runs on Ray Train)")
    live.add_argument("--from-model", nargs="?", const=DEFAULT_MODEL, metavar="M",
                      help="run this model and train on its activations as they stream (default model if no M)")
    live.add_argument("--corpus", help="text source for --from-model (default: the embedded corpus)")
    live.add_argument("--tokens", type=int, help="tokens to stream for --from-model")
    live.add_argument("--context-size", type=int, default=128, help="tokens per window for --from-model")
    p.add_argument("--hook", action="append", metavar="HOOK",
                   help="hook column to train on (a transcoder's input; repeat for a crosscoder's sources)")
    p.add_argument("--out-hook", metavar="HOOK",
                   help="transcoders: the hook column to reconstruct, e.g. blocks.3.hook_mlp_out for "
                        "--hook blocks.3.hook_mlp_in")
    p.add_argument("--arch", default="topk", help="architecture (see README's table)")
    p.add_argument("--d-sae", type=int, help="number of latents")
    p.add_argument("--k", type=int, help="active latents per token (TopK family)")
    p.add_argument("--l1", type=float, help="L1 coefficient (relu, gated)")
    p.add_argument("--l0", type=float, help="L0 coefficient (jumprelu)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other architecture or training field, JSON-parsed (repeatable)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (SAELens format + metrics.json)")
    e2e = p.add_argument_group("end-to-end training through the model (--loss e2e, on Ray Train)")
    e2e.add_argument("--loss", choices=["mse", "e2e"], default="mse",
                     help="mse: reconstruct the stored activations; e2e: KL between the model's next-token "
                          "distributions with and without the SAE spliced in (text from --from-model/--corpus)")
    e2e.add_argument("--downstream-coef", type=float,
                     help="with --loss e2e: weight of the MSE of the later blocks' residuals (default 0)")
    ray_group = p.add_argument_group("data-parallel training on Ray Train (used when --workers or --resume is given)")
    ray_group.add_argument("--workers", type=int, help="DDP workers; omit to train in this process without Ray")
    ray_group.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    ray_group.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    ray_group.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ray_group.add_argument("--max-failures", type=int, default=2, help="worker/node failures to recover from")
    ray_group.add_argument("--data", choices=["direct", "ray"], default="direct",
                           help="ranks read the store in one seeded order (direct) or take Ray Data shards (ray)")
    ray_group.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run to its final step")
    track = p.add_argument_group("tracking")
    track.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    track.add_argument("--experiment", default="sae-ray", help="MLflow experiment name")
    p.set_defaults(func=run)


def job_from_args(args: argparse.Namespace) -> TrainJob:
    source = ("--activations", args.activations) if args.from_model is None else ("--tokens", args.tokens)
    missing = [flag for flag, value in (source, ("--hook", args.hook), ("--d-sae", args.d_sae), ("--out", args.out))
               if value is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (required unless --resume is given)")
    if args.from_model is not None and args.activations:
        raise UserError("give either --activations or --from-model, not both")
    train_fields = set(TrainConfig.__dataclass_fields__)
    sets = parse_overrides(args.set)
    train_sets = {k: v for k, v in sets.items() if k in train_fields}
    sae_sets = {k: v for k, v in sets.items() if k not in train_fields}
    try:
        sae = {"d_sae": args.d_sae, **resolve_sparsity_args(args.arch, {"k": args.k, "l1": args.l1, "l0": args.l0}),
               **sae_sets}
        train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, **train_sets)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    stream = None
    if args.from_model is not None:
        stream = {"model": args.from_model, "corpus": args.corpus or DEFAULT_CORPUS, "n_tokens": args.tokens,
                  "context_size": args.context_size}
    hooks = list(args.hook)
    activations = args.activations or ""
    activations = activations if is_uri(activations) or not activations else os.path.abspath(activations)
    return TrainJob(activations=activations, hook=hooks[0],
                    out_hook=args.out_hook or "", sources=hooks if args.arch in MULTI_SOURCE_ARCHS or len(hooks) > 1 else [],
                    arch=args.arch, sae=sae, train=train, out=os.path.abspath(args.out), stream=stream)


def resumed_job(args: argparse.Namespace) -> TrainJob:
    job_file = os.path.join(args.resume, JOB_FILE)
    if not os.path.isfile(job_file):
        raise UserError(f"--resume {args.resume}: no {JOB_FILE} there; is this a `sae train --workers` output folder?")
    with open(job_file) as fh:
        saved = TrainJob.from_dict(json.load(fh))
    if args.activations is None and args.from_model is None:  # only --resume given: the saved job as it was
        return saved
    args.out = args.out or args.resume
    return job_from_args(args)  # given settings are compared with the saved ones by train_distributed


def run(args: argparse.Namespace) -> int:
    if args.loss == "e2e" or saved_e2e_job(args.resume) is not None:
        return run_e2e(args)
    if args.downstream_coef is not None:
        raise UserError("--downstream-coef is a term of the e2e loss: add --loss e2e or drop it")
    job = resumed_job(args) if args.resume else job_from_args(args)
    if args.workers is None and not args.resume and job.stream is None:
        return run_local(job, args)
    opts = DistributedOptions(workers=1 if args.workers is None else args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                              checkpoint_every=args.checkpoint_every,
                              max_failures=args.max_failures, data=args.data, mlflow_uri=args.mlflow_uri,
                              experiment=args.experiment)
    result = train_distributed(job, opts, resume=bool(args.resume))
    print(json.dumps(result, indent=2))
    print(f"saved SAE to {job.out}")
    return 0


def run_local(job: TrainJob, args: argparse.Namespace) -> int:
    store = open_checked_store(job)
    sae_config_for(job, *store_widths(store, job))  # refuse a bad config before the progress bar starts
    tracker = start_job_tracking(job, store, uri=args.mlflow_uri, experiment=args.experiment)
    with tqdm(total=job.train.steps, desc="train", unit="step") as bar:
        def show(row: dict[str, float]) -> None:
            bar.update(row["step"] - bar.n)
            bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", fvu=f"{row['fvu']:.3f}")

        result = train_local(job, on_metrics=show, tracker=tracker)
    print(json.dumps(result, indent=2))
    print(f"saved SAE to {job.out}")
    return 0


# -- end-to-end training (--loss e2e): workflows/e2e.py ---------------------------------------------
E2E_SETTABLE = ("kl_coefficient", "downstream_hooks", "eval_tokens", "text_field")
"""E2EJob fields --set reaches (an architecture field of the same name, e.g. kl_sparse's, wins)."""


def e2e_job_from_args(args: argparse.Namespace) -> E2EJob:
    if args.activations:
        raise UserError("--loss e2e trains through the model on text, not on stored activations: drop --activations "
                        "(choose the model with --from-model and the text with --corpus/--tokens)")
    hooks = args.hook if isinstance(args.hook, list) else [args.hook] if args.hook else []
    if len(hooks) > 1 or getattr(args, "out_hook", None):
        raise UserError("--loss e2e trains one SAE spliced at one hook: give --hook once, without --out-hook")
    missing = [flag for flag, value in (("--hook", hooks), ("--d-sae", args.d_sae), ("--out", args.out)) if not value]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (required with --loss e2e unless --resume is given)")
    import sae_core

    arch_fields = set(sae_core.get(args.arch).config_cls.__dataclass_fields__)
    sets = parse_overrides(args.set)
    job_sets = {k: sets.pop(k) for k in list(sets) if k in E2E_SETTABLE and k not in arch_fields}
    train_sets = {k: v for k, v in sets.items() if k in TrainConfig.__dataclass_fields__}
    try:
        sae = {"d_sae": args.d_sae, **resolve_sparsity_args(args.arch, {"k": args.k, "l1": args.l1, "l0": args.l0}),
               **{k: v for k, v in sets.items() if k not in train_sets}}
        train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, **train_sets)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    return E2EJob(hook=hooks[0], arch=args.arch, sae=sae, train=train, out=os.path.abspath(args.out),
                  model=args.from_model or DEFAULT_MODEL, corpus=args.corpus or DEFAULT_CORPUS,
                  n_tokens=args.tokens or args.steps * args.batch_size, context_size=args.context_size,
                  downstream_coefficient=args.downstream_coef or 0.0, **job_sets)


def run_e2e(args: argparse.Namespace) -> int:
    saved = saved_e2e_job(args.resume)
    if args.resume and saved is None:
        raise UserError(f"--resume {args.resume}: no job.json of an e2e run there; resume it without --loss e2e")
    if saved is not None and args.hook is None and args.d_sae is None:  # only --resume: the saved job as it was
        job = saved
    else:
        args.out = args.out or args.resume
        job = e2e_job_from_args(args)  # given settings are compared with the saved ones by train_e2e
    opts = DistributedOptions(workers=args.workers or 1, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                              checkpoint_every=args.checkpoint_every, max_failures=args.max_failures, data=args.data,
                              mlflow_uri=args.mlflow_uri, experiment=args.experiment)
    result = train_e2e(job, opts, resume=bool(args.resume))
    print(json.dumps(result, indent=2))
    print(f"saved SAE to {job.out}")
    return 0
