"""SAE folders are published atomically and never destroyed unless asked; loaders refuse folders whose
files disagree before allocating what a config claims; one writer at a time through sae_core.lock."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import sae_core
from sae_core.interop import import_sae
from sae_core.io import (
    CFG_FILE,
    NATIVE_FILE,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    SAEFormatError,
    load_checkpoint,
    load_sae,
    save_checkpoint,
    save_sae,
)
from sae_core.lock import FileLock, LockError, _process_start, lock_path, read_holder

D, F = 8, 24


def sae(seed: int = 0) -> sae_core.SparseAutoencoder:
    torch.manual_seed(seed)
    return sae_core.build(sae_core.make_config("topk", d_in=D, d_sae=F, k=4))


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (hidden ones included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_first_save_is_one_rename_with_umask_modes(tmp_path):
    old = os.umask(0o027)
    try:
        out = save_sae(sae(), tmp_path / "s", extra_files={"metrics.json": b"{}"})
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temp sibling, no lock file left
    assert sorted(os.listdir(out)) == sorted([CFG_FILE, WEIGHTS_FILE, NATIVE_FILE, "metrics.json"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    for name in os.listdir(out):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    assert same_weights(load_sae(out), load_sae(out))


def test_checkpoints_are_readable_by_others_and_a_truncated_one_is_one_error(tmp_path):
    old = os.umask(0o022)
    try:
        file = save_checkpoint(tmp_path / "ck", {"step": 3, "w": torch.ones(4)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(file.stat().st_mode) == 0o644 and load_checkpoint(tmp_path / "ck")["step"] == 3
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(SAEFormatError, match="checkpoint.pt: unreadable checkpoint"):
        load_checkpoint(tmp_path / "ck")


def test_existing_sae_is_refused_unchanged_and_replaced_only_with_overwrite(tmp_path):
    out = save_sae(sae(0), tmp_path / "s")
    (out / SPARSITY_FILE).write_bytes(b"stale sparsity of SAE 0")
    (out / "job.json").write_text("{}")
    before = tree(tmp_path)
    with pytest.raises(SAEFormatError) as err:
        save_sae(sae(1), out)
    assert err.value.reason == "sae_exists" and str(out) in str(err.value)
    assert tree(tmp_path) == before
    save_sae(sae(1), out, overwrite=True, extra_files={"metrics.json": b"{}"})
    # The old SAE's derived files went with it; nothing else is left beside the new weights.
    assert sorted(os.listdir(out)) == sorted([CFG_FILE, WEIGHTS_FILE, NATIVE_FILE, "metrics.json"])
    assert sorted(os.listdir(tmp_path)) == ["s"]
    reloaded = load_sae(out)
    assert not torch.equal(reloaded.W_dec, load_sae_of(sae(0), tmp_path / "ref0").W_dec)


def load_sae_of(module, path):
    return load_sae(save_sae(module, path))


@pytest.mark.parametrize("overwrite", [False, True])
def test_callers_entries_survive_and_stale_files_go(tmp_path, overwrite):
    out = tmp_path / "run"
    (out / "ray-train" / "checkpoint_000001").mkdir(parents=True)
    (out / "ray-train" / "checkpoint_000001" / "checkpoint.pt").write_bytes(b"ckpt")
    (out / "run.json").write_text('{"mlflow_run_id": "abc"}')
    if overwrite:
        save_sae(sae(0), tmp_path / "other")
        for name in (CFG_FILE, WEIGHTS_FILE, NATIVE_FILE):
            (out / name).write_bytes((tmp_path / "other" / name).read_bytes())
    else:  # leftovers of a crashed earlier attempt: weights without cfg.json, an old sparsity file
        (out / WEIGHTS_FILE).write_bytes(b"half")
    (out / SPARSITY_FILE).write_bytes(b"stale")
    callers = {k: v for k, v in tree(out).items() if k.startswith("ray-train") or k == "run.json"}
    save_sae(sae(2), out, overwrite=overwrite, extra_files={"job.json": b"{}"})
    after = tree(out)
    assert {k: after[k] for k in callers} == callers
    assert SPARSITY_FILE not in after and "job.json" in after
    assert same_weights(load_sae(out), load_sae_of(sae(2), tmp_path / "ref"))
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_a_folder_without_sae_files_keeps_the_users_files_but_never_a_sparsity(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')
    (out / "notes.txt").write_text("keep")
    (out / SPARSITY_FILE).write_bytes(b"some other SAE's sparsity")
    save_sae(sae(), out)
    assert (out / "metrics.json").read_text() == '{"mine": 1}' and (out / "notes.txt").read_text() == "keep"
    assert not (out / SPARSITY_FILE).exists()
    load_sae(out)


def test_leftovers_of_a_crashed_save_are_cleaned_and_unfinished_folder_needs_no_overwrite(tmp_path):
    out = tmp_path / "s"
    (tmp_path / ".s.tmp-dead1").mkdir()
    (tmp_path / ".s.tmp-dead1" / WEIGHTS_FILE).write_bytes(b"partial")
    out.mkdir()
    (out / NATIVE_FILE).write_text("{}")  # no cfg.json: not a finished SAE
    save_sae(sae(), out)
    assert sorted(os.listdir(tmp_path)) == ["s"]
    load_sae(out)


def test_a_symlinked_folder_is_published_at_its_target(tmp_path):
    real = save_sae(sae(0), tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    save_sae(sae(1), tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and same_weights(load_sae(real), load_sae_of(sae(1), tmp_path / "r1"))
    assert sorted(os.listdir(tmp_path)) == ["link", "r1", "real"]


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("keep")
    with pytest.raises(SAEFormatError, match="not a folder"):
        save_sae(sae(), tmp_path / "f")
    assert (tmp_path / "f").read_text() == "keep"


# -- loaders refuse disagreeing files, before allocating ------------------------------------------
def edit_json(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("where", ["cfg", "native"])
def test_huge_claimed_sizes_fail_fast_without_allocating(tmp_path, where):
    out = save_sae(sae(), tmp_path / "s")
    if where == "cfg":  # a foreign folder: only cfg.json describes it
        (out / NATIVE_FILE).unlink()
        edit_json(out / CFG_FILE, d_in=10**6, d_sae=10**6)
    else:
        raw = json.loads((out / NATIVE_FILE).read_text())
        raw["config"].update(d_in=10**6, d_sae=10**6)
        (out / NATIVE_FILE).write_text(json.dumps(raw))
        edit_json(out / CFG_FILE, d_in=10**6, d_sae=10**6)
    start = time.perf_counter()
    with pytest.raises(SAEFormatError, match=r"sae_weights.safetensors: tensor '\w+' has shape"):
        load_sae(out)
    assert time.perf_counter() - start < 2.0


def test_cfg_and_native_disagreeing_is_refused(tmp_path):
    out = save_sae(sae(), tmp_path / "s")
    edit_json(out / CFG_FILE, d_sae=F * 2)
    with pytest.raises(SAEFormatError, match="cfg.json says d_sae=48, sae_ray.json says 24"):
        load_sae(out)


def forged_header(path: Path, shape: list[int]) -> None:
    """A safetensors file whose header claims ``shape`` for W_enc while holding only a few bytes."""
    header = json.dumps({"W_enc": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4 * shape[0] * shape[1]]}})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 16)


def test_forged_or_truncated_weights_and_cfg_are_one_clear_error(tmp_path):
    out = save_sae(sae(), tmp_path / "s")
    forged_header(out / WEIGHTS_FILE, [10**6, 10**6])
    with pytest.raises(SAEFormatError, match="does not fit the file"):
        load_sae(out)
    good = save_sae(sae(), tmp_path / "t")
    data = (good / WEIGHTS_FILE).read_bytes()
    (good / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors"):
        load_sae(good)
    third = save_sae(sae(), tmp_path / "u")
    (third / CFG_FILE).write_text((third / CFG_FILE).read_text()[:40])
    with pytest.raises(SAEFormatError, match="cfg.json: not valid JSON"):
        load_sae(third)


def test_npz_with_a_forged_shape_is_refused_before_numpy_allocates(tmp_path):
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    member.write(b"\0" * 16)
    path = tmp_path / "params.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("W_enc.npy", member.getvalue())
    with pytest.raises(SAEFormatError, match="claims shape"):
        import_sae(path, "gemmascope")


# -- the lock -------------------------------------------------------------------------------------
def write_lock(target: Path, pid: int, start: str | None, host: str | None = None) -> None:
    lock_path(target).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "start": start,
                                             "purpose": "testing"}))


def test_live_holder_is_named_and_blocks_save(tmp_path):
    holder = subprocess.Popen(["sleep", "30"])
    try:
        write_lock(tmp_path / "s", holder.pid, _process_start(holder.pid))
        with pytest.raises(LockError) as err:
            save_sae(sae(), tmp_path / "s")
        assert f"pid {holder.pid} on {socket.gethostname()} (testing)" in str(err.value)
        assert err.value.reason == "locked" and not (tmp_path / "s").exists()
        start = time.monotonic()
        with pytest.raises(LockError):
            FileLock(tmp_path / "s", timeout=0.5).acquire()
        assert time.monotonic() - start >= 0.5
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_reentrant_in_its_process_and_lock_false_is_the_callers_promise(tmp_path):
    with FileLock(tmp_path / "s", purpose="training") as outer:
        save_sae(sae(), tmp_path / "s")  # the job holds its output's lock and saves inside
        assert read_holder(outer.path).purpose == "training"  # still the outer holder's lock
    assert not lock_path(tmp_path / "s").exists()
    holder = subprocess.Popen(["sleep", "30"])  # another process of the job (the driver) holds it
    try:
        write_lock(tmp_path / "t", holder.pid, _process_start(holder.pid))
        save_sae(sae(), tmp_path / "t", lock=False)
        assert lock_path(tmp_path / "t").exists()  # the driver's lock is left alone
    finally:
        holder.kill()
        holder.wait()


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path / "a", dead.pid, None)
    debris = tmp_path / f".a.lock.{dead.pid}.x1.tmp"  # killed between writing its lock and linking it
    debris.write_text("{}")
    in_flight = tmp_path / f".a.lock.{os.getppid()}.x2.tmp"  # a live process's attempt
    in_flight.write_text("{}")
    save_sae(sae(), tmp_path / "a")  # the holder is gone
    assert not debris.exists() and in_flight.exists()
    write_lock(tmp_path / "b", os.getppid(), "1")  # a live pid that started at another time: reused
    save_sae(sae(), tmp_path / "b")
    lock_path(tmp_path / "c").write_text("")  # a writer that died between create and write ...
    with pytest.raises(LockError, match="not written yet"):  # ... or is writing right now
        FileLock(tmp_path / "c").acquire()
    old = time.time() - 60
    os.utime(lock_path(tmp_path / "c"), (old, old))
    with FileLock(tmp_path / "c", purpose="p") as lock:
        assert read_holder(lock.path).pid == os.getpid()
    assert not lock_path(tmp_path / "c").exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path / "s", 1, None, host="some-other-host")
    with pytest.raises(LockError, match="some-other-host"):
        FileLock(tmp_path / "s").acquire()
