"""Pareto frontiers over sweep trials recorded in MLflow, on any pair of logged metrics: collection,
tables, plots, tags, and the correct-L0 diagnostic's pick per architecture and width.

A sweep trial is an MLflow run tagged ``sweep_trial=true`` (a child of its sweep's parent run).
Only FINISHED trials with held-out metrics (``final/*``) take part; failed and early-stopped ones do not.

A frontier kind is two axes, each a logged ``final/<metric>`` with a direction (``fvu:min``,
``ce_loss_recovered:max``); ``workflows.pareto.pareto_front`` minimises, so a maximised axis is negated.
The two default kinds:
- ``l0_fvu``: held-out L0 (min) against fraction of variance unexplained (min);
- ``l0_ce``: held-out L0 (min) against CE loss recovered (max), over the trials that have it.
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
"""The held-out metrics every table shows first; any other ``final/*`` metric a trial logged follows."""
MAXIMISED = frozenset({"ce_loss_recovered", "variance_explained"})
"""Metrics whose axis is maximised when the spec names no direction (also any name ending in ``accuracy``)."""
BENCH_PREFIX = "bench/"
"""``sae bench`` metrics (``bench/<metric>/<key>``) are axes under their full name."""


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
    """Held-out metrics: every ``final/<name>`` the run logged, by name (l0, fvu, ..., decoder_cosine), and
    every ``bench/<metric>/<key>`` of `sae bench` under its full name."""

    def row(self) -> dict[str, Any]:
        """A flat table row."""
        extra = sorted(set(self.metrics) - set(METRICS))
        return {"run_id": self.run_id, "run_name": self.run_name, "parent_run_id": self.parent_run_id,
                "arch": self.arch, "hook": self.hook, **{f"sae.{k}": v for k, v in sorted(self.sae.items())},
                **{m: self.metrics.get(m) for m in (*METRICS, *extra)}}


@dataclass(frozen=True)
class Axis:
    """One frontier coordinate: a held-out metric and whether lower or higher is better."""

    metric: str
    """The metric's name (the run logged it as ``final/<metric>``)."""
    maximise: bool = False
    """Higher is better."""

    @property
    def label(self) -> str:
        return f"{self.metric} ({'max' if self.maximise else 'min'})"

    def value(self, trial: Trial) -> float | None:
        return trial.metrics.get(self.metric)


def parse_axis(spec: str) -> Axis:
    """``name`` or ``name:min`` / ``name:max`` (without a direction: max for MAXIMISED metrics, else min)."""
    name, _, direction = spec.strip().partition(":")
    if not name or direction not in ("", "min", "max"):
        raise UserError(f"an axis is METRIC or METRIC:min or METRIC:max, got {spec!r}")
    default_max = name in MAXIMISED or name.endswith("accuracy")
    return Axis(name, maximise=direction == "max" if direction else default_max)


@dataclass(frozen=True)
class FrontierKind:
    name: str
    """File-name stem and tag suffix."""
    x: Axis = Axis("l0")
    """Horizontal coordinate."""
    y: Axis = Axis("fvu")
    """Vertical coordinate."""

    @property
    def y_label(self) -> str:
        return self.y.label

    def values(self, trial: Trial) -> tuple[float, float] | None:
        """The trial's (x, y) as logged; None when it lacks either metric."""
        x, y = self.x.value(trial), self.y.value(trial)
        return None if x is None or y is None else (x, y)

    def point(self, trial: Trial) -> tuple[float, float] | None:
        """(x, y) with maximised axes negated: both coordinates minimised, as ``pareto_front`` wants."""
        values = self.values(trial)
        if values is None:
            return None
        return (-values[0] if self.x.maximise else values[0], -values[1] if self.y.maximise else values[1])


def kind_for(x: Axis, y: Axis) -> FrontierKind:
    """The frontier of any two axes, named ``<x>_<y>`` (a ``/`` of a bench metric becomes ``-``)."""
    return FrontierKind(f"{x.metric}_{y.metric}".replace("/", "-"), x, y)


L0_FVU = FrontierKind("l0_fvu", Axis("l0"), Axis("fvu"))
L0_CE = FrontierKind("l0_ce", Axis("l0"), Axis("ce_loss_recovered", maximise=True))
KINDS = (L0_FVU, L0_CE)


def frontier(trials: list[Trial], kind: FrontierKind) -> tuple[list[Trial], list[Trial]]:
    """(candidates, frontier): the trials that have this kind's metrics, and the non-dominated ones in x order."""
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
                 metrics={**{k[len("final/"):]: v for k, v in run.data.metrics.items() if k.startswith("final/")},
                          **{k: v for k, v in run.data.metrics.items() if k.startswith(BENCH_PREFIX)}})


def single_hook(trials: list[Trial]) -> None:
    """Frontiers compare SAEs of one hook; refuse to mix hooks silently."""
    hooks = sorted({t.hook for t in trials})
    if len(hooks) > 1:
        raise UserError(f"the trials span hooks {hooks}; pick one with --hook")


# -- writing tables and plots ------------------------------------------------------------------------
def write_frontier_files(trials: list[Trial], out: Path, kinds: tuple[FrontierKind, ...] = KINDS) -> list[Path]:
    """frontier.png, trials.csv (every trial, with on-frontier flags), frontier_<kind>.csv/.json, and
    l0_picks.csv/.json (the diagnostic's L0 per architecture and width) when the trials logged it."""
    from workflows.frontier_report import l0_picks, pick_rows, plot_frontiers

    out.mkdir(parents=True, exist_ok=True)
    on_front = frontier_run_ids(trials, kinds)
    flagged = [{**t.row(), **{f"pareto_{name}": t.run_id in ids for name, ids in on_front.items()}} for t in trials]
    written = [write_table(out / "trials.csv", flagged)]
    for kind in kinds:
        candidates, front = frontier(trials, kind)
        if not candidates:
            continue
        rows = [t.row() for t in front]
        written.append(write_table(out / f"frontier_{kind.name}.csv", rows))
        (out / f"frontier_{kind.name}.json").write_text(json.dumps(rows, indent=2))
        written.append(out / f"frontier_{kind.name}.json")
    picks = l0_picks(trials)
    if picks:
        written.append(write_table(out / "l0_picks.csv", pick_rows(picks)))
        (out / "l0_picks.json").write_text(json.dumps(pick_rows(picks), indent=2))
        written.append(out / "l0_picks.json")
    if any(frontier(trials, kind)[0] for kind in kinds):
        written.append(plot_frontiers(trials, out / "frontier.png", kinds, picks))
    return written


def frontier_run_ids(trials: list[Trial], kinds: tuple[FrontierKind, ...] = KINDS) -> dict[str, set[str]]:
    """Per frontier kind, the run ids on it."""
    return {kind.name: {t.run_id for t in frontier(trials, kind)[1]} for kind in kinds}


def write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(trials: list[Trial], kind: FrontierKind = L0_FVU) -> str:
    """The frontier as aligned text, in x order (best x first): the kind's two axes, then the usual metrics."""
    _, front = frontier(trials, kind)
    shown = list(dict.fromkeys([kind.x.metric, kind.y.metric, *METRICS]))
    header = ("arch", "sae", *[COLUMN_NAMES.get(m, m) for m in shown], "run_name", "run_id")
    rows = [header] + [(t.arch, " ".join(f"{k}={v}" for k, v in sorted(t.sae.items()) if k != "d_in"),
                        *(fmt(t.metrics.get(m)) for m in shown), t.run_name, t.run_id) for t in front]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


COLUMN_NAMES = {"dead_fraction": "dead", "ce_loss_recovered": "ce_rec"}
"""Short table headers of the usual metrics."""


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
