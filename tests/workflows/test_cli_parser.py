"""The `sae` entry point loads every subcommand module; one broken import would break every command."""

from __future__ import annotations

import subprocess
import sys

from workflows.cli import build_parser

EXPECTED = {"collect", "dashboard", "eval", "frontier", "hooks", "import", "run", "steer", "store", "sweep", "synth",
            "train", "ui"}


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert EXPECTED <= set(sub.choices), sorted(EXPECTED - set(sub.choices))


def test_console_entry_point_help_runs():
    result = subprocess.run([sys.executable, "-m", "workflows.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout
