"""Ray Tune sweeps on a real local Ray with a real sqlite MLflow: child runs, failures, frontiers, `sae ui`."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from workflows.cli import main
from workflows.pareto import pareto_front
from workflows.sweep import SweepSpec, map_knobs, run_sweep

EXPERIMENT = "sweep-test"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "30", "--batch-size", "64", "--lr", "3e-3", "--set", "log_every=10"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store")
    write_synthetic_store(path, SyntheticConfig(d=16, n_features=48, mean_active=3, noise=0.01), 4000)
    return path


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def first_sweep(local_ray, store, uri, tmp_path_factory) -> Path:
    """A 4-trial sweep through the CLI entry point (in process, on the module's Ray), one Tune trial each."""
    out = tmp_path_factory.mktemp("sweep1")
    rc = main(["sweep", *first_sweep_args(store), "--no-pack", "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--out", str(out)])
    assert rc == 0
    return out


def first_sweep_args(store: Path) -> list[str]:
    return ["--activations", str(store), "--hook", "synthetic", "--arch", "topk", "--grid", "d_sae=16,32",
            "--grid", "k=2,4", *TINY]


def runs(uri: str, query: str = "", experiment: str = EXPERIMENT) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], query, max_results=1000)


def children(uri: str, parent_id: str, experiment: str = EXPERIMENT) -> list:
    return runs(uri, f"tags.`mlflow.parentRunId` = '{parent_id}'", experiment)


def computed_frontier(trial_runs: list) -> set[str]:
    points = [(r.data.metrics["final/l0"], r.data.metrics["final/fvu"]) for r in trial_runs]
    return {trial_runs[i].info.run_id for i in pareto_front(points)}


def test_sweep_records_parent_children_frontier_and_plot(first_sweep, uri, tmp_path):
    (parent,) = runs(uri, "tags.sweep = 'true'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hook"] == "synthetic" and parent.data.tags["archs"] == "topk"
    kids = children(uri, parent.info.run_id)
    assert len(kids) == 4 and {r.info.status for r in kids} == {"FINISHED"}
    assert {(r.data.params["sae.d_sae"], r.data.params["sae.k"]) for r in kids} == {
        ("16", "2"), ("16", "4"), ("32", "2"), ("32", "4")}
    client = MlflowClient(uri)
    for run in kids:
        metrics = run.data.metrics
        assert {"final/l0", "final/fvu", "final/mse", "final/dead_fraction"} <= set(metrics)
        assert metrics["final/l0"] == pytest.approx(float(run.data.params["sae.k"]), abs=0.01)  # TopK: L0 is k
        assert 0 < metrics["final/fvu"] < 1.5
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [10, 20, 30]
        assert "final/ce_loss_recovered" not in metrics  # no --model: not measured, not faked

    # The pareto tags, the parent's frontier table and a frontier computed here all agree.
    expected = computed_frontier(kids)
    assert {r.info.run_id for r in kids if r.data.tags["pareto"] == "true"} == expected
    assert {r.data.tags["pareto"] for r in kids} <= {"true", "false"}
    local = Path(client.download_artifacts(parent.info.run_id, "frontier", str(tmp_path)))
    with (local / "frontier_l0_fvu.csv").open() as fh:
        assert {row["run_id"] for row in csv.DictReader(fh)} == expected
    assert (local / "frontier_l0_fvu.json").is_file() and (local / "trials.csv").is_file()
    png = local / "frontier.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100

    # Tune saw intermediate training rows (what ASHA decides on), then the held-out row.
    results = sorted(first_sweep.glob("sweep-*/tune/*/result.json"))
    assert len(results) == 4
    assert '"held_out": 0' in results[0].read_text() and '"held_out": 1' in results[0].read_text()


