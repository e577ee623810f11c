"""Suite-wide settings: nothing a test does may write into the checkout or the user's MLflow."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on two cores) each worker and the processes it
    starts get one thread: two workers with two OpenMP threads each thrash the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Every test (and every subprocess it starts) logs to its own sqlite MLflow store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


# The test files that take longest under `make test`, longest first (worker-seconds measured with
# `make test PYTEST_ARGS=--durations=0`). xdist's loadfile scheduler hands out files in collection
# order, so starting the long ones first keeps both workers busy to the end instead of one finishing
# a long file alone. Files not listed keep their order after these; refresh the list when it drifts.
# (test_activations and test_dashboard come after test_evaluate: by then the shared SmolLM2 store of
# tests/workflows/conftest.py is collected and they do not wait on its lock.)
SLOWEST_FIRST = [
    "tests/workflows/test_train_ray.py",
    "tests/workflows/test_transcoder_training.py",
    "tests/test_notebooks.py",
    "tests/workflows/test_evaluate.py",
    "tests/workflows/test_cluster.py",
    "tests/core/test_architectures.py",
    "tests/workflows/test_train_fault.py",
    "tests/workflows/test_sweep.py",
    "tests/workflows/test_activations.py",
    "tests/workflows/test_dashboard.py",
    "tests/workflows/test_train_stream.py",
    "tests/workflows/test_e2e.py",
    "tests/workflows/test_pipeline.py",
    "tests/workflows/test_cli_train.py",
    "tests/core/test_transcoders.py",
    "tests/workflows/test_models.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: in-file order kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
