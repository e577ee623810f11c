"""A command's MLflow run never stays RUNNING: tracker.closing() ends it FINISHED, FAILED with the error
as a tag, or KILLED on Ctrl-C (real sqlite MLflow store)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from workflows.tracking import MlflowTracker, NullTracker


def run_of(tracker: MlflowTracker):
    return MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # created once: MLflow's setup is slow


def test_closing_ends_runs_finished_failed_or_killed_and_reopen(uri):
    ok = MlflowTracker.create(uri, "e")
    with ok.closing():
        ok.log_metrics({"loss": 1.0}, step=1)
    assert run_of(ok).info.status == "FINISHED" and "error" not in run_of(ok).data.tags

    failed = MlflowTracker.create(uri, "e")
    with pytest.raises(FloatingPointError, match="loss is nan"), failed.closing():
        raise FloatingPointError("loss is nan at step 3; lower the learning rate")
    run = run_of(failed)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "FloatingPointError: loss is nan at step 3; lower the learning rate"
    assert run.data.tags["error_type"] == "FloatingPointError"

    killed = MlflowTracker.create(uri, "e")
    with pytest.raises(KeyboardInterrupt), killed.closing():
        raise KeyboardInterrupt
    assert run_of(killed).info.status == "KILLED" and run_of(killed).data.tags["error"] == "KeyboardInterrupt"

    resumed = MlflowTracker(uri, killed.run_id)  # a resumed run continues the same MLflow run
    resumed.reopen()
    assert run_of(resumed).info.status == "RUNNING" and "error" not in run_of(resumed).data.tags
    with resumed.closing():
        resumed.end("FINISHED")  # ended inside the block (log_final): not ended twice
    assert run_of(resumed).info.status == "FINISHED"


def test_a_tracking_failure_while_closing_does_not_hide_the_error(uri):
    tracker = MlflowTracker.create(uri, "e")
    tracker.run_id = "no-such-run"
    with pytest.raises(ValueError, match="the real problem"), tracker.closing():
        raise ValueError("the real problem")
    with pytest.raises(ValueError), NullTracker().closing():
        raise ValueError("null trackers pass errors through")
