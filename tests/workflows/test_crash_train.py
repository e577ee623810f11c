"""SIGKILL `sae train` at seeded points, in this process's CLI and on Ray Train, then check: what is
published loads and equals the uninterrupted run's SAE, or is absent; the dead run's lock does not block
the next run; resuming (the same command again in process, ``--resume`` on Ray Train) finishes with the
uninterrupted run's weights.

In process a kill point is an event counted inside the child: a training step, or a file-system call
(os.rename, replace, unlink, rmdir, mkdir, fsync, open) from the moment save_sae starts, so kills land
both mid-training and inside the publish sequence, whatever the machine's speed. On Ray Train the run is
killed as a lost machine would kill it: the driver and every process of its session (Ray's own with it),
once a seeded number of checkpoints is on disk; the resumed run is then killed inside its publish, and
the second resume finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from sae_core.io import CHECKPOINT_FILE, is_finished_sae, load_sae, save_checkpoint
from sae_core.lock import FileLock, lock_path
from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from workflows.train_ray import RAY_RUN_NAME, RAY_SNAPSHOT, latest_checkpoint

KILLPOINT = Path(__file__).parent.parent / "killpoint.py"

SEED, STEPS, EVERY = 18, 60, 5


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash-train") / "store"
    write_synthetic_store(
        root, SyntheticConfig(d=16, n_features=48, mean_active=3, noise=0.01), 6000, rows_per_file=2048
    )
    return root


def train_argv(store: Path, out: Path, db: Path) -> list[str]:
    return ["train", "--activations", str(store), "--hook", "synthetic", "--arch", "topk", "--d-sae", "48",
            "--k", "3", "--steps", str(STEPS), "--batch-size", "64", "--lr", "3e-3", "--out", str(out),
            "--mlflow-uri", f"sqlite:///{db}"]


def _session_of(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def run_session(kill_at: int, argv: list[str], kill_when=None, timeout: float = 400) -> tuple[int, str]:
    """Run the CLI in the child above, in a session of its own; SIGKILL the whole session (the driver and
    the Ray it started) once ``kill_when()`` holds, or what is left of it after the child killed itself."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    with (
        open(os.devnull, "w") as null,
        subprocess.Popen(
            [sys.executable, str(KILLPOINT), str(kill_at), "workflows.training", "--steps", "--", *argv],
            env=env,
            stdout=null,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc,
    ):
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not (kill_when is not None and kill_when()):
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.05)
        session = [p for p in psutil.process_iter() if _session_of(p) == proc.pid]
        for p in session:
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait()  # before wait_procs, which would reap the child and hide its exit status
        psutil.wait_procs([p for p in session if p.pid != proc.pid], timeout=30)
        stderr = proc.stderr.read()
    return proc.returncode, stderr


def events(stderr: str) -> int:
    return int(re.findall(r"events=(\d+)", stderr)[-1])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_sae(folder).state_dict()


def assert_published_or_absent(out: Path, reference: dict[str, torch.Tensor], exact: bool) -> bool:
    """A folder with cfg.json is a whole SAE equal to the reference; otherwise nothing claims to be one."""
    if not is_finished_sae(out):
        assert not (out / "cfg.json").exists()
        return False
    got = weights(out)
    for name, value in reference.items():
        if exact:
            assert torch.equal(got[name], value), name
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-3, atol=1e-4, msg=name)
    return True


def assert_clean(out: Path) -> None:
    """No lock of a dead writer blocks the next one (a stale lock may stay until someone takes it over), and
    no temp sibling of a dead writer is left beside the output."""
    with FileLock(out, purpose="the next run"):  # timeout 0: refused at once if a live holder were recorded
        pass
    assert not lock_path(out).exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    """One MLflow store for every run of the module (creating one costs seconds)."""
    return tmp_path_factory.mktemp("crash-train-mlflow") / "m.db"


@pytest.fixture(scope="module")
def reference(store, db, tmp_path_factory) -> tuple[dict[str, torch.Tensor], int]:
    """The uninterrupted in-process run: its weights, and how many events (steps + publish calls) it made."""
    root = tmp_path_factory.mktemp("crash-train-ref")
    code, stderr = run_session(0, train_argv(store, root / "sae", db))
    assert code == 0, stderr[-3000:]
    return weights(root / "sae"), events(stderr)


