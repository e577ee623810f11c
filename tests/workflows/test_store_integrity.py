"""One writer per store, and training only on a finished store whose parts are what its manifest says.

A real second process holds a store open for writing: a writer in this process is refused with one
line naming it; once it is SIGKILLed its lock is taken over and the rerun finishes the store exactly as
an uninterrupted run writes it. Training refuses an unfinished store, a part of another size than the
manifest records, and (with --verify) a part whose bytes changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_core.lock import lock_path
from sae_core.store import ActivationStore, read_manifest, write_manifest
from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from workflows.cli import main

SYNTH = ["--d", "8", "--n-features", "24", "--mean-active", "3", "--tokens", "3000"]
CFG = SyntheticConfig(d=8, n_features=24, mean_active=3)
ROWS_PER_FILE = 1000

# A writer that stops after its first part, holding the store, until its stdin closes.
HOLDER = r"""
import sys
import sae_core.synthetic as synthetic
from sae_core.synthetic import SyntheticConfig
tables, make_table = [], synthetic.make_table

def make_table_then_wait(*args, **kwargs):
    if len(tables) == 1:
        print("holding", flush=True)
        sys.stdin.readline()
    tables.append(1)
    return make_table(*args, **kwargs)

synthetic.make_table = make_table_then_wait
synthetic.write_synthetic_store(sys.argv[1], SyntheticConfig(d=8, n_features=24, mean_active=3), 3000,
                                rows_per_file=int(sys.argv[2]))
"""


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def train_args(store: Path | str, out: Path, *extra: str) -> list[str]:
    return ["train", "--activations", str(store), "--hook", "synthetic", "--d-sae", "16", "--k", "2",
            "--steps", "5", "--batch-size", "64", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return write_synthetic_store(
        tmp_path_factory.mktemp("integrity") / "ref", CFG, 3000, rows_per_file=ROWS_PER_FILE
    )


def test_a_second_writer_is_refused_and_a_killed_writers_store_is_finished_by_the_rerun(
    reference, tmp_path, capsys
):
    store = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store), str(ROWS_PER_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        # Another writer (this process) is refused: one line naming the store, the holder and the lock file.
        assert main(["synth", "--out", str(store), *SYNTH]) == 2
        err = one_line(capsys)
        assert f"is being written by pid {holder.pid}" in err and str(lock_path(store)) in err
        # Training on it now is refused too: the store is not finished.
        assert main(train_args(store, tmp_path / "sae")) == 2
        err = one_line(capsys)
        assert "is incomplete" in err and "sae collect" in err
        assert not (tmp_path / "sae").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    assert read_manifest(store).extra["complete"] is False and len(read_manifest(store).files) == 1
    assert lock_path(store).exists()  # the dead writer's lock stays ...
    write_synthetic_store(store, CFG, 3000, rows_per_file=ROWS_PER_FILE)  # ... and is taken over: the rerun
    assert not lock_path(store).exists()
    finished, want = ActivationStore(store), ActivationStore(reference)
    assert finished.verify() == [] and finished.complete
    torch.testing.assert_close(finished.read_hook("synthetic"), want.read_hook("synthetic"), rtol=0, atol=0)


def test_training_refuses_an_unfinished_store_a_part_of_the_wrong_size_and_with_verify_a_changed_byte(
    reference, tmp_path, capsys
):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(reference, tmp_path / name))

    unfinished = copy("unfinished")
    manifest = read_manifest(unfinished)
    manifest.extra["complete"] = False
    write_manifest(unfinished, manifest)
    assert main(train_args(unfinished, tmp_path / "a")) == 2
    assert "is incomplete" in one_line(capsys)

    longer = copy("longer")
    with open(longer / "part-00001.parquet", "ab") as fh:
        fh.write(b"\0")
    size = (longer / "part-00001.parquet").stat().st_size
    assert main(train_args(longer, tmp_path / "b")) == 2
    err = one_line(capsys)
    assert (
        f"part-00001.parquet is {size} bytes, the manifest says {size - 1}" in err
        and "sae store verify" in err
    )

    changed = copy("changed")
    part = changed / "part-00002.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    ActivationStore(changed).check_ready()  # the size is right: only the sha256 tells
    assert main(train_args(changed, tmp_path / "c", "--verify")) == 2
    assert "part-00002.parquet: sha256" in one_line(capsys)
    for out in "abc":
        assert not (tmp_path / out).exists()
    assert json.loads((reference / "manifest.json").read_text())["files"][0]["bytes"] > 0
