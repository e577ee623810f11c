"""`sae import`: convert an SAE from SAELens, sparsify, Gemma Scope or OpenAI files into our SAELens folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from sae_core.interop import FORMATS, import_sae
from sae_core.io import save_sae
from workflows.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import an SAE (saelens, sparsify, gemmascope, openai) as a SAELens folder")
    p.add_argument("src", metavar="SRC", help="folder or file to import")
    p.add_argument("--format", choices=FORMATS, help="source format (detected from the file names when omitted)")
    p.add_argument("--out", required=True, help="output folder (SAELens format)")
    p.add_argument("--overwrite", action="store_true", help="replace an SAE already in --out")
    p.add_argument("--k", type=int, help="TopK k, for an OpenAI state dict saved without its activation")
    meta = p.add_argument_group("metadata written into cfg.json (overrides what the source says)")
    meta.add_argument("--model-name", help="model the SAE was trained on (a spec `sae eval` can load)")
    meta.add_argument("--hook-name", help="hook the SAE reads, e.g. blocks.6.hook_resid_post")
    meta.add_argument("--context-size", type=int, help="context size of the training windows")
    meta.add_argument("--dataset-path", help="training corpus")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if Path(args.out).resolve() == Path(args.src).resolve():
        raise UserError("--out must differ from SRC")
    imported = import_sae(args.src, args.format, k=args.k)
    overrides = {"model_name": args.model_name, "hook_name": args.hook_name, "context_size": args.context_size,
                 "dataset_path": args.dataset_path}
    metadata = {**imported.metadata, **{k: v for k, v in overrides.items() if v is not None},
                "imported_from": {"format": imported.format, "path": str(args.src)}}
    save_sae(imported.sae, args.out, metadata=metadata, overwrite=args.overwrite)
    cfg = imported.sae.cfg
    norm = getattr(imported.sae, "normalize_activations", "none")
    print(f"{args.out}: {imported.format} -> {imported.sae.saelens_architecture} SAE, d_in={cfg.d_in}, "
          f"d_sae={cfg.d_sae}, normalize_activations={norm}")
    return 0
