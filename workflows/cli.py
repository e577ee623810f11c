"""The `sae` command line. Subcommands live one per module in ``workflows/commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Iterable

from sae_core.architectures.base import ConfigError
from sae_core.io import SAEFormatError
from sae_core.lock import LockError
from sae_core.registry import RegistryError
from sae_core.store import StoreError
from workflows import commands
from workflows.errors import UserError

# Errors that are the user's input, not our bug: one line, exit 2, no traceback. FloatingPointError is
# what the trainer raises when the loss diverges (a learning rate or data problem, named in the message).
USER_ERRORS = (UserError, StoreError, RegistryError, ConfigError, FileNotFoundError, SAEFormatError, LockError,
               FloatingPointError)

# What to do about a library error, in this front-end's terms (the library names no flag or command).
ADVICE = {
    "not_a_store": "make one with `sae collect` or `sae synth`",
    "store_exists": "choose another --out or delete it",
    "missing_part": "run `sae store verify`",
    "too_few_rows": "collect more tokens or lower --batch-size",
    "foreign_normalization": "use `sae import` to convert it",
    "sae_exists": "pass --overwrite to replace it",
    "locked": "wait for that process to finish, or delete the lock file if it is gone",
}


def user_message(exc: BaseException) -> str:
    """The one line shown for a user error: its message, plus this front-end's advice for its reason."""
    advice = ADVICE.get(getattr(exc, "reason", None) or "")
    message = " ".join(str(exc).split())  # a message quoting a file or another library may span lines
    return f"{message}; {advice}" if advice else message


def build_parser(modules: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand module, or only ``modules`` (names in workflows/commands): a caller
    that runs one subcommand then imports only what that one needs."""
    parser = argparse.ArgumentParser(prog="sae", description="Train and study sparse autoencoders on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__)) if modules is None else modules
    for name in names:
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None, modules: Iterable[str] | None = None) -> int:
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except USER_ERRORS as exc:
        print(f"sae {args.command}: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sae {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
