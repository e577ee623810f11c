"""Packing a sweep's trials into groups: trials that read the same data (the sweep's store and hook, and the
same steps, batch size, seed and initial estimates: ``training.SHARED_TRAIN``) train together on one pass
over the store, one Tune trial per group (``training.run_loop`` with several members). Every SAE keeps its
own MLflow child run and folder, so the frontier and the correct-L0 diagnostic see each one, and a member
that fails (impossible values, a NaN loss) fails alone.

When it packs (``SweepSpec.pack``, on by default; ``--no-pack`` turns it off): with the FIFO scheduler
(ASHA stops trials one by one, so they must stay trials), and only when the sweep has more trials than the
cluster runs at once (its CPUs / ``cpus_per_trial``: the slots). Packing saves each extra read of the
store and each trial's start (actor, store, MLflow), but a group trains its members one after another on
one trial's CPUs, so each set of compatible trials gets a share of the slots in proportion to its size
(never fewer groups than slots overall) and members are dealt to groups largest first, by d_sae x steps.
With repeats (``samples`` > 1) each repeat draws one seed for all its trials, so a repeat packs.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import defaultdict
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from workflows.training import SHARED_TRAIN, Member, Run, build_trainer, start_job_tracking, train_group_local

logger = logging.getLogger(__name__)


def trial_configs(spec: Any) -> list[dict[str, Any]]:
    """Every trial's knob values, as Tune's grid would run them (one seed per repeat with ``samples`` > 1)."""
    rng = random.Random()
    configs = []
    for _ in range(spec.samples):
        seed = {"seed": rng.randrange(2**31 - 1)} if spec.samples > 1 and "seed" not in spec.grid else {}
        for arch in spec.archs:
            for values in itertools.product(*spec.grid.values()):
                configs.append({"arch": arch, **dict(zip(spec.grid, values, strict=True)), **seed})
    return configs


def pack_key(spec: Any, config: Mapping[str, Any]) -> Hashable | None:
    """What a trial shares with the trials it may train beside; None when its job cannot be built (it then
    runs alone, and fails in its own trial as it would unpacked)."""
    from workflows.sweep import job_for

    try:
        job = job_for(spec, config, out="unused")
    except Exception:
        return None
    return job.hook, job.train.steps, tuple(getattr(job.train, name) for name in SHARED_TRAIN)


def cost(spec: Any, config: Mapping[str, Any]) -> float:
    """A member's relative training cost: d_sae x steps (the GEMMs), for balancing groups."""
    d_sae = config.get("d_sae", spec.sets.get("d_sae", 1))
    return float(d_sae if isinstance(d_sae, (int, float)) else 1) * float(config.get("steps", spec.steps))


def deal(spec: Any, configs: list[dict[str, Any]], n_groups: int) -> list[list[dict[str, Any]]]:
    """``configs`` in ``n_groups`` groups of about equal cost (largest first, each to the lightest group)."""
    groups: list[list[dict[str, Any]]] = [[] for _ in range(n_groups)]
    loads = [0.0] * n_groups
    for config in sorted(configs, key=lambda c: -cost(spec, c)):
        lightest = loads.index(min(loads))
        groups[lightest].append(config)
        loads[lightest] += cost(spec, config)
    return [group for group in groups if group]


def plan_groups(spec: Any, slots: int) -> list[list[dict[str, Any]]] | None:
    """The sweep's trials in groups, or None when packing is off or would not save time (module docstring)."""
    if not spec.pack or spec.scheduler != "fifo":
        return None
    configs = trial_configs(spec)
    if len(configs) <= slots:
        return None
    compatible: dict[Hashable, list[dict[str, Any]]] = defaultdict(list)
    groups: list[list[dict[str, Any]]] = []
    for config in configs:
        key = pack_key(spec, config)
        if key is None:
            groups.append([config])
        else:
            compatible[key].append(config)
    for members in compatible.values():
        n_groups = min(len(members), max(1, round(slots * len(members) / len(configs))))
        groups += deal(spec, members, n_groups)
    return groups if len(groups) < len(configs) else None


# -- inside each group's Tune trial ---------------------------------------------------------------------
def run_group_trial(config: dict[str, Any], *, spec: dict[str, Any], groups: list[list[dict[str, Any]]],
                    parent_run_id: str, uri: str) -> None:
    """One Tune trial training a group on one pass over the store: a child MLflow run and a folder per member."""
    import torch
    from ray import tune

    from workflows.sweep import SweepSpec

    sweep = SweepSpec(**spec)
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))  # Ray sets OMP_NUM_THREADS=1 in actors
    trial = tune.get_context()
    configs = groups[config["group"]]
    tags = {"sweep_trial": "true", "trial_id": trial.get_trial_id(), "trial_name": trial.get_trial_name(),
            "packed_group": str(config["group"]), "group_size": str(len(configs))}
    members: list[Member] = []
    try:
        for member_config in configs:
            member = start_member(sweep, member_config, tags, members[0].run.source if members else None,
                                  parent_run_id, uri)
            if member is not None:
                members.append(member)
        results = train_group_local(members, isolate=True) if members else []
        finished = sum(measure(sweep, m) for m, result in zip(members, results, strict=True) if result is not None)
    except BaseException as exc:
        for m in members:
            if not m.tracker.inner.ended:
                m.tracker.inner.fail(exc)
        raise
    tune.report({"step": sweep.steps, "held_out": 1, "members": len(configs), "finished": finished})


def start_member(sweep: Any, config: Mapping[str, Any], tags: dict[str, str], source: Any, parent_run_id: str,
                 uri: str) -> Member | None:
    """A member's run (on the group's shared source), trainer and MLflow child run; None, with its run FAILED,
    when its values are impossible (k > d_sae, ...)."""
    from workflows.sweep import RunHeldOpen, job_for, run_name_for
    from workflows.tracking import MlflowTracker

    name = run_name_for(config)
    out = str(Path(sweep.out) / "saes" / f"{name}-{tags['trial_id']}")
    try:
        run = Run(job_for(sweep, config, out), source=source)
    except Exception as exc:
        tracker = MlflowTracker.create(uri, sweep.experiment, name, {**tags, "hook": sweep.hook}, parent_run_id)
        tracker.log_params({"arch": config["arch"], "sweep": dict(config)})
        tracker.fail(exc)
        logger.warning("trial %s failed: %s", name, exc)
        return None
    tracker = start_job_tracking(run, uri=uri, experiment=sweep.experiment, run_name=name, parent_run_id=parent_run_id,
                                 extra_params={"sweep": dict(config)})
    tracker.set_tags(tags)
    return Member(run, build_trainer(run.job, run.widths), RunHeldOpen(tracker))


def measure(sweep: Any, member: Member) -> bool:
    """After training: CE loss recovered when the sweep names a model, then the member's run ends FINISHED."""
    job, tracker = member.run.job, member.tracker.inner
    if sweep.model:
        from workflows.evaluate import ce_loss_recovered

        value = float(ce_loss_recovered(Path(job.out), model=sweep.model, hook=job.hook))
        tracker.log_metrics({"final/ce_loss_recovered": value}, step=job.train.steps)
    tracker.end("FINISHED")
    return True
