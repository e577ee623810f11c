"""Pareto frontiers over sweep trials recorded in MLflow: collection, tables, plots, tags.

A sweep trial is an MLflow run tagged ``sweep_trial=true`` (a child of its sweep's parent run).
Only FINISHED trials with held-out metrics take part; failed and early-stopped ones do not.

Two frontiers, both axes minimised (``workflows.pareto.pareto_front``):
- ``l0_fvu``: held-out L0 against fraction of variance unexplained;
- ``l0_ce``: held-out L0 against 1 - CE loss recovered, over the trials that have it.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows.errors import UserError
from workflows.pareto import pareto_front
from workflows.tracking import resolve_tracking_uri

logger = logging.getLogger(__name__)

TRIAL_TAG = "sweep_trial"
METRICS = ("l0", "fvu", "mse", "dead_fraction", "ce_loss_recovered")


@dataclass(kw_only=True)
class Trial:
    """One finished sweep trial as read back from MLflow."""

    run_id: str
    """MLflow run id of the trial."""
    run_name: str
    """MLflow run name (arch and knob values)."""
    parent_run_id: str
    """The sweep's parent run."""
    arch: str
    """Architecture name."""
    hook: str
    """Hook the SAE was trained on."""
    sae: dict[str, str] = field(default_factory=dict)
    """Architecture fields as logged (params ``sae.*``)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Held-out metrics (``final/*``): l0, fvu, mse, dead_fraction, ce_loss_recovered if measured."""

    def row(self) -> dict[str, Any]:
        """A flat table row."""
        return {"run_id": self.run_id, "run_name": self.run_name, "parent_run_id": self.parent_run_id,
                "arch": self.arch, "hook": self.hook, **{f"sae.{k}": v for k, v in sorted(self.sae.items())},
                **{m: self.metrics.get(m) for m in METRICS}}


@dataclass(frozen=True)
class FrontierKind:
    name: str
    """File-name stem and tag suffix."""
    y_label: str
    """Axis label of the second coordinate."""

    def point(self, trial: Trial) -> tuple[float, float] | None:
        l0 = trial.metrics.get("l0")
        if self.name == "l0_fvu":
            y = trial.metrics.get("fvu")
        else:
            ce = trial.metrics.get("ce_loss_recovered")
            y = None if ce is None else 1.0 - ce
        return None if l0 is None or y is None else (l0, y)


L0_FVU = FrontierKind("l0_fvu", "FVU (held-out)")
L0_CE = FrontierKind("l0_ce", "1 - CE loss recovered")
KINDS = (L0_FVU, L0_CE)


def frontier(trials: list[Trial], kind: FrontierKind) -> tuple[list[Trial], list[Trial]]:
    """(candidates, frontier): the trials that have this kind's metrics, and the non-dominated ones by L0."""
    candidates = [t for t in trials if kind.point(t) is not None]
    front = [candidates[i] for i in pareto_front([kind.point(t) for t in candidates])]
    return candidates, sorted(front, key=lambda t: kind.point(t))


# -- reading MLflow --------------------------------------------------------------------------------
def collect_trials(experiment: str, *, uri: str | None = None, parent_run_id: str | None = None,
                   hook: str | None = None) -> list[Trial]:
    """FINISHED sweep trials of ``experiment`` (of one sweep when ``parent_run_id`` is given)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"no MLflow experiment {experiment!r} at {resolve_tracking_uri(uri)}")
    query = [f"tags.{TRIAL_TAG} = 'true'", "attributes.status = 'FINISHED'"]
    if parent_run_id:
        query.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    if hook:
        query.append(f"tags.hook = '{hook}'")
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], " and ".join(query), max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [trial_from_run(run) for run in runs if "final/l0" in run.data.metrics]


def trial_from_run(run) -> Trial:
    params, tags = run.data.params, run.data.tags
    return Trial(run_id=run.info.run_id, run_name=run.info.run_name or "", parent_run_id=tags.get("mlflow.parentRunId", ""),
                 arch=params.get("arch", tags.get("architecture", "?")), hook=tags.get("hook", params.get("hook", "?")),
                 sae={k[len("sae."):]: v for k, v in params.items() if k.startswith("sae.")},
                 metrics={m: run.data.metrics[f"final/{m}"] for m in METRICS if f"final/{m}" in run.data.metrics})


def single_hook(trials: list[Trial]) -> None:
    """Frontiers compare SAEs of one hook; refuse to mix hooks silently."""
    hooks = sorted({t.hook for t in trials})
    if len(hooks) > 1:
        raise UserError(f"the trials span hooks {hooks}; pick one with --hook")


# -- writing tables and plots ------------------------------------------------------------------------
def write_frontier_files(trials: list[Trial], out: Path) -> list[Path]:
    """frontier.png, trials.csv (every trial, with on-frontier flags), frontier_<kind>.csv/.json."""
    out.mkdir(parents=True, exist_ok=True)
    on_front = frontier_run_ids(trials)
    flagged = [{**t.row(), **{f"pareto_{name}": t.run_id in ids for name, ids in on_front.items()}} for t in trials]
    written = [write_table(out / "trials.csv", flagged)]
    for kind in KINDS:
        candidates, front = frontier(trials, kind)
        if not candidates:
            continue
        rows = [t.row() for t in front]
        written.append(write_table(out / f"frontier_{kind.name}.csv", rows))
        (out / f"frontier_{kind.name}.json").write_text(json.dumps(rows, indent=2))
        written.append(out / f"frontier_{kind.name}.json")
    if trials:
        written.append(plot_frontiers(trials, out / "frontier.png"))
    return written


def frontier_run_ids(trials: list[Trial]) -> dict[str, set[str]]:
    """Per frontier kind, the run ids on it."""
    return {kind.name: {t.run_id for t in frontier(trials, kind)[1]} for kind in KINDS}


def write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_frontiers(trials: list[Trial], path: Path) -> Path:
    """Every trial as a point coloured by architecture; each frontier as a step line through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [kind for kind in KINDS if frontier(trials, kind)[0]]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    archs = sorted({t.arch for t in trials})
    for ax, kind in zip(axes[0], kinds, strict=True):
        candidates, front = frontier(trials, kind)
        for index, arch in enumerate(archs):
            points = [kind.point(t) for t in candidates if t.arch == arch]
            if points:
                ax.scatter(*zip(*points, strict=True), label=arch, color=f"C{index}", alpha=0.8, zorder=2)
        xs, ys = zip(*(kind.point(t) for t in front), strict=True)
        ax.step(xs, ys, where="post", color="black", linewidth=1.2, label="Pareto frontier", zorder=1)
        ax.scatter(xs, ys, facecolors="none", edgecolors="black", s=90, zorder=3)
        ax.set(xlabel="L0 (held-out)", ylabel=kind.y_label, title=f"{kind.name}: {len(front)} of {len(candidates)} on the frontier")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(trials: list[Trial], kind: FrontierKind = L0_FVU) -> str:
    """The frontier as aligned text, lowest L0 first."""
    _, front = frontier(trials, kind)
    header = ("arch", "sae", "l0", "fvu", "mse", "dead", "ce_rec", "run_name", "run_id")
    rows = [header] + [(t.arch, " ".join(f"{k}={v}" for k, v in sorted(t.sae.items()) if k != "d_in"),
                        *(fmt(t.metrics.get(m)) for m in METRICS), t.run_name, t.run_id) for t in front]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
