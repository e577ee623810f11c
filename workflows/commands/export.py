"""`sae export --format F SRC --out DIR`: write what we trained in another tool's layout."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from workflows.circuit_tracer_export import export_circuit_tracer

# Format name -> function(source folder, output folder) -> the main file written.
FORMATS: dict[str, Callable[[Path, Path], Path]] = {
    "circuit-tracer": export_circuit_tracer,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an SAE or transcoder set in another tool's layout")
    p.add_argument("src", metavar="SRC", help="what to export (circuit-tracer: a transcoder set folder)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="target layout")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    written = FORMATS[args.format](Path(args.src), Path(args.out))
    print(f"wrote {written}")
    return 0
