"""The `sae` entry point loads every subcommand module; one broken import would break every command."""

from __future__ import annotations

import subprocess
import sys

from workflows.cli import build_parser

EXPECTED = {"attribute", "bench", "collect", "dashboard", "eval", "export", "frontier", "hooks", "import", "run", "steer", "store",
            "sweep", "synth", "train", "ui"}


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert EXPECTED <= set(sub.choices), sorted(EXPECTED - set(sub.choices))


def test_console_entry_point_help_runs():
    result = subprocess.run([sys.executable, "-m", "workflows.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


def test_flag_defaults_and_help_are_the_config_fields():
    """Each default lives once: a flag made from a config field has that field's default and docstring, and
    no hand-written flag restates a training or distribution field."""
    import argparse
    import dataclasses

    from sae_core.config import field_default, field_docs
    from sae_core.trainer import TrainConfig
    from workflows.activations import CollectConfig
    from workflows.sweep import SweepSpec
    from workflows.train_ray import DistributedOptions

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    expected = {"train": {"steps", "batch_size", "lr", "seed", "use_gpu", "cpus_per_worker", "checkpoint_every",
                          "max_failures", "data", "loss", "downstream_coefficient"},
                "sweep": {"samples", "scheduler", "asha_metric", "steps", "batch_size", "lr", "cpus_per_trial",
                          "model", "pack"}}
    shared = {"workers", "experiment", "mlflow_uri"}  # declared once in workflows/options.py, checked below
    watched = {f.name for cls in (TrainConfig, DistributedOptions) for f in dataclasses.fields(cls)} - shared
    for command, fields in expected.items():
        generated = {a.dest: a for a in sub[command]._actions if hasattr(a, "field_of")}
        assert fields <= set(generated), (command, fields - set(generated))
        for dest, action in generated.items():
            if not action.required:
                assert action.default == field_default(action.field_of, dest), (command, dest, action.default)
            assert action.help.startswith(field_docs(action.field_of)[dest]), (command, dest)
        by_hand = {a.dest for a in sub[command]._actions if not hasattr(a, "field_of")}
        assert not by_hand & watched, (command, by_hand & watched)
    for command in ("train", "collect"):
        context = next(a for a in sub[command]._actions if a.dest == "context_size")
        assert context.default == field_default(CollectConfig, "context_size")
    assert field_default(SweepSpec, "batch_size") == field_default(TrainConfig, "batch_size")
    experiment = next(a for a in sub["train"]._actions if a.dest == "experiment")
    assert experiment.default == field_default(DistributedOptions, "experiment")
    for knob in ("knob_k", "knob_l1", "knob_l0"):  # the architecture decides these defaults
        action = next(a for a in sub["train"]._actions if a.dest == knob)
        assert action.default is None and "the architecture's" in action.help