@pytest.mark.slow
def test_sigkill_of_training_in_process_then_the_same_command_finishes(store, reference, db, tmp_path):
    want, total = reference
    out = tmp_path / "sae"
    argv = train_argv(store, out, db)
    rng = random.Random(SEED)
    # A run killed mid-training, its rerun killed while publishing, that one's rerun too: what a user hits
    # when a flaky machine crashes again and again; then the same command once more.
    points = [rng.randint(2, STEPS), *sorted(rng.sample(range(STEPS + 1, total + 1), 2))]
    published = False
    for kill_at in [*points, 0]:
        code, stderr = run_session(kill_at, argv)
        if published:  # killed after the SAE was in place: it stays, and the command says so
            assert code == 2 and "already holds an SAE" in stderr and "Traceback" not in stderr, stderr[
                -2000:
            ]
        else:
            assert code == (-signal.SIGKILL if kill_at else 0), (kill_at, stderr[-3000:])
        published = assert_published_or_absent(out, want, exact=True)
    assert published
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS
    assert_clean(out)


def checkpoints_seen(out: Path, at_least: int):
    """A condition: at least ``at_least`` checkpoints have been on disk (Ray deletes all but the newest
    two once it has recorded them)."""
    seen: set[str] = set()

    def check() -> bool:
        seen.update(
            p.name for p in (out / "ray-train").glob("checkpoint_*") if (p / "checkpoint.pt").is_file()
        )
        return len(seen) >= at_least

    return check


@pytest.mark.slow
def test_sigkill_of_ray_train_driver_then_resume_finishes_with_the_same_weights(
    store, reference, db, tmp_path
):
    want, total = reference
    rng = random.Random(SEED)
    out = tmp_path / "run"
    argv = [*train_argv(store, out, db), "--workers", "1", "--checkpoint-every", str(EVERY)]
    # 1. The driver's session dies once some checkpoints are on disk (before Ray may have recorded them).
    after = rng.randint(2, STEPS // EVERY - 2)
    code, stderr = run_session(0, argv, kill_when=checkpoints_seen(out, after))
    assert code == -signal.SIGKILL, stderr[-3000:]
    assert not assert_published_or_absent(out, want, exact=False)
    # 2. --resume, killed inside its publish sequence (a seeded file-system call of save_sae).
    resume = ["train", "--resume", str(out), "--mlflow-uri", f"sqlite:///{db}"]
    code, stderr = run_session(rng.randint(1, total - STEPS), resume)
    assert code in (0, -signal.SIGKILL), stderr[-3000:]
    run_id = json.loads((out / "run.json").read_text())["mlflow_run_id"]
    resumed = MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, "resumed_from_step")
    assert resumed and all(0 < m.value < STEPS and m.value % EVERY == 0 for m in resumed), resumed
    published = assert_published_or_absent(out, want, exact=False)
    # 3. --resume again: finishes from the final checkpoint (without Ray), or says the SAE is already there.
    code, stderr = run_session(0, resume)
    if published:
        assert code == 2 and "already holds an SAE" in stderr and "Traceback" not in stderr, stderr[-2000:]
    else:
        assert code == 0, stderr[-3000:]
    assert assert_published_or_absent(out, want, exact=False)
    assert json.loads((out / "metrics.json").read_text())["steps"] == STEPS
    if not published:  # the resume that published closed the run's MLflow run
        assert MlflowClient(f"sqlite:///{db}").get_run(run_id).info.status == "FINISHED"
    assert_clean(out)


def test_resume_takes_the_newest_checkpoint_that_loads_when_ray_recorded_none(tmp_path):
    storage = tmp_path / "run" / RAY_RUN_NAME
    for name, step in [
        ("checkpoint_2026-01-01_00-00-01.000000", 5),
        ("checkpoint_2026-01-01_00-00-02.000000", 10),
    ]:
        save_checkpoint(storage / name, {"step": step})
    newest = storage / "checkpoint_2026-01-01_00-00-03.000000"
    save_checkpoint(newest, {"step": 15})
    whole = (newest / CHECKPOINT_FILE).read_bytes()
    (newest / CHECKPOINT_FILE).write_bytes(whole[: len(whole) // 2])  # cut short while being copied
    assert latest_checkpoint(tmp_path / "run") == str(storage / "checkpoint_2026-01-01_00-00-02.000000")
    (storage / RAY_SNAPSHOT).write_text("{}")  # Ray recorded checkpoints: it restores its own
    assert latest_checkpoint(tmp_path / "run") is None
    assert latest_checkpoint(tmp_path / "empty") is None
