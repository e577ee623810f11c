"""SIGKILL `sae import` in the middle of publishing its SAE folder, at seeded random points, then check:
what is published either loads and equals a complete result, or is absent; no lock left by the dead
process blocks the rerun; the rerun finishes with exactly the uninterrupted run's files.

The points are counted, not timed: the child counts its file-system calls (os.rename, os.replace,
os.unlink, os.rmdir, os.mkdir, os.fsync, os.open) from the moment save_sae starts, and kills itself
at call N (N drawn with a fixed seed from the calls an uninterrupted run makes), so every kill lands
inside the publish sequence, whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

import sae_core
from sae_core.io import is_finished_sae, load_sae, save_sae
from sae_core.lock import lock_path
from workflows import cli

KILLPOINT = Path(__file__).parent.parent / "killpoint.py"

SEED, KILLS = 18, 3


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_child(kill_at: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KILLPOINT), str(kill_at), "workflows.commands.import_sae", "--only",
                           "import_sae", "--", *argv], capture_output=True, text=True,
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
    calls = int(reference.stderr.strip().splitlines()[-1].removeprefix("events="))
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


def collect_argv(model: Path, corpus: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "workflows.cli", "collect", "--model", str(model), "--hook", "blocks.1.hook_resid_post",
            "--corpus", str(corpus), "--tokens", "3000", "--context-size", "16", "--batch-size", "8", "--out", str(out)]


def run_collect(argv: list[str], kill_after: float | None = None) -> int:
    """Run `sae collect` in its own session (its Ray processes with it); SIGKILL the whole session after
    ``kill_after`` seconds."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        proc.wait(timeout=kill_after if kill_after is not None else 300)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            raise
        # The run and every process it started (its session: Ray's workers sit in process groups of
        # their own), by pid, as a machine failure would take them.
        session = [p for p in psutil.process_iter() if _session(p) == proc.pid]
        for p in session:
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait()
        psutil.wait_procs(session, timeout=30)
    return proc.returncode


def _session(process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def store_rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from sae_core.store import ActivationStore

    store = ActivationStore(path)
    assert store.verify() == []
    return store.read_meta()["token_id"], store.read_hook("blocks.1.hook_resid_post").numpy()


@pytest.mark.slow
def test_sigkill_of_collect_leaves_a_store_that_verifies_and_a_rerun_finishes_it(tmp_path, tiny_llama_dir):
    import time

    from workflows.activations import complete_manifest

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: " + "the quick brown fox jumps over the lazy dog " * 12
                                  for i in range(40)))
    start = time.monotonic()
    assert run_collect(collect_argv(tiny_llama_dir, corpus, tmp_path / "reference")) == 0
    took = time.monotonic() - start
    want_ids, want_acts = store_rows(tmp_path / "reference")
    rng = random.Random(SEED)
    for fraction in [rng.uniform(0.5, 0.95)]:  # one point: each run starts its own Ray (tens of seconds)
        out = tmp_path / f"killed-{fraction:.2f}"
        code = run_collect(collect_argv(tiny_llama_dir, corpus, out), kill_after=fraction * took)
        if (out / "manifest.json").exists():
            store_rows(out) if complete_manifest(out) is not None else None  # what is listed verifies
        assert code in (0, -signal.SIGKILL)
        assert run_collect(collect_argv(tiny_llama_dir, corpus, out)) == 0, fraction  # resumes, no lock blocks
        ids, acts = store_rows(out)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(acts, want_acts, atol=1e-6, rtol=1e-5)
