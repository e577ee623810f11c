"""`sae dashboard`: a static HTML site of SAE features (top contexts, histograms, logit effects)."""

from __future__ import annotations

import argparse

from workflows.corpus import DEFAULT_CORPUS
from workflows.dashboard import DashboardConfig, build_dashboard, parse_features
from workflows.options import add_context_size_flag, add_model_workers_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="build a static HTML dashboard of SAE features")
    p.add_argument("sae_dir", metavar="SAE_DIR", help="SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--model", help="model spec (default: the SAE's model_name metadata, else the built-in SmolLM2)")
    p.add_argument("--hook", help="hook the SAE reads (default: the SAE's hook_name metadata)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"text to scan (default {DEFAULT_CORPUS})")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column with the text")
    p.add_argument("--tokens", type=int, required=True, help="tokens to scan")
    p.add_argument("--out", required=True, help="output folder; open OUT/index.html in a browser")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--features", help="feature ids, e.g. 0-99 or 3,17,200-210 (default 0-99)")
    which.add_argument("--top-density", type=int, metavar="N", help="the N most often firing features")
    add_model_workers_flag(p)
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    add_context_size_flag(p, default=None)
    p.add_argument("--top-k", type=int, default=20, help="top-activating examples per feature")
    p.add_argument("--cache-dir", help="model cache folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DashboardConfig(
        sae=args.sae_dir, model=args.model, hook=args.hook, corpus=args.corpus, text_field=args.text_field,
        n_tokens=args.tokens, out=args.out, features=parse_features(args.features) if args.features else None,
        top_density=args.top_density, workers=args.workers, batch_size=args.batch_size,
        context_size=args.context_size, top_k=args.top_k, cache_dir=args.cache_dir)
    result = build_dashboard(cfg)
    print(f"{result.out}/index.html: {len(result.features)} features over {result.n_tokens} tokens "
          f"in {result.seconds:.1f} s")
    return 0
