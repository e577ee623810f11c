"""What a frontier shows besides the Pareto points: the correct-L0 diagnostic's pick per architecture and
width (sae_core.l0_diagnostic), the plot, and where it all goes in MLflow (the sweep's parent run, with a
description pointing at the files).

Trials log the diagnostic as ``final/decoder_cosine`` and ``final/decoder_projection`` (what
``sae_core.l0_diagnostic.diagnostic_metrics`` returns, logged with the other held-out metrics); the
pick reads ``decoder_cosine`` (the paper's c_dec) against ``l0`` within each (architecture, d_sae)
group that has at least two L0s.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_core.l0_diagnostic import L0Pick, pick_l0
from workflows.frontier import KINDS, FrontierKind, Trial, frontier, write_frontier_files
from workflows.links import describe_run, runs_view_url

DIAGNOSTIC_METRIC = "decoder_cosine"
"""The held-out metric (``final/decoder_cosine``) the pick reads."""


@dataclass(kw_only=True)
class GroupPick:
    """The diagnostic's pick for one architecture at one width."""

    arch: str
    """Architecture."""
    d_sae: str
    """Width (as logged)."""
    pick: L0Pick
    """The picked L0, its interval and confidence."""
    trials: list[Trial]
    """The group's trials that logged the diagnostic."""

    def nearest(self) -> Trial:
        """The group's trial whose L0 is nearest the pick (in log L0)."""
        return min(self.trials, key=lambda t: abs(math.log(t.metrics["l0"] / self.pick.l0)))


def l0_picks(trials: list[Trial], metric: str = DIAGNOSTIC_METRIC) -> list[GroupPick]:
    """One :class:`GroupPick` per (architecture, d_sae) whose trials logged ``metric`` at two L0s or more."""
    groups: dict[tuple[str, str], list[Trial]] = {}
    for trial in trials:
        if trial.metrics.get(metric) is not None and trial.metrics.get("l0", 0) > 0:
            groups.setdefault((trial.arch, trial.sae.get("d_sae", "?")), []).append(trial)
    picks = []
    for (arch, d_sae), members in sorted(groups.items()):
        pick = pick_l0([(t.metrics["l0"], t.metrics[metric]) for t in members], metric)
        if pick is not None:
            picks.append(GroupPick(arch=arch, d_sae=d_sae, pick=pick, trials=members))
    return picks


def pick_rows(picks: list[GroupPick]) -> list[dict[str, Any]]:
    return [{"arch": p.arch, "d_sae": p.d_sae, "metric": p.pick.metric, "l0": round(p.pick.l0, 4),
             "low": p.pick.low, "high": p.pick.high, "confidence": round(p.pick.confidence, 3),
             "at_edge": p.pick.at_edge or "", "trials": len(p.trials), "nearest_run_id": p.nearest().run_id}
            for p in picks]


def format_picks(picks: list[GroupPick]) -> str:
    """One line per group: the L0 the diagnostic picks and how sure it is."""
    lines = []
    for p in picks:
        where = (f"at the {p.pick.at_edge} end of the sweep: extend it" if p.pick.at_edge
                 else f"between {p.pick.low:.3g} and {p.pick.high:.3g}, confidence {p.pick.confidence:.2f}")
        lines.append(f"{p.arch} d_sae={p.d_sae}: L0 {p.pick.l0:.3g} ({where}; nearest trial {p.nearest().run_name})")
    return "\n".join(lines)


