"""`sae collect`: run a model over a corpus on Ray Data and write an activation store."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from sae_core.store import DTYPES
from workflows.activations import CollectConfig, collect
from workflows.corpus import DEFAULT_CORPUS
from workflows.models import DEFAULT_MODEL
from workflows.options import add_context_size_flag, add_model_workers_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="collect model activations into a store (resumable)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--hook", action="append", required=True, help="hook name, repeatable (see `sae hooks`)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help=f".txt/.jsonl/.parquet file, folder or glob, hf:NAME[:CONFIG][:SPLIT] (default {DEFAULT_CORPUS})")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column with the text")
    p.add_argument("--tokens", type=int, required=True, help="tokens to store (whole windows, at least this many)")
    add_context_size_flag(p)
    p.add_argument("--out", required=True,
                   help="store directory or URI (s3://bucket/prefix, gs://...); an unfinished one is resumed")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="storage dtype (bfloat16: raw bits in uint16 lists, see README)")
    p.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32", help="dtype the model runs in")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    add_model_workers_flag(p)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per actor")
    p.add_argument("--cache-dir", help="model cache folder (default $SAE_RAY_CACHE/models or ~/.cache/sae-ray/models)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = CollectConfig(model=args.model, hooks=args.hook, corpus=args.corpus, text_field=args.text_field,
                        n_tokens=args.tokens, context_size=args.context_size, out=args.out, dtype=args.dtype,
                        model_dtype=args.model_dtype, batch_size=args.batch_size, workers=args.workers,
                        device=args.device, cache_dir=args.cache_dir)
    bars: list[tqdm] = []  # opened at the first progress call, so input errors come out as one clean line

    def progress(rows: int) -> None:
        if not bars:
            bars.append(tqdm(total=args.tokens, unit="tok", unit_scale=True, desc="collect"))
        bars[0].update(rows)

    try:
        result = collect(cfg, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(f"{result.path}: {result.n_tokens} tokens of {', '.join(args.hook)} "
          f"({result.parts_written} part(s) written, {result.parts_skipped} already done) in {result.seconds:.1f} s")
    return 0
