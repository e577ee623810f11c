"""`sae export --format F SRC --out DIR`: write what we trained, or its statistics, in another tool's layout.

Each format is a row of ``FORMATS``: its help line, a function adding its own flags, and a function doing
the export from the parsed arguments and returning the main thing it wrote. Adding a format is adding a row.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


class Format(NamedTuple):
    help: str
    add_flags: Callable[[argparse._ArgumentGroup], None]
    run: Callable[[argparse.Namespace], Path]


def no_flags(group: argparse._ArgumentGroup) -> None:
    """A format with no flags of its own."""


def circuit_tracer(args: argparse.Namespace) -> Path:
    from workflows.circuit_tracer_export import export_circuit_tracer

    return export_circuit_tracer(Path(args.src), Path(args.out))


def neuronpedia_flags(group: argparse._ArgumentGroup) -> None:
    from workflows.options import add_context_size_flag, add_model_workers_flag

    group.add_argument("--tokens", type=int, default=50_000, help="tokens to scan for the statistics (default 50000)")
    group.add_argument("--corpus", help="text to scan (default: the built-in corpus)")
    group.add_argument("--features", help="feature ids, e.g. 0-99 or 3,17 (default 0-99)")
    group.add_argument("--top-density", type=int, metavar="N", help="the N most often firing features instead")
    group.add_argument("--model-id", help="Neuronpedia model id (default: the model spec's last path part)")
    group.add_argument("--source-set", default="sae-ray", help="Neuronpedia source set name (default sae-ray)")
    group.add_argument("--batch-features", type=int, default=128, help="features per batch file (default 128)")
    group.add_argument("--model", help="model spec (default: the SAE's model_name metadata)")
    group.add_argument("--hook", help="hook the SAE reads (default: the SAE's hook_name metadata)")
    group.add_argument("--cache-dir", help="model cache folder")
    add_model_workers_flag(group)
    add_context_size_flag(group, default=None)


def neuronpedia(args: argparse.Namespace) -> Path:
    from workflows.corpus import DEFAULT_CORPUS
    from workflows.dashboard import DashboardConfig, parse_features, resolve
    from workflows.errors import UserError
    from workflows.neuronpedia import NeuronpediaNames, export

    if args.features and args.top_density:
        raise UserError("give --features or --top-density, not both")
    if args.batch_features < 1:
        raise UserError(f"--batch-features must be at least 1, got {args.batch_features}")
    cfg = DashboardConfig(sae=args.src, n_tokens=args.tokens, out=args.out, model=args.model, hook=args.hook,
                          corpus=args.corpus or DEFAULT_CORPUS, context_size=args.context_size,
                          features=parse_features(args.features) if args.features else None,
                          top_density=args.top_density, workers=args.workers, cache_dir=args.cache_dir)
    model = resolve(cfg)[0].model
    model_id = args.model_id or Path(model.split(":")[-1]).name.lower()
    return export(cfg, NeuronpediaNames(model_id=model_id, source_set=args.source_set,
                                        batch_features=args.batch_features))


FORMATS: dict[str, Format] = {
    "circuit-tracer": Format("a transcoder set folder as circuit-tracer's per-layer transcoders", no_flags,
                             circuit_tracer),
    "neuronpedia": Format("an SAE's dashboard statistics as Neuronpedia's bulk-import batches (SAEDashboard's "
                          "layout)", neuronpedia_flags, neuronpedia),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an SAE or transcoder set, or its statistics, in another tool's layout")
    p.add_argument("src", metavar="SRC", help="what to export (circuit-tracer: a transcoder set folder; "
                                              "neuronpedia: an SAE folder)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS),
                   help="; ".join(f"{name}: {fmt.help}" for name, fmt in sorted(FORMATS.items())))
    p.add_argument("--out", required=True, help="output folder")
    for name, fmt in sorted(FORMATS.items()):
        if fmt.add_flags is not no_flags:
            fmt.add_flags(p.add_argument_group(f"--format {name}"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    written = FORMATS[args.format].run(args)
    print(f"wrote {written}")
    return 0