def test_packed_sweep_trains_the_same_saes_in_fewer_tune_trials(first_sweep, store, uri, tmp_path):
    """Packing (the default with 4 trials on 2 CPUs) trains the first sweep's 4 SAEs in 2 Tune trials of 2 on one
    read of the store each: every SAE has its own MLflow run with the same metrics, its own folder with the
    same weights, and the frontier counts all 4."""
    out = tmp_path / "packed"
    rc = main(["sweep", *first_sweep_args(store), "--experiment", "sweep-packed", "--mlflow-uri", uri, "--out", str(out)])
    assert rc == 0
    client = MlflowClient(uri)
    (parent,) = runs(uri, "tags.sweep = 'true'", experiment="sweep-packed")
    assert parent.data.tags["packed_groups"] == "2"
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["tune_trials"] == 2
    assert len(sorted(out.glob("sweep-*/tune/*/result.json"))) == 2  # Tune ran 2 trials, not 4
    (unpacked_parent,) = runs(uri, "tags.sweep = 'true' and tags.packed_groups = 'none'")
    packed = {r.info.run_name: r for r in children(uri, parent.info.run_id, experiment="sweep-packed")}
    separate = {r.info.run_name: r for r in children(uri, unpacked_parent.info.run_id)}
    assert sorted(packed) == sorted(separate) and len(packed) == 4
    assert sorted(r.data.tags["group_size"] for r in packed.values()) == ["2", "2", "2", "2"]
    for name, run in packed.items():
        alone = separate[name]
        assert run.info.status == "FINISHED"
        finals = {k: v for k, v in run.data.metrics.items() if k.startswith("final/")}
        assert finals and finals == pytest.approx({k: alone.data.metrics[k] for k in finals}, rel=1e-5)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [10, 20, 30]
        (folder,) = out.glob(f"sweep-*/saes/{name}-*")
        (alone_folder,) = first_sweep.glob(f"sweep-*/saes/{name}-*")
        weights, alone_weights = (load_file(str(f / "sae_weights.safetensors")) for f in (folder, alone_folder))
        assert all(torch.allclose(weights[k], alone_weights[k], atol=1e-6) for k in alone_weights)
    local = Path(client.download_artifacts(parent.info.run_id, "frontier", str(tmp_path)))
    with (local / "trials.csv").open() as fh:
        assert {row["run_id"] for row in csv.DictReader(fh)} == {r.info.run_id for r in packed.values()}


def test_bad_trials_fail_alone_and_frontier_spans_both_sweeps(first_sweep, store, uri, tmp_path):
    # d_sae=8 with k=16 is impossible (a ConfigError inside the trial); lr=1e30 diverges (FloatingPointError).
    spec = SweepSpec(activations=str(store), hook="synthetic", archs=["topk"], grid={"d_sae": [8], "k": [2, 16],
                     "lr": [3e-3, 1e30]}, steps=30, batch_size=64, lr=3e-3, sets={"log_every": 10},
                     experiment=EXPERIMENT, mlflow_uri=uri, out=str(tmp_path / "sweep2"))
    result = run_sweep(spec)
    assert result.trials == 4 and len(result.finished) == 1 and result.failed == 3
    assert result.tune_trials == 2  # packed: the failures stayed with their own SAEs, not their group
    kids = children(uri, result.parent_run_id)
    failed = [r for r in kids if r.info.status == "FAILED"]
    assert len(failed) == 3 and all("error" in r.data.tags for r in failed)
    assert sum("k must be in [1, d_sae=8], got 16" in r.data.tags["error"] for r in failed) == 2
    assert sum(r.data.tags["error"].startswith("FloatingPointError") for r in failed) == 1
    (good,) = [r for r in kids if r.info.status == "FINISHED"]
    assert good.data.params["sae.k"] == "2" and good.data.params["train.lr"] == "0.003"

    # `sae frontier` reads every finished trial of the experiment: 4 from the first sweep, 1 from this one.
    all_trials = runs(uri, "tags.sweep_trial = 'true' and attributes.status = 'FINISHED'")
    assert len(all_trials) == 5
    expected = computed_frontier(all_trials)
    out = tmp_path / "frontier"
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "frontier", "--experiment", EXPERIMENT,
                           "--mlflow-uri", uri, "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "over 5 finished trials" in proc.stdout
    printed = {run.info.run_id for run in all_trials if run.info.run_id in proc.stdout}
    assert printed == expected
    with (out / "frontier_l0_fvu.csv").open() as fh:
        assert {row["run_id"] for row in csv.DictReader(fh)} == expected
    assert (out / "frontier.png").read_bytes()[:8] == PNG_SIGNATURE


