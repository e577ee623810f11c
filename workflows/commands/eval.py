"""`sae eval`: evaluate an SAE (ours or any import format) spliced into its model on held-out text."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tqdm import tqdm

from sae_core.interop import FORMATS
from workflows.corpus import DEFAULT_CORPUS
from workflows.errors import UserError
from workflows.evaluate import (
    EVAL_FILE,
    evaluate_per_site,
    evaluate_sae,
    held_out_windows,
    load_any_sae,
    training_tokens,
    write_outputs,
)
from workflows.models import DEFAULT_MODEL, load_model
from workflows.options import DEFAULT_CONTEXT_SIZE, add_context_size_flag, add_mlflow_uri_flag
from workflows.set_eval import evaluate_set_folder
from workflows.tracking import MlflowTracker, resolve_tracking_uri
from workflows.transcoder_set import is_set


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate an SAE against its model: L0, FVU, CE loss recovered, KL, density")
    p.add_argument("sae_dir", metavar="SAE_DIR", help="SAE folder or file (SAELens, sparsify, Gemma Scope, OpenAI), or a transcoder set folder")
    p.add_argument("--format", choices=FORMATS, help="import format of SAE_DIR (detected when omitted)")
    p.add_argument("--model", help=f"model spec (default: the SAE's metadata model_name, else {DEFAULT_MODEL})")
    p.add_argument("--hook", help="hook the SAE reads (default: the SAE's metadata hook_name)")
    p.add_argument("--out-hook", help="transcoders: the hook their output replaces (default: the metadata's "
                                      "hook_name_out); crosscoders read their sources from hook_names")
    p.add_argument("--corpus", help=f"corpus spec (default: the SAE's dataset_path, else {DEFAULT_CORPUS})")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet column with the text")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens to evaluate on (default 8192)")
    add_context_size_flag(p, default=None)
    p.add_argument("--skip-tokens", type=int,
                   help="corpus tokens to skip first (default: those our training run used, when known)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--out", help="output folder (default: SAE_DIR for our own folders; required otherwise)")
    p.add_argument("--cache-dir", help="model cache folder")
    track = p.add_argument_group("tracking")
    track.add_argument("--mlflow-run-id", help="log the metrics (eval/*) and outputs to this existing MLflow run")
    add_mlflow_uri_flag(track)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {args.tokens}")
    if is_set(args.sae_dir):  # a transcoder set: every member spliced at once
        values = evaluate_set_folder(args.sae_dir, n_tokens=args.tokens, model=args.model, corpus=args.corpus,
                                     skip_tokens=args.skip_tokens, batch_size=args.batch_size,
                                     mlflow_uri=args.mlflow_uri, out=args.out)
        print(json.dumps(values))
        return 0
    sae, meta, ours = load_any_sae(args.sae_dir, args.format)
    if not ours and not args.out:
        raise UserError(f"{args.sae_dir} is not one of our SAE folders: choose an output folder with --out")
    out = Path(args.out or args.sae_dir)
    hook = args.hook or meta.get("hook_name")
    if not hook:
        raise UserError("the SAE's metadata names no hook: pass --hook")
    model_spec = args.model or meta.get("model_name") or DEFAULT_MODEL
    corpus = args.corpus or (meta.get("dataset_path") if ours else None) or DEFAULT_CORPUS
    context_size = args.context_size or meta.get("context_size") or DEFAULT_CONTEXT_SIZE
    skip = args.skip_tokens if args.skip_tokens is not None else (training_tokens(args.sae_dir, corpus) if ours else 0)
    loaded = load_model(model_spec, cache_dir=args.cache_dir)
    windows = held_out_windows(loaded.tokenizer, corpus=corpus, context_size=context_size, n_tokens=args.tokens,
                               skip_tokens=skip, text_field=args.text_field)
    out_hook = args.out_hook or meta.get("hook_name_out")
    info = {"sae": str(args.sae_dir), "model": model_spec, "hook": hook, "corpus": corpus,
            "context_size": context_size, "skip_tokens": skip, **({"out_hook": out_hook} if out_hook else {})}
    if not sae.wiring.splices:  # it rewrites several sites at once: measured per site
        return run_per_site(args, sae, meta, loaded, windows, out, info)
    with tqdm(total=int(windows.keep.sum()), unit="tok", unit_scale=True, desc="eval") as bar:
        result = evaluate_sae(sae, loaded.model, hook, windows, batch_size=args.batch_size, progress=bar.update,
                              out_hook=out_hook)
    # SAELens reads sparsity.safetensors from the SAE folder; a foreign source is not ours to write into.
    paths = write_outputs(result, out, sparsity_dir=args.sae_dir if ours else out, info=info)
    if args.mlflow_run_id:
        _log_mlflow(args, result.metrics(), paths)
    _print_summary(result.metrics(), paths["eval"])
    return 0


def run_per_site(args: argparse.Namespace, sae, meta: dict, loaded, windows, out: Path, info: dict) -> int:
    """Per-site FVU of a STACKED wiring (no CE: it rewrites several sites at once); eval.json only."""
    hooks = meta.get("hook_names") or []
    if len(hooks) != sae.cfg.n_sources:
        raise UserError(f"the SAE reads {sae.cfg.n_sources} sites but its metadata names hooks {hooks}; "
                        "it needs cfg.json metadata.hook_names listing them in order")
    with tqdm(total=int(windows.keep.sum()), unit="tok", unit_scale=True, desc="eval") as bar:
        values = evaluate_per_site(sae, loaded.model, hooks, windows, batch_size=args.batch_size, progress=bar.update)
    out.mkdir(parents=True, exist_ok=True)
    path = out / EVAL_FILE
    path.write_text(json.dumps({**values, **info, "hooks": hooks}, indent=2))
    if args.mlflow_run_id:
        _log_mlflow(args, values, {"eval": path})
    print(json.dumps({k: values[k] for k in ("l0", "fvu", *(f"fvu/{h}" for h in hooks), "dead_fraction")}))
    print(f"wrote {path}")
    return 0


def _log_mlflow(args: argparse.Namespace, values: dict[str, float], paths: dict[str, Path]) -> None:
    tracker = MlflowTracker(resolve_tracking_uri(args.mlflow_uri), args.mlflow_run_id)
    try:
        tracker.client.get_run(args.mlflow_run_id)
    except Exception as exc:  # MlflowException for an unknown id
        raise UserError(f"MLflow run {args.mlflow_run_id!r} not found at {tracker.uri}: {exc}") from exc
    tracker.log_metrics({f"eval/{k}": v for k, v in values.items() if not math.isnan(v)}, step=0)
    for path in paths.values():
        tracker.log_artifact(path, "eval")


def _print_summary(values: dict[str, float], path: Path) -> None:
    keys = ("l0", "fvu", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero", "ce_loss_recovered", "kl_div",
            "dead_fraction", "n_ce_tokens")
    print(json.dumps({k: values[k] for k in keys}, indent=None))
    print(f"wrote {path}")
