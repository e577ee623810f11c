"""`sae synth` and `sae train` end to end in subprocesses, including their error lines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sae_core.io import load_sae
from sae_core.store import Manifest, StoreWriter, make_table


def sae(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    result = sae("synth", "--out", str(path), "--d", "32", "--n-features", "64", "--mean-active", "3",
                 "--tokens", "6000")
    assert result.returncode == 0, result.stderr
    return path


def test_train_writes_saelens_folder_and_metrics(store, tmp_path):
    out = tmp_path / "sae"
    result = sae("train", "--activations", str(store), "--hook", "synthetic", "--arch", "topk", "--d-sae", "128",
                 "--k", "3", "--steps", "30", "--batch-size", "256", "--lr", "5e-3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"l0", "mse", "fvu", "dead_fraction"}
    assert 0 < metrics["l0"] <= 3 and 0 <= metrics["fvu"] < 1
    assert metrics["n_tokens"] == 300  # the held-out 5% of 6000 rows
    assert load_sae(out).cfg.k == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hook", "resid"], "hook 'resid' is not in store"),
        (["--arch", "nonesuch"], "unknown architecture 'nonesuch'"),
        (["--k", "999"], "k must be in [1, d_sae=128]"),
        (["--set", "d_in=16"], "has d=32, but the SAE was asked for d_in=16"),
        (["--arch", "topk", "--l1", "0.1"], "architecture 'topk' has no 'l1' setting"),
    ],
)
def test_bad_input_is_one_line_exit_2(store, tmp_path, args, message):
    base = {"--hook": "synthetic", "--arch": "topk"}
    argv = ["train", "--activations", str(store), "--d-sae", "128", "--steps", "5", "--out", str(tmp_path / "o")]
    for flag, value in base.items():
        if flag not in args:
            argv += [flag, value]
    result = sae(*argv, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_d_mismatch_and_nan_store(tmp_path):
    writer = StoreWriter(tmp_path / "nan", Manifest(model="m", hooks={"h": {"d": 2}}))
    meta = {k: np.zeros(600) for k in ("token_id", "window_id", "position", "doc_id")}
    values = np.ones((600, 2))
    values[5, 1] = np.inf
    writer.write_part(0, make_table(meta, {"h": values}, "float32"))
    result = sae("train", "--activations", str(tmp_path / "nan"), "--hook", "h", "--d-sae", "8", "--k", "2",
                 "--batch-size", "64", "--steps", "3", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "NaN/Inf" in result.stderr and "Traceback" not in result.stderr


def test_grid_trains_every_sae_on_one_pass_like_separate_runs(store, tmp_path):
    """--grid trains one SAE per combination on the same batches: each equals the SAE a separate run of its
    settings trains (in process and on Ray Train), in its own folder and MLflow run under one parent."""
    import torch
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'm.db'}"
    common = ["train", "--activations", str(store), "--hook", "synthetic", "--steps", "30", "--batch-size", "256",
              "--lr", "5e-3", "--mlflow-uri", db, "--experiment", "grid"]
    result = sae(*common, "--grid", "d_sae=64,128", "--grid", "k=2,3", "--out", str(tmp_path / "g"))
    assert result.returncode == 0, result.stderr
    members = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert members == ["topk-d_sae128-k2", "topk-d_sae128-k3", "topk-d_sae64-k2", "topk-d_sae64-k3"], members
    alone = sae(*common, "--d-sae", "128", "--k", "3", "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    grouped, separate = load_sae(tmp_path / "g" / "topk-d_sae128-k3"), load_sae(tmp_path / "alone")
    for name, value in separate.state_dict().items():
        torch.testing.assert_close(grouped.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("group") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and all(r.info.status == "FINISHED" and "final/fvu" in r.data.metrics for r in children)

    ray_group = sae(*common, "--grid", "k=2,3", "--d-sae", "128", "--workers", "1", "--out", str(tmp_path / "r"))
    assert ray_group.returncode == 0, ray_group.stderr[-2000:]
    on_ray = load_sae(tmp_path / "r" / "topk-k3")
    for name, value in separate.state_dict().items():
        torch.testing.assert_close(on_ray.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
