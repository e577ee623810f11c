"""`sae frontier` on any two metrics, the correct-L0 pick per architecture and width, the files in the sweep's
parent run with its description, and the runs-view link; trials written into a real sqlite MLflow store."""

from __future__ import annotations

import csv
import math

import pytest
from mlflow.tracking import MlflowClient

from workflows.cli import main
from workflows.errors import UserError
from workflows.frontier import Axis, collect_trials, frontier, kind_for, parse_axis
from workflows.links import NOTE_TAG, runs_view_url
from workflows.pareto import pareto_front

EXPERIMENT = "frontier-test"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRUE_L0 = 8.0


def decoder_cosine(l0: float, width: int) -> float:
    """A U in log L0 with its minimum at TRUE_L0 (what the paper finds), shifted per width."""
    return 0.02 + 0.05 * math.log(l0 / TRUE_L0) ** 2 + 1e-4 * width


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """(uri, parent run id): one sweep of 2 archs x 2 widths x 5 L0s, plus a trial without the diagnostic."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    parent = client.create_run(experiment_id, tags={"sweep": "true"}, run_name="sweep-1").info.run_id
    client.set_terminated(parent, "FINISHED")
    for arch in ("batchtopk", "jumprelu"):
        for width in (64, 128):
            for l0 in (2.0, 4.0, 8.0, 16.0, 32.0):
                metrics = {"l0": l0 * (1.02 if arch == "jumprelu" else 1.0), "fvu": 0.5 / l0 + 1e-4 * width,
                           "mse": 0.1 / l0, "ce_loss_recovered": 1 - 0.3 / l0 - (0.01 if arch == "jumprelu" else 0),
                           "decoder_cosine": decoder_cosine(l0, width), "decoder_projection": 0.1}
                log_trial(client, experiment_id, parent, arch, width, metrics)
    log_trial(client, experiment_id, parent, "relu", 64, {"l0": 3.0, "fvu": 0.1, "ce_loss_recovered": 0.99})
    return uri, parent


def log_trial(client: MlflowClient, experiment_id: str, parent: str, arch: str, width: int, metrics: dict) -> None:
    tags = {"sweep_trial": "true", "mlflow.parentRunId": parent, "hook": "h", "architecture": arch}
    run = client.create_run(experiment_id, tags=tags, run_name=f"{arch}-{width}-{metrics['l0']:g}").info.run_id
    client.log_param(run, "arch", arch)
    client.log_param(run, "sae.d_sae", str(width))
    for name, value in metrics.items():
        client.log_metric(run, f"final/{name}", value)
    client.set_terminated(run, "FINISHED")


def test_any_two_metrics_with_directions(store, tmp_path, capsys):
    uri, parent = store
    out = tmp_path / "out"
    assert main(["frontier", "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--x", "l0",
                 "--y", "ce_loss_recovered:max", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    trials = collect_trials(EXPERIMENT, uri=uri)
    assert len(trials) == 21
    expected = {trials[i].run_id for i in pareto_front([(t.metrics["l0"], -t.metrics["ce_loss_recovered"])
                                                        for t in trials])}
    with (out / "frontier_l0_ce_loss_recovered.csv").open() as fh:
        assert {row["run_id"] for row in csv.DictReader(fh)} == expected
    assert {t.run_id for t in trials if t.run_id in printed} == expected
    assert (out / "frontier.png").read_bytes()[:8] == PNG_SIGNATURE
    # The table and plot went to the sweep's parent run, whose description says where they are.
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent, "frontier/l0_ce_loss_recovered")}
    assert "frontier/l0_ce_loss_recovered/frontier.png" in logged
    assert "frontier/l0_ce_loss_recovered/l0_picks.csv" in logged
    note = client.get_run(parent).data.tags[NOTE_TAG]
    assert "frontier/l0_ce_loss_recovered/" in note and "frontier.png" in note and "l0_picks.csv" in note
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert f"#/experiments/{experiment_id}/runs" in note and f"#/experiments/{experiment_id}/runs" in printed


def test_the_diagnostic_picks_the_l0_per_architecture_and_width(store, tmp_path, capsys):
    uri, _ = store
    out = tmp_path / "picks"
    assert main(["frontier", "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--no-log", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with (out / "l0_picks.csv").open() as fh:
        picks = {(row["arch"], row["d_sae"]): row for row in csv.DictReader(fh)}
    assert set(picks) == {("batchtopk", "64"), ("batchtopk", "128"), ("jumprelu", "64"), ("jumprelu", "128")}
    for (arch, _), row in picks.items():
        scale = 1.02 if arch == "jumprelu" else 1.0
        assert float(row["l0"]) == pytest.approx(TRUE_L0 * scale, rel=0.02)  # the parabola's vertex is exact here
        assert (float(row["low"]), float(row["high"])) == (4.0 * scale, 16.0 * scale)
        assert float(row["confidence"]) > 0.9 and row["at_edge"] == ""
    assert "batchtopk d_sae=64: L0 8 " in printed and "Correct-L0 diagnostic" in printed
    assert "L0-FVU" not in printed and "l0 (min) vs fvu (min) frontier over 21 finished trials" in printed


def test_unknown_metric_and_bad_axis_are_one_line_errors(store, capsys):
    uri, _ = store
    assert main(["frontier", "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--y", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'nope'" in err and "decoder_cosine" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="METRIC:max"):
        parse_axis("fvu:up")
    assert parse_axis("ce_loss_recovered") == Axis("ce_loss_recovered", maximise=True)
    assert parse_axis("fvu") == Axis("fvu") and parse_axis("l0:max") == Axis("l0", maximise=True)


def test_maximised_axis_frontier_matches_the_definition():
    from workflows.frontier import Trial

    trials = [Trial(run_id=str(i), run_name="", parent_run_id="p", arch="a", hook="h", metrics={"l0": l0, "ce": ce})
              for i, (l0, ce) in enumerate([(2, 0.9), (4, 0.95), (8, 0.93), (8, 0.99), (16, 0.99)])]
    _, front = frontier(trials, kind_for(parse_axis("l0"), parse_axis("ce:max")))
    assert [t.run_id for t in front] == ["0", "1", "3"]


def test_runs_view_url(store):
    uri, _ = store
    experiment_id = MlflowClient(uri).get_experiment_by_name(EXPERIMENT).experiment_id
    assert runs_view_url(uri, EXPERIMENT) == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"
    assert runs_view_url(uri, EXPERIMENT, local_ui="http://127.0.0.1:8123/") == \
        f"http://127.0.0.1:8123/#/experiments/{experiment_id}/runs"
    with pytest.raises(UserError, match="no MLflow experiment 'missing'"):
        runs_view_url(uri, "missing")


def test_trials_of_several_sweeps_share_one_frontier_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("two-sweeps")
    for sweep in ("a", "b"):
        parent = client.create_run(experiment_id, run_name=f"sweep-{sweep}").info.run_id
        for l0 in (4.0, 8.0):
            log_trial(client, experiment_id, parent, "topk", 64, {"l0": l0, "fvu": 1 / l0})
    for _ in range(2):
        assert main(["frontier", "--experiment", "two-sweeps", "--mlflow-uri", uri]) == 0
    (run,) = client.search_runs([experiment_id], "tags.frontier = 'true'")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "frontier")} >= {"frontier/frontier.png",
                                                                                     "frontier/trials.csv"}
    assert "frontier.png" in run.data.tags[NOTE_TAG] and run.info.run_id in capsys.readouterr().out
