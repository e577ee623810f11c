"""`sae hooks`: list a model's hook points and their widths."""

from __future__ import annotations

import argparse

from workflows.hooks import d_model, list_hooks
from workflows.models import DEFAULT_MODEL, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hooks", help="list the hook names of a model")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--cache-dir", help="model cache folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    d = d_model(loaded.model)
    for name in list_hooks(loaded.model):
        print(f"{name}\t{d}")
    return 0
