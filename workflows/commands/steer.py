"""`sae steer`: greedy generation with an SAE feature added (or clamped) at a hook, beside the unsteered one."""

from __future__ import annotations

import argparse

from sae_core.io import load_sae, read_cfg
from workflows.errors import UserError
from workflows.models import DEFAULT_MODEL, load_model
from workflows.steering import steer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help="generate with an SAE feature steered, next to the unsteered text")
    p.add_argument("sae_dir", metavar="SAE_DIR", help="SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--model", help="model spec (default: the SAE's model_name metadata, else the built-in SmolLM2)")
    p.add_argument("--hook", help="hook to steer at (default: the SAE's hook_name metadata)")
    p.add_argument("--feature", type=int, required=True, help="feature id")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scale", type=float, help="add SCALE times the unit decoder row at every position")
    how.add_argument("--clamp", type=float, metavar="VALUE", help="set the feature's activation to VALUE at every position")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate (greedy)")
    p.add_argument("--cache-dir", help="model cache folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    meta = read_cfg(args.sae_dir).get("metadata") or {}
    hook = args.hook or meta.get("hook_name")
    if not hook:
        raise UserError(f"{args.sae_dir}/cfg.json names no hook_name; pass --hook")
    loaded = load_model(args.model or meta.get("model_name") or DEFAULT_MODEL, cache_dir=args.cache_dir)
    sae = load_sae(args.sae_dir)
    result = steer(loaded, sae, hook, args.feature, args.scale or 0.0, args.prompt, args.max_new_tokens,
                   clamp=args.clamp)
    how = f"clamped to {args.clamp}" if args.clamp is not None else f"scale {args.scale:+g}"
    print(f"prompt:    {args.prompt!r}")
    print(f"unsteered: {result.baseline_text!r}")
    print(f"steered:   {result.steered_text!r}   (feature {args.feature} at {hook}, {how})")
    return 0
