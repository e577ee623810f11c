"""SIGKILL `sae import` in the middle of publishing its SAE folder, at seeded random points, then check:
what is published either loads and equals a complete result, or is absent; no lock left by the dead
process blocks the rerun; the rerun finishes with exactly the uninterrupted run's files.

The points are counted, not timed: the child counts its file-system calls (os.rename, os.replace,
os.unlink, os.rmdir, os.mkdir, os.fsync, os.open) from the moment save_sae starts, and kills itself
at call N (N drawn with a fixed seed from the calls an uninterrupted run makes), so every kill lands
inside the publish sequence, whatever the machine's speed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sae_core
from sae_core.io import is_finished_sae, load_sae, save_sae
from sae_core.lock import lock_path
from workflows import cli

CHILD = r"""
import os, signal, sys
kill_at, count, counting = int(sys.argv[1]), 0, False

def counted(orig):
    def call(*args, **kwargs):
        global count
        if counting:
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return orig(*args, **kwargs)
    return call

for name in ("rename", "replace", "unlink", "rmdir", "mkdir", "fsync", "open"):
    setattr(os, name, counted(getattr(os, name)))

import workflows.commands.import_sae as command
save = command.save_sae

def save_counting(*args, **kwargs):
    global counting
    counting = True
    try:
        return save(*args, **kwargs)
    finally:
        counting = False
        print(f"calls={count}", file=sys.stderr)

command.save_sae = save_counting
import argparse
from workflows import cli

def parser():  # only this subcommand: the others import Ray, MLflow and transformers (seconds per run)
    p = argparse.ArgumentParser(prog="sae")
    p.add_argument("-v", "--verbose", action="store_true")
    command.register(p.add_subparsers(dest="command", required=True))
    return p

cli.build_parser = parser
sys.exit(cli.main(sys.argv[2:]))
"""

SEED, KILLS = 18, 3


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_child(kill_at: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(kill_at), *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def sae(seed: int) -> sae_core.SparseAutoencoder:
    torch.manual_seed(seed)
    return sae_core.build(sae_core.make_config("topk", d_in=16, d_sae=64, k=4))


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_sigkill_while_publishing_leaves_old_new_or_nothing_and_a_rerun_finishes(tmp_path, overwrite):
    src = save_sae(sae(1), tmp_path / "src")
    out = tmp_path / "out"
    argv = ["import", str(src), "--out", str(out), *(["--overwrite"] if overwrite else [])]
    # The uninterrupted result, and how many file-system calls publishing it takes.
    reference = run_child(0, [*argv[:3], str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr
    calls = int(reference.stderr.strip().splitlines()[-1].removeprefix("calls="))
    expected = tree(tmp_path / "reference")
    old = tree(save_sae(sae(2), tmp_path / "old")) if overwrite else None
    rng = random.Random(SEED)
    for kill_at in sorted(rng.sample(range(1, calls + 1), min(KILLS, calls))):
        shutil.rmtree(out, ignore_errors=True)
        if overwrite:  # an SAE of other weights is in --out: the old one or the new one, never a mix
            save_sae(sae(2), out)
        killed = run_child(kill_at, argv)
        assert killed.returncode == -9, (kill_at, killed.stderr[-2000:])
        published = is_finished_sae(out)
        if published:
            load_sae(out)  # loads: its files agree
            assert tree(out) in ([expected] + ([old] if old else [])), kill_at
        if published and not overwrite and tree(out) == expected:
            # Killed after the rename: the SAE is there, and a rerun refuses to replace it.
            assert cli.main(argv) == 2, kill_at
        else:
            assert cli.main(argv) == 0, kill_at  # the dead writer's lock does not block the rerun
        assert tree(out) == expected, kill_at
        assert not lock_path(out).exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [], kill_at