def test_knobs_map_to_fields_and_bad_knobs_are_refused_before_anything_runs(store, uri, capsys):
    assert map_knobs("topk", {"target_l0": 8, "d_sae": 64, "lr": 1e-3}) == ({"k": 8, "d_sae": 64}, {"lr": 1e-3})
    assert map_knobs("relu", {"l1": 0.1}) == ({"l1_coefficient": 0.1}, {})
    assert map_knobs("jumprelu", {"l0": 0.01}) == ({"l0_coefficient": 0.01}, {})
    for arch in ("relu", "gated", "jumprelu", "kl_sparse", "transcoder", "crosscoder"):  # their own target_l0
        assert map_knobs(arch, {"target_l0": 12}) == ({"target_l0": 12}, {})
    bad = [(["--arch", "topk", "--grid", "l1=0.1,0.2"], "has no 'l1' setting"),
           (["--arch", "topk", "--grid", "k=2", "--grid", "target_l0=4"], "not both"),
           (["--arch", "nope", "--grid", "k=2"], "nope"),
           (["--arch", "topk", "--grid", "k"], "--grid expects KNOB=V1,V2"),
           (["--arch", "topk", "--grid", "k=2", "--set", "bogus=1"], "bogus")]
    for args, message in bad:
        rc = main(["sweep", "--activations", str(store), "--hook", "synthetic", "--experiment", "refused",
                   "--mlflow-uri", uri, *args, *TINY])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (args, err)
    assert MlflowClient(uri).get_experiment_by_name("refused") is None


def test_asha_stops_a_worse_trial_without_failing_it(local_ray, store, tmp_path):
    # Two CPUs per trial: the trials run one after the other, k=8 first, so at ASHA's first rung
    # (step 10) the k=1 trial is behind the only recorded result and is stopped.
    uri = f"sqlite:///{tmp_path / 'asha.db'}"
    spec = SweepSpec(activations=str(store), hook="synthetic", archs=["topk"], grid={"d_sae": [16], "k": [8, 1]},
                     steps=40, batch_size=64, lr=3e-3, sets={"log_every": 5}, experiment=EXPERIMENT, mlflow_uri=uri,
                     out=str(tmp_path / "asha"), scheduler="asha", cpus_per_trial=2)
    result = run_sweep(spec)
    assert (result.trials, len(result.finished), result.stopped, result.failed) == (2, 1, 1, 0)
    kids = {r.data.params["sae.k"]: r for r in children(uri, result.parent_run_id)}
    assert kids["8"].info.status == "FINISHED" and kids["8"].data.tags["pareto"] == "true"
    assert kids["1"].info.status == "KILLED" and kids["1"].data.tags["stopped_early"] == "asha"
    assert "error" not in kids["1"].data.tags
    assert max(m.step for m in MlflowClient(uri).get_metric_history(kids["1"].info.run_id, "loss")) < 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_serves_the_store_on_localhost(tmp_path):
    port = free_port()
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    MlflowClient(uri).create_experiment("seen-by-ui")  # creates the tables now, not inside the server's start-up
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "ui", "--port", str(port), "--mlflow-uri", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=seen-by-ui"
    try:
        # Bounded wait; the server imports slowly when the machine is busy (60 s seen on 2 loaded cores).
        deadline, body = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(api, timeout=2) as response:
                    body = response.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None and '"seen-by-ui"' in body, f"no answer; exit code {proc.poll()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200
        proc.terminate()  # SIGTERM to `sae ui`, which stops its mlflow server
        output, _ = proc.communicate(timeout=30)
        assert f"http://127.0.0.1:{port}" in output
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