def plot_frontiers(trials: list[Trial], path: Path, kinds: tuple[FrontierKind, ...] = KINDS,
                   picks: list[GroupPick] | None = None) -> Path:
    """Every trial coloured by architecture, each frontier as a step line; the diagnostic's picked trial per
    group as a star (and, on an L0 axis, a dotted line at the picked L0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = tuple(kind for kind in kinds if frontier(trials, kind)[0])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    colour = {arch: f"C{i}" for i, arch in enumerate(sorted({t.arch for t in trials}))}
    for ax, kind in zip(axes[0], kinds, strict=True):
        candidates, front = frontier(trials, kind)
        for arch, c in colour.items():
            points = [kind.values(t) for t in candidates if t.arch == arch]
            if points:
                ax.scatter(*zip(*points, strict=True), label=arch, color=c, alpha=0.8, zorder=2)
        ax.step(*zip(*(kind.values(t) for t in front), strict=True), where="post", color="black", linewidth=1.2,
                label="Pareto frontier", zorder=1)
        ax.scatter(*zip(*(kind.values(t) for t in front), strict=True), facecolors="none", edgecolors="black", s=90,
                   zorder=3)
        mark_picks(ax, kind, picks or [], colour)
        ax.set(xlabel=kind.x.label, ylabel=kind.y.label,
               title=f"{kind.name}: {len(front)} of {len(candidates)} on the frontier")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mark_picks(ax, kind: FrontierKind, picks: list[GroupPick], colour: dict[str, str]) -> None:
    for p in picks:
        values = kind.values(p.nearest())
        if values is not None:
            ax.scatter(*values, marker="*", s=260, color=colour.get(p.arch, "C9"), edgecolors="black", zorder=4)
        if kind.x.metric == "l0":
            ax.axvline(p.pick.l0, color=colour.get(p.arch, "C9"), linestyle=":", linewidth=1.2,
                       label=f"{p.arch} d_sae={p.d_sae}: correct L0 ~{p.pick.l0:.3g} (conf {p.pick.confidence:.2f})")


def publish(trials: list[Trial], kinds: tuple[FrontierKind, ...], uri: str, experiment: str) -> tuple[str, str]:
    """Log the frontier files to MLflow: into the sweep's parent run when every trial shares one, else into the
    experiment's ``frontier`` run (made once); describe where they are in that run's description.
    Returns (run id, artifact path)."""
    from workflows.tracking import MlflowTracker

    parents = {t.parent_run_id for t in trials}
    custom = kinds != KINDS
    artifact_path = f"frontier/{'_'.join(k.name for k in kinds)}" if custom else "frontier"
    if len(parents) == 1 and "" not in parents:
        tracker = MlflowTracker(uri, parents.pop())
    else:  # trials of several sweeps: one `frontier` run of the experiment holds the cross-sweep files
        tracker = frontier_run(uri, experiment)
    with tempfile.TemporaryDirectory() as tmp:
        write_frontier_files(trials, Path(tmp), kinds)
        tracker.log_artifacts(tmp, artifact_path)
    describe_frontier(uri, experiment, tracker.run_id)
    return tracker.run_id, artifact_path


def describe_frontier(uri: str, experiment: str, run_id: str) -> str:
    """Set run ``run_id``'s description to say where its frontier plot and tables are (every ``frontier*``
    artifact folder) and link the experiment's runs table; returns the markdown. Call it after logging
    the frontier files (``sae sweep``'s parent run, ``sae frontier``)."""
    note = frontier_note(uri, experiment, run_id)
    describe_run(uri, run_id, note)
    return note


def frontier_run(uri: str, experiment: str):
    """The experiment's run tagged ``frontier=true`` (created, FINISHED, the first time)."""
    from mlflow.tracking import MlflowClient

    from workflows.tracking import MlflowTracker

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    existing = client.search_runs([found.experiment_id], "tags.frontier = 'true'", max_results=1) if found else []
    if existing:
        return MlflowTracker(uri, existing[0].info.run_id)
    tracker = MlflowTracker.create(uri, experiment, "frontier", {"frontier": "true"})
    tracker.end("FINISHED")
    return tracker


def frontier_note(uri: str, experiment: str, run_id: str) -> str:
    """Markdown for a run's description listing the frontier files it holds (every ``frontier*`` folder)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    folders = [a.path for a in client.list_artifacts(run_id) if a.is_dir and a.path.startswith("frontier")]
    folders += [a.path for f in folders for a in client.list_artifacts(run_id, f) if a.is_dir]
    lines = ["**Sweep frontier** (Artifacts tab of this run):", ""]
    for folder in sorted(folders):
        names = sorted(a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, folder) if not a.is_dir)
        if names:
            lines.append(f"- `{folder}/`: plot `frontier.png`; tables {', '.join(f'`{n}`' for n in names if n != 'frontier.png')}")
    lines += ["", "`l0_picks.csv`: the L0 the correct-L0 diagnostic (decoder cosine, Chanin & Garriga-Alonso 2025) "
              "picks per architecture and width, when the trials logged it.", "",
              f"All runs of the experiment: {runs_view_url(uri, experiment)}"]
    return "\n".join(lines)
