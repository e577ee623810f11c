"""Every notebook runs top to bottom (tiny settings) in a fresh kernel; the committed files carry no outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One work folder for all notebooks, as `runs/notebooks` is for a researcher: 03 reuses 01's SAE."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_NB_TINY", "1")
    monkeypatch.setenv("SAE_NB_WORKDIR", str(workdir))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    nbformat.write(nb, tmp_path / path.name)  # the executed copy, for a look when debugging
