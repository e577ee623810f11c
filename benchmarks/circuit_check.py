"""The causal check of attribution graphs on a transcoder set, over a few prompts (README, circuit tracing).

Per prompt: the replacement model's top token against the real model's, and the ablation check on the top
logit (the graph's predicted change against the change measured in the real model with every member spliced
and the clean prompt's error terms held; workflows/circuit_check.py says exactly what is measured). Prints a
markdown table; exits 1 when a prompt fails the check. The check means what it says for a set covering
every layer (`sae run --recipe smollm2-transcoders`); a partial set's rows are printed with their coverage.

    .venv/bin/python benchmarks/circuit_check.py --transcoders runs/tc30/set [--prompt "..." ...] [--ablate 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from workflows.circuit_check import as_dicts, check_prompts, markdown_table
from workflows.models import load_model
from workflows.replacement import DecoderRunner
from workflows.transcoder_set import load_set, read_set

PROMPTS = [
    "The capital of France is",
    "One, two, three, four,",
    "She opened the door and",
    "The cat sat on the",
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transcoders", required=True, metavar="SET", help="transcoder set folder")
    parser.add_argument("--prompt", action="append", help=f"a prompt (repeatable; default: {PROMPTS})")
    parser.add_argument("--ablate", type=int, default=5, metavar="K", help="features ablated per prompt")
    parser.add_argument(
        "--below-layer", type=int, metavar="L", help="ablate only features of layers below L (default: any)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    manifest = read_set(args.transcoders)
    loaded = load_model(manifest["model"])
    runner, members = DecoderRunner(loaded.model), load_set(args.transcoders)
    start = time.perf_counter()
    rows = check_prompts(
        runner, loaded.tokenizer, members, args.prompt or PROMPTS, k=args.ablate, below=args.below_layer
    )
    print(markdown_table(rows))
    print(f"{len(members)}/{runner.n_layers} layers covered; {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(as_dicts(rows), indent=1))
    return 0 if all(r.passes for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
