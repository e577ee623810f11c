"""`sae store verify DIR`: check a store's manifest, row counts, hashes and schema."""

from __future__ import annotations

import argparse

from sae_core.store import ActivationStore


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect activation stores")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="check manifest, row counts, sha256 and columns; exit 1 if bad")
    verify.add_argument("path", help="store directory or URI (s3://bucket/prefix, gs://...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = ActivationStore(args.path)
    problems = store.verify()
    for problem in problems:
        print(f"BAD {store.location.join(problem.path)}: {problem.problem}")
    if problems:
        print(f"{store.location.display}: {len(problems)} problem(s)")
        return 1
    m = store.manifest
    print(f"OK {store.location.display}: {len(m.files)} file(s), {store.n_tokens} tokens, hooks {store.hooks}, dtype {m.dtype}")
    return 0
