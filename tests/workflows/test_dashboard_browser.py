"""The dashboard in a real headless Chromium, from disk: the script runs, sorts, filters, logs nothing.

Needs Debian's ``chromium`` (installed by .ci/run); skipped where /usr/bin/chromium is absent.
Screenshots go to ``<tmp>/test-artifacts/`` and, when set, to ``$SAE_TEST_ARTIFACTS``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.registry import build, make_config
from workflows.corpus import iter_documents, pack_windows
from workflows.dashboard import DashboardConfig, batch_states, select_rows
from workflows.dashboard_html import write_site
from workflows.hooks import run_with_hooks
from workflows.models import load_model

CHROMIUM = Path("/usr/bin/chromium")
HOOK = "blocks.1.hook_resid_post"
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs headless Chromium at /usr/bin/chromium "
                                "(Debian package `chromium`; .ci/run installs it)")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_llama_dir, shakespeare):
    """A dashboard of a random SAE on the tiny Llama, its state built in process (no Ray needed here)."""
    loaded = load_model(str(tiny_llama_dir))
    torch.manual_seed(0)
    sae = build(make_config("relu", d_in=48, d_sae=12)).eval()
    with torch.no_grad():
        sae.b_enc.fill_(-0.02)
    windows = pack_windows(iter_documents(str(shakespeare)), loaded.tokenizer, context_size=32, n_tokens=400)
    with torch.no_grad():
        acts = run_with_hooks(loaded.model, torch.from_numpy(windows.token_ids).long(), capture=[HOOK]).activations[HOOK]
        lat = sae.encode(acts.reshape(-1, 48)).reshape(*acts.shape[:2], -1)
    features = np.arange(12)
    state = batch_states(lat, windows.keep, np.arange(len(lat)), features, k=8, s=16, left=12, right=4)
    out = tmp_path_factory.mktemp("site")
    cfg = DashboardConfig(sae="random-sae", model=str(tiny_llama_dir), hook=HOOK, corpus=str(shakespeare),
                          n_tokens=400, out=str(out), context_size=32)
    rows = write_site(out, cfg, state, select_rows(state, None), windows, loaded, sae)
    return out, rows


def chromium(url: str, tmp_path: Path, *extra: str) -> tuple[str, str]:
    """Run headless Chromium on ``url``; returns (stdout, console lines from stderr)."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--allow-file-access-from-files",
           *extra, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Chromium reports every console message (and uncaught exception) as a ":CONSOLE" line; our pages log nothing.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, "\n".join(console)


def save_artifact(path: Path) -> None:
    target = os.environ.get("SAE_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def test_feature_page_renders_with_highlighted_contexts(site, tmp_path):
    out, rows = site
    row = max(rows, key=lambda r: r["count"])
    page = out / row["page"]
    dom, console = chromium(page.as_uri(), tmp_path, "--dump-dom")
    assert console == ""
    assert 'data-ready="1"' in dom  # the script ran to its end
    assert f'data-feature="{row["feature"]}"' in dom and f"Feature {row['feature']}</h1>" in dom
    assert dom.count('class="t peak"') >= 1 and "<svg" in dom and "Promoted" in dom
    artifacts = tmp_path / "test-artifacts"
    artifacts.mkdir()
    shot = artifacts / f"dashboard-feature-{row['feature']:05d}.png"
    _, console = chromium(page.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,900",
                          "--hide-scrollbars")
    assert console == "" and shot.is_file() and shot.stat().st_size > 10_000
    save_artifact(shot)


def _dom_rows(dom: str) -> list[tuple[int, bool]]:
    """(feature, hidden) per index row, in DOM order."""
    return [(int(m.group(2)), bool(m.group(1))) for m in
            re.finditer(r'<tr( hidden="")?><td data-v="(\d+)">', dom)]


def test_index_sorts_and_filters_in_the_browser(site, tmp_path):
    out, rows = site
    index = (out / "index.html").as_uri()
    dom, console = chromium(index, tmp_path, "--dump-dom")
    assert console == "" and 'data-ready="1"' in dom
    assert [f for f, _ in _dom_rows(dom)] == [r["feature"] for r in rows]
    # Sorted by density, descending (column 1), through the hash the script reads at load.
    dom, console = chromium(index + "#sort=1&dir=desc", tmp_path, "--dump-dom")
    want = [r["feature"] for r in sorted(rows, key=lambda r: -r["density"])]
    got = [f for f, _ in _dom_rows(dom)]
    densities = {r["feature"]: r["density"] for r in rows}
    assert console == "" and [densities[f] for f in got] == [densities[f] for f in want]
    assert 'data-dir="desc"' in dom
    # Filtered to one feature id: every other row hidden, the counter says 1.
    target = rows[-1]["feature"]
    dom, console = chromium(index + f"#q={target}", tmp_path, "--dump-dom")
    visible = [f for f, hidden in _dom_rows(dom) if not hidden]
    assert console == "" and target in visible and len(visible) < len(rows)
    assert f'<span id="shown">{len(visible)}</span>' in dom
    shot = tmp_path / "test-artifacts" / "dashboard-index.png"
    shot.parent.mkdir(exist_ok=True)
    chromium(index, tmp_path, f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.is_file()
    save_artifact(shot)
