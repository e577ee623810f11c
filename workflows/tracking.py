"""MLflow tracking behind a small interface, with a null tracker for ranks that must not log.

The embedded default store is a sqlite file in the working directory (MLflow 3 refuses the plain
file store); on a cluster, point ``--mlflow-uri``/``MLFLOW_TRACKING_URI`` at the tracking server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else sqlite:///<cwd>/mlflow.db."""
    # MLflow announces each new sqlite database on stderr, where the CLI keeps its one-line messages.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; values become strings (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def _artifact_root(uri: str) -> str | None:
    """For a local sqlite store, keep artifacts beside the database instead of in the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


# Longest error text kept in the run's ``error`` tag (MLflow refuses tag values over 8000 characters).
MAX_ERROR_TAG = 5000


class NullTracker:
    """Accepts every call and does nothing: what non-zero ranks and tracking-off runs get."""

    run_id: str | None = None
    ended: bool = False
    """Whether :meth:`end` was called (so :meth:`closing` does not end the run twice)."""

    @contextlib.contextmanager
    def closing(self) -> Iterator[NullTracker]:
        """``with tracker.closing():`` the run never stays RUNNING after the block. Ending normally ends
        it FINISHED (unless the block already ended it); an exception ends it FAILED with tags ``error``
        (type and message) and ``error_type``; Ctrl-C (KeyboardInterrupt) ends it KILLED. The exception
        propagates unchanged; a failure to reach the tracking server while ending is logged, never
        raised in its place."""
        try:
            yield self
        except BaseException as exc:
            self.fail(exc)
            raise
        if not self.ended:
            self.end("FINISHED")

    def fail(self, exc: BaseException) -> None:
        """End the run for ``exc``: KILLED on Ctrl-C and on SystemExit (how Ray Tune stops a trial its
        scheduler gave up on), FAILED with tags ``error`` and ``error_type`` otherwise. A failure to reach
        the tracking server here is logged, never raised in the place of ``exc``."""
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        try:
            if not isinstance(exc, SystemExit):  # a stopped trial is not an error
                self.set_tags({"error": text[:MAX_ERROR_TAG], "error_type": type(exc).__name__})
            self.end(status)
        except Exception as secondary:  # the tracking server itself may be what failed
            logger.warning("could not mark MLflow run %s %s: %s", self.run_id, status, secondary)

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None: ...

    def end(self, status: str = "FINISHED") -> None:
        self.ended = True


class MlflowTracker(NullTracker):
    """One MLflow run, addressed by id through MlflowClient (no global 'active run' state)."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def create(cls, uri: str | None, experiment: str, run_name: str | None = None,
               tags: Mapping[str, str] | None = None, parent_run_id: str | None = None) -> MlflowTracker:
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=_artifact_root(uri))
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(uri, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=rows)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True

    def reopen(self) -> None:
        """Mark a run ended earlier (e.g. KILLED by Ctrl-C) RUNNING again, without its error tags: for a
        resumed run that logs into the same MLflow run."""
        for key in ("error", "error_type"):
            if key in self.client.get_run(self.run_id).data.tags:
                self.client.delete_tag(self.run_id, key)
        self.client.update_run(self.run_id, status="RUNNING")
        self.ended = False
