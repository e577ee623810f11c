"""Where to look in the MLflow UI: the direct link to an experiment's runs table, and run descriptions.

MLflow 3's UI opens an experiment on its GenAI overview (traces, latency), which says nothing about
SAEs; ``#/experiments/<id>/runs`` lands on the runs table instead. A run's description is the tag
``mlflow.note.content`` (markdown, shown on the run's page).
"""

from __future__ import annotations

from workflows.errors import UserError
from workflows.tracking import resolve_tracking_uri

LOCAL_UI = "http://127.0.0.1:5000"
"""Where `sae ui` serves a database store by default."""
NOTE_TAG = "mlflow.note.content"


def ui_base(uri: str, local_ui: str = LOCAL_UI) -> str:
    """The UI serving tracking store ``uri``: a tracking server is its own UI; a database or file store is
    served locally (``local_ui``)."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else local_ui.rstrip("/")


def runs_view_url(uri: str | None, experiment: str, local_ui: str = LOCAL_UI) -> str:
    """The link that opens ``experiment``'s runs table: ``<ui>/#/experiments/<id>/runs``."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"no MLflow experiment {experiment!r} at {uri}")
    return f"{ui_base(uri, local_ui)}/#/experiments/{found.experiment_id}/runs"


def describe_run(uri: str, run_id: str, markdown: str) -> None:
    """Set a run's description (shown at the top of its page in the UI)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).set_tag(run_id, NOTE_TAG, markdown)
