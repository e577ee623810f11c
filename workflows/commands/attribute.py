"""`sae attribute`: the attribution graph of a prompt through a transcoder set (JSON + a static HTML viewer)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sae_core.publish import atomic_write_bytes
from workflows.circuit import ablation_check, attribute, replacement_agreement
from workflows.errors import UserError
from workflows.graph_html import write_viewer
from workflows.models import load_model
from workflows.replacement import DecoderRunner
from workflows.transcoder_set import load_set, read_set


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attribute", help="attribution graph of a prompt through a transcoder set (JSON + HTML)"
    )
    p.add_argument(
        "--transcoders", required=True, metavar="SET", help="transcoder set folder (`sae run` with layers)"
    )
    p.add_argument("--prompt", required=True, help="the text whose next token the graph explains")
    p.add_argument(
        "--target-token", help="explain this next token (one token, e.g. ' Paris'); default: the top logits"
    )
    p.add_argument(
        "--top-logits", type=int, default=10, help="most likely next tokens kept as logit nodes (default 10)"
    )
    p.add_argument(
        "--node-fraction",
        type=float,
        default=0.8,
        help="keep the features carrying this fraction of the influence on the logits (default 0.8)",
    )
    p.add_argument(
        "--edge-fraction",
        type=float,
        default=0.98,
        help="then the edges carrying this fraction of the edge influence (default 0.98)",
    )
    p.add_argument(
        "--ablate",
        type=int,
        default=3,
        metavar="K",
        help="causal check: zero the K features with the largest direct effect on the first logit (0: skip)",
    )
    p.add_argument(
        "--out", default="graph.json", help="graph JSON (the viewer is written beside it as .html)"
    )
    p.add_argument("--model", help="model spec (default: the set's model)")
    p.add_argument("--cache-dir", help="model cache folder")
    p.set_defaults(func=run)


def member_dashboards(set_dir: Path, html_dir: Path) -> dict[int, str]:
    """layer -> dashboard folder (relative to the viewer) of members whose folder holds ``dashboard/index.html``."""
    out = {}
    for m in read_set(set_dir)["members"]:
        dash = set_dir / m["path"] / "dashboard"
        if (dash / "index.html").is_file():
            out[int(m["layer"])] = os.path.relpath(dash.resolve(), html_dir.resolve())
    return out


def run(args: argparse.Namespace) -> int:
    if args.top_logits < 1:
        raise UserError(f"--top-logits must be at least 1, got {args.top_logits}")
    set_dir, out = Path(args.transcoders), Path(args.out)
    manifest = read_set(set_dir)
    loaded = load_model(args.model or manifest["model"], cache_dir=args.cache_dir)
    runner, members = DecoderRunner(loaded.model), load_set(set_dir)
    html_path = out.with_suffix(".html")
    att = attribute(
        runner,
        loaded.tokenizer,
        members,
        args.prompt,
        target=args.target_token,
        top_logits=args.top_logits,
        node_fraction=args.node_fraction,
        edge_fraction=args.edge_fraction,
        dashboards=member_dashboards(set_dir, html_path.parent),
    )
    graph = {**att.graph, "model": manifest["model"], "transcoders": str(set_dir)}
    graph["checks"]["replacement"] = replacement_agreement(runner, members, att)
    if args.ablate > 0:
        graph["checks"]["ablation"] = vars(ablation_check(runner, members, att, k=args.ablate))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(graph, indent=1).encode())
    write_viewer(graph, html_path)
    checks = graph["checks"]
    print(
        f"{len(graph['nodes'])} nodes, {len(graph['links'])} edges (of {graph['counts']['features_active']} active "
        f"features); completeness max error {checks['completeness_max_abs_error']:.2e}"
    )
    print(f"replacement model's top token agrees with the model's: {checks['replacement']['agree']}")
    if "ablation" in checks:
        a = checks["ablation"]
        print(
            f"ablating {', '.join(a['features'])}: logit {a['token']!r} predicted {a['predicted_paths']:+.4f}, "
            f"measured {a['measured']:+.4f} (frozen attention and norms: {a['measured_frozen']:+.4f})"
        )
    print(f"wrote {out} and {html_path}")
    return 0
