"""The `sae` command line. Subcommands live one per module in ``workflows/commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from sae_core.architectures.base import ConfigError
from sae_core.io import SAEFormatError
from sae_core.registry import RegistryError
from sae_core.store import StoreError
from workflows import commands
from workflows.errors import UserError

# Errors that are the user's input, not our bug: one line, exit 2, no traceback.
USER_ERRORS = (UserError, StoreError, RegistryError, ConfigError, FileNotFoundError, SAEFormatError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae", description="Train and study sparse autoencoders on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except USER_ERRORS as exc:
        print(f"sae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sae {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
