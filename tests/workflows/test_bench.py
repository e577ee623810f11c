"""`sae bench --experiment E` on a real 4-trial sweep of tiny SAEs on a tiny model: a real local Ray, a real
sqlite MLflow, real Parquet store; every child run gets its bench/* metrics and artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from workflows.cli import main

HOOK = "blocks.1.hook_resid_post"
EXPERIMENT = "bench-test"
OPTIONS = ["--option", "absorption.max_words=100", "--option", "absorption.n_icl=2",
           "--option", "sparse_probing.max_per_class=20", "--option", "sparse_probing.max_tokens=24",
           "--option", "sparse_probing.tasks=builtin:stdlib-packages", "--option", "sparse_probing.ks=[1,2]"]


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sweep(local_ray, tiny_llama_dir, uri, tmp_path_factory) -> Path:
    import time

    root = tmp_path_factory.mktemp("bench")
    start = time.perf_counter()
    store = root / "acts"
    assert main(["collect", "--model", str(tiny_llama_dir), "--hook", HOOK, "--tokens", "2000", "--context-size",
                 "64", "--out", str(store)]) == 0
    assert main(["sweep", "--activations", str(store), "--hook", HOOK, "--arch", "topk", "--grid", "d_sae=48,96",
                 "--grid", "k=4,8", "--steps", "10", "--batch-size", "64", "--cpus-per-trial", "0.5",
                 "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--out", str(root / "sweep")]) == 0
    print(f"setup {time.perf_counter() - start:.1f} s")
    return root


def test_bench_experiment_fills_every_child_run_concurrently(sweep, uri, capsys):
    capsys.readouterr()
    rc = main(["bench", "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--workers", "2", "--tokens", "256",
               "--json", *OPTIONS])
    out = capsys.readouterr().out
    assert rc == 0, out
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    kids = [r for r in client.search_runs([experiment.experiment_id], "tags.sweep_trial = 'true'")]
    assert len(kids) == 4
    for run in kids:
        metrics = run.data.metrics
        assert 0 < metrics["bench/core/l0"] <= 8 and "bench/core/ce_loss_recovered" in metrics
        assert "bench/absorption/letters_evaluated" in metrics
        assert 0.0 <= metrics["bench/sparse_probing/top_1_accuracy"] <= 1.0
        assert [a.path for a in client.list_artifacts(run.info.run_id, "bench")] == ["bench/bench.json"]
        folder = Path(run.data.tags["sae_dir"])
        saved = json.loads((folder / "bench.json").read_text())
        assert set(saved["results"]) == {"core", "absorption", "sparse_probing"}
        assert saved["results"]["core"]["metrics"]["l0"] == pytest.approx(metrics["bench/core/l0"])
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 4 and "SAEs/hour" in out and "ETA" in out
    # Two actors, and their work overlapped in time: the SAEs were evaluated concurrently.
    assert len({line["worker"] for line in lines}) == 2
    overlaps = [a for a in lines for b in lines
                if a["worker"] != b["worker"] and a["started"] < b["finished"] and b["started"] < a["finished"]]
    assert overlaps


def test_bench_metrics_are_frontier_axes(sweep, uri, capsys):
    capsys.readouterr()
    rc = main(["frontier", "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--x", "l0",
               "--y", "bench/sparse_probing/top_1_accuracy:max", "--no-log", "--out", str(sweep / "front")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "bench/sparse_probing/top_1_accuracy (max)" in out
    assert (sweep / "front" / "frontier_l0_bench-sparse_probing-top_1_accuracy.csv").is_file()


def test_bench_refuses_bad_input(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--metrics", "core,nope"]) == 2
    assert "unknown bench metric" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--option", "absorption=3"]) == 2
    assert "METRIC.KEY=VALUE" in capsys.readouterr().err
