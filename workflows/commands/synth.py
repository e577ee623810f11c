"""`sae synth`: write a synthetic activation store with a known ground-truth dictionary."""

from __future__ import annotations

import argparse

from sae_core.architectures.base import ConfigError
from sae_core.store import DTYPES
from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from workflows.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic activation store with known features")
    p.add_argument("--out", required=True, help="store directory or URI (s3://bucket/prefix, gs://...) to write")
    p.add_argument("--d", type=int, default=128, help="activation dimension")
    p.add_argument("--n-features", type=int, default=512, help="ground-truth features")
    p.add_argument("--mean-active", type=float, default=8.0, help="expected active features per token")
    p.add_argument("--correlation", type=float, default=0.0, help="firing correlation in [0, 1)")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std")
    p.add_argument("--tokens", type=int, default=200_000, help="rows to write")
    p.add_argument("--hook", default="synthetic", help="hook column name")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="storage dtype")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = SyntheticConfig(d=args.d, n_features=args.n_features, mean_active=args.mean_active,
                              correlation=args.correlation, noise=args.noise, seed=args.seed)
        out = write_synthetic_store(args.out, cfg, args.tokens, hook=args.hook, dtype=args.dtype)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    print(f"wrote {args.tokens} tokens of hook {args.hook!r} (d={args.d}) to {out}")
    return 0
