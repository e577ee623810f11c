"""Ray Train on a real local Ray: DDP equivalence, MLflow records, resume after Ctrl-C, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from sae_core.io import load_sae
from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from sae_core.trainer import TrainConfig
from workflows.job import TrainJob
from workflows.train_ray import DistributedOptions, train_distributed
from workflows.training import train_local


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    write_synthetic_store(path, SyntheticConfig(d=32, n_features=96, mean_active=4, noise=0.01), 30_000)
    return path


def job(store, out, steps=50, **train) -> TrainJob:
    # dead_after_tokens is out of reach: AuxK normalises per rank, so it is not batch-split invariant.
    cfg = TrainConfig(steps=steps, batch_size=256, lr=3e-3, log_every=10, dead_after_tokens=10**9, **train)
    return TrainJob(activations=str(store), hook="synthetic", arch="topk", sae={"d_sae": 128, "k": 4}, train=cfg,
                    out=str(out))


def weights(folder) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in load_sae(folder).state_dict().items()}


def test_two_workers_match_one_worker_and_the_single_process_trainer(local_ray, store, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = train_distributed(job(store, tmp_path / "w1"), DistributedOptions(workers=1, mlflow_uri=uri, checkpoint_every=25))
    two = train_distributed(job(store, tmp_path / "w2"), DistributedOptions(workers=2, mlflow_uri=uri, checkpoint_every=25))
    train_local(job(store, tmp_path / "local"))
    assert one["steps"] == two["steps"] == 50
    w1, w2, wl = weights(tmp_path / "w1"), weights(tmp_path / "w2"), weights(tmp_path / "local")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=f"2 vs 1 worker: {name}")
        torch.testing.assert_close(wl[name], w1[name], rtol=1e-4, atol=1e-5, msg=f"local vs 1 worker: {name}")
    assert abs(one["fvu"] - two["fvu"]) < 1e-4

    # MLflow holds params, the metric history and the SAE artifact, for both runs.
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["sae-ray"])
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    client = MlflowClient(uri)
    run = client.get_run(two["mlflow_run_id"])
    assert run.data.params["arch"] == "topk" and run.data.params["sae.k"] == "4" and run.data.params["workers"] == "2"
    assert run.data.tags["architecture"] == "topk" and run.data.tags["hook"] == "synthetic"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [10, 20, 30, 40, 50]
    assert run.data.metrics["final/fvu"] == pytest.approx(two["fvu"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "sae")}
    assert {"sae/cfg.json", "sae/sae_weights.safetensors", "sae/metrics.json"} <= artifacts


def test_ray_data_shards_train(local_ray, store, tmp_path):
    result = train_distributed(job(store, tmp_path / "rd", steps=20),
                               DistributedOptions(workers=2, data="ray", cpus_per_worker=0.5, mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}"))
    assert result["steps"] == 20 and 0 < result["fvu"] < 1 and result["l0"] == pytest.approx(4, abs=0.5)


def cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{kw.pop('db')}"}
    return subprocess.Popen([sys.executable, "-m", "workflows.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_ctrl_c_finishes_at_the_same_step(store, tmp_path):
    out, db = tmp_path / "run", tmp_path / "m.db"
    args = ["--activations", str(store), "--hook", "synthetic", "--d-sae", "128", "--k", "4", "--steps", "400",
            "--batch-size", "256", "--lr", "3e-3", "--set", "dead_after_tokens=1000000000", "--out", str(out),
            "--workers", "1", "--checkpoint-every", "20"]
    proc = cli(*args, db=db)
    deadline = time.time() + 240
    while not [p for p in (out / "ray-train").glob("checkpoint_*") if p.is_dir()] and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, f"run ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert not (out / "metrics.json").exists(), "the interrupted run must not have finished"
    resumed = cli("--resume", str(out), db=db)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 400
    reference = job(store, tmp_path / "ref", steps=400)
    train_local(reference)
    for name, value in weights(tmp_path / "ref").items():
        torch.testing.assert_close(weights(out)[name], value, rtol=1e-3, atol=1e-4, msg=name)


def run_cli(*args, db) -> subprocess.CompletedProcess:
    proc = cli(*args, db=db)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize("extra, message", [
    (["--hook", "resid"], "hook 'resid' is not in store"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--workers", "8"], "8 worker(s) need 8 CPU(s) but the Ray cluster has"),
])
def test_bad_distributed_input_is_one_line_exit_2(store, tmp_path, extra, message):
    args = ["--activations", str(store), "--d-sae", "64", "--k", "4", "--steps", "5", "--batch-size", "64",
            "--out", str(tmp_path / "o")]
    if "--hook" not in extra:
        args += ["--hook", "synthetic"]
    if "--workers" not in extra:
        args += ["--workers", "1"]
    result = run_cli(*args, *extra, db=tmp_path / "m.db")
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_resume_with_a_different_config_is_refused(store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = job(store, out, steps=10)
    (out / "job.json").write_text(json.dumps(saved.to_dict()))
    result = run_cli("--resume", str(out), "--activations", str(store), "--hook", "synthetic", "--d-sae", "64",
                     "--k", "4", "--steps", "10", "--batch-size", "256", db=tmp_path / "m.db")
    assert result.returncode == 2
    assert "configuration differs from the checkpoint in ['sae', 'train']" in result.stderr, result.stderr[-1000:]
