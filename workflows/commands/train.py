"""`sae train`: train an SAE on an activation store."""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from sae_core.architectures.base import ConfigError
from sae_core.trainer import TrainConfig
from workflows.errors import UserError
from workflows.training import (
    TrainJob,
    open_checked_store,
    resolve_sparsity_args,
    sae_config_for,
    train_local,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an SAE on an activation store")
    p.add_argument("--activations", required=True, help="activation store directory")
    p.add_argument("--hook", required=True, help="hook column to train on")
    p.add_argument("--arch", default="topk", help="architecture (see README's table)")
    p.add_argument("--d-sae", type=int, required=True, help="number of latents")
    p.add_argument("--k", type=int, help="active latents per token (TopK family)")
    p.add_argument("--l1", type=float, help="L1 coefficient (relu, gated)")
    p.add_argument("--l0", type=float, help="L0 coefficient (jumprelu)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other architecture or training field, JSON-parsed (repeatable)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (SAELens format + metrics.json)")
    p.set_defaults(func=run)


def parse_sets(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def job_from_args(args: argparse.Namespace) -> TrainJob:
    train_fields = {f for f in TrainConfig.__dataclass_fields__}
    sets = parse_sets(args.set)
    train_sets = {k: v for k, v in sets.items() if k in train_fields}
    sae_sets = {k: v for k, v in sets.items() if k not in train_fields}
    try:
        sae = {"d_sae": args.d_sae, **resolve_sparsity_args(args.arch, {"k": args.k, "l1": args.l1, "l0": args.l0}),
               **sae_sets}
        train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, **train_sets)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    return TrainJob(activations=args.activations, hook=args.hook, arch=args.arch, sae=sae, train=train, out=args.out)


def run(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    store = open_checked_store(job)
    sae_config_for(job, store.d(job.hook))  # refuse a bad config before the progress bar starts
    with tqdm(total=job.train.steps, desc="train", unit="step") as bar:
        def show(row: dict[str, float]) -> None:
            bar.update(row["step"] - bar.n)
            bar.set_postfix(loss=f"{row['loss']:.4f}", l0=f"{row['l0']:.1f}", fvu=f"{row['fvu']:.3f}")

        result = train_local(job, on_metrics=show)
    print(json.dumps(result, indent=2))
    print(f"saved SAE to {job.out}")
    return 0
