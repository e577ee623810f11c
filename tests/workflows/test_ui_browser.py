"""`sae ui --experiment E` prints a link that lands on the experiment's runs table, checked in a real headless
Chromium against the real MLflow server (MLflow 3 opens an experiment on its GenAI overview otherwise).

Needs Debian's ``chromium`` (installed by .ci/run); skipped where /usr/bin/chromium is absent.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from workflows.cli import main

CHROMIUM = Path("/usr/bin/chromium")
RUNS = ("trial-alpha-k8", "trial-beta-k16")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (a virtual-time budget lets the SPA fetch and render its runs)."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
           "--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}",
           "--virtual-time-budget=15000", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs headless Chromium at /usr/bin/chromium "
                    "(Debian package `chromium`; .ci/run installs it)")
def test_the_printed_link_lands_on_the_runs_table(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("ui-links")
    for name in RUNS:
        run_id = client.create_run(experiment_id, run_name=name).info.run_id
        client.log_metric(run_id, "final/l0", 8.0)
        client.set_terminated(run_id)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "ui", "--port", str(port), "--mlflow-uri", uri,
                             "--experiment", "ui-links"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        link = wait_for_link(proc, port)
        assert link == f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
        dom = dump_dom(link, tmp_path / "profile")
        assert all(name in dom for name in RUNS) and "<strong>2</strong> matching runs" in dom
        assert ">Training runs</h2>" in dom  # the runs table, not the GenAI overview
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def wait_for_link(proc: subprocess.Popen, port: int) -> str:
    """The runs link `sae ui` printed, once its server answers (bounded: a busy machine starts it slowly)."""
    deadline, lines = time.monotonic() + 120, []
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        found = re.search(r"runs of experiment 'ui-links': (\S+)", line)
        if found:
            break
    assert found, "".join(lines)
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return found.group(1)
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the UI on port {port} never answered")


def test_an_unknown_experiment_is_refused_before_the_server_starts(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("other")
    assert main(["ui", "--mlflow-uri", uri, "--experiment", "missing", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()  # MLflow's own INFO lines (table creation) may come first
    assert "no MLflow experiment 'missing'" in err.splitlines()[-1] and "Traceback" not in err
