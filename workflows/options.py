"""Command-line options made from config dataclasses, so each default and help text lives once: in the
field's default and the docstring under it. Options several commands share are declared here too.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import sae_core
from sae_core.architectures.base import Wiring
from sae_core.config import field_default, field_docs
from workflows.errors import UserError

DEFAULT_CONTEXT_SIZE = 128
"""Tokens per window, BOS included, wherever the model is run over text (collect, stream, e2e, eval)."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _base_type(cls: type, name: str) -> type:
    """int for ``int``, ``int | None`` and the like; the annotation's first non-None member."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def add_field_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                    fields: Iterable[str] | Mapping[str, str], *, required: Iterable[str] = (),
                    choices: Mapping[str, list[Any]] | None = None) -> None:
    """One flag per field of the dataclass ``cls``: ``--field-name`` (or the name ``fields`` maps it to),
    its type from the annotation, its default the field's default, its help the field's docstring.
    A bool field becomes a switch: ``--field-name`` when it is off by default, ``--no-field-name`` when it is
    on. ``required`` fields get no default and must be given."""
    names = dict(fields) if isinstance(fields, Mapping) else {f: f for f in fields}
    docs, required = field_docs(cls), set(required)
    for field, alias in names.items():
        kind, default = _base_type(cls, field), field_default(cls, field)
        help_text = docs.get(field, "")
        kwargs: dict[str, Any] = {"dest": field, "help": help_text}
        if kind is bool:  # a switch that turns the default around
            kwargs.update(action="store_false" if default else "store_true", default=bool(default))
            if default:
                alias, kwargs["help"] = f"no_{alias}", f"{help_text} (on by default; this turns it off)"
        elif field in required:
            kwargs.update(type=kind, required=True)
        else:
            shown = f" (default: {default})" if default is not None else ""
            kwargs.update(type=kind, default=default, help=f"{help_text}{shown}")
        if choices and field in choices:
            kwargs["choices"] = choices[field]
        parser.add_argument(flag_name(alias), **kwargs).field_of = cls  # type: ignore[attr-defined]


def field_values(args: argparse.Namespace, fields: Iterable[str]) -> dict[str, Any]:
    """The parsed values of flags made by :func:`add_field_flags` (by field name)."""
    return {field: getattr(args, field) for field in fields}


# -- the knobs every architecture interprets in its own way ---------------------------------------------
SPARSITY_KNOBS = {"d_sae": "d_sae", "k": "k", "l1": "l1_coefficient", "l0": "l0_coefficient"}
"""Short command-line names of the architecture fields most runs set (``--l1`` is ``l1_coefficient``)."""


def add_sae_knob_flags(parser: argparse.ArgumentParser) -> None:
    """--arch, --d-sae, --k, --l1, --l0: each an architecture field; their defaults are the architecture's."""
    parser.add_argument("--arch", default="topk", help=f"architecture: {', '.join(sae_core.names())} (default: topk)")
    for knob, field in SPARSITY_KNOBS.items():
        owners = [(name, sae_core.get(name)) for name in sae_core.names() if field in sae_core.get(name).fields]
        # The docstring of an architecture reading one site (where the field means the most) if one has it.
        plain = [spec for _, spec in owners if spec.wiring is Wiring.SITE] + [spec for _, spec in owners]
        doc = next((field_docs(spec.config_cls).get(field) for spec in plain), "")
        defaults = sorted({f"{field_default(spec.config_cls, field)}" for _, spec in owners} - {"<factory>"})
        shown = f"default: the architecture's ({', '.join(defaults)})" if defaults and field != "d_sae" else "required"
        where = "" if len(owners) == len(sae_core.names()) else f" [{', '.join(n for n, _ in owners)}]"
        kind = _base_type(owners[0][1].config_cls, field) if owners else float
        parser.add_argument(flag_name(knob), dest=f"knob_{knob}", type=kind, metavar=knob.upper(),
                            help=f"{doc}{where} ({shown})")


def knob_values(args: argparse.Namespace) -> dict[str, Any]:
    return {knob: getattr(args, f"knob_{knob}") for knob in SPARSITY_KNOBS}


def resolve_knobs(arch: str, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Knob values (None = not given) -> the architecture's config fields; a knob it lacks is an error."""
    fields = set(sae_core.get(arch).fields)
    resolved: dict[str, Any] = {}
    for knob, value in knobs.items():
        if value is None:
            continue
        field = SPARSITY_KNOBS.get(knob, knob)
        if field not in fields:
            raise UserError(f"architecture {arch!r} has no {knob!r} setting (its fields: {sorted(fields)})")
        resolved[field] = value
    return resolved


def parse_grid(items: list[str]) -> dict[str, list[object]]:
    """``--grid KNOB=V1,V2,...`` strings -> {knob: values}; values parsed as JSON when they are JSON."""
    grid: dict[str, list[object]] = {}
    for item in items:
        knob, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not knob.strip() or not values:
            raise UserError(f"--grid expects KNOB=V1,V2,..., got {item!r}")
        if knob.strip() in grid:
            raise UserError(f"--grid {knob.strip()} given twice; list all its values in one --grid")
        grid[knob.strip()] = [parse_value(v) for v in values]
    return grid


def parse_value(raw: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw



# -- options several commands share -----------------------------------------------------------------------
def add_mlflow_uri_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--mlflow-uri",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def add_tracking_flags(parser: argparse.ArgumentParser, *, experiment: str | None = "sae-ray",
                       experiment_required: bool = False, experiment_help: str = "MLflow experiment name") -> None:
    """--mlflow-uri and --experiment (required, or with the default ``experiment``)."""
    group = parser.add_argument_group("tracking")
    add_mlflow_uri_flag(group)
    if experiment_required:
        group.add_argument("--experiment", required=True, help=experiment_help)
    else:
        shown = f" (default: {experiment})" if experiment else ""
        group.add_argument("--experiment", default=experiment, help=f"{experiment_help}{shown}")


def add_context_size_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                          default: int | None = DEFAULT_CONTEXT_SIZE, note: str = "") -> None:
    shown = f"default: {default}" if default is not None else f"default: the SAE's, else {DEFAULT_CONTEXT_SIZE}"
    parser.add_argument("--context-size", type=int, default=default,
                        help=f"tokens per window, BOS included{note} ({shown})")


def add_model_workers_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--workers of the commands that run the model in a Ray Data actor pool (one model copy per actor)."""
    parser.add_argument("--workers", type=int, default=1, help="model actors in the Ray Data pool (default: 1)")
