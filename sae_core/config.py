"""What every config dataclass of the project shares: the error type, validation, strict ``from_dict``,
and the field docstrings that front-ends turn into help text.

Configs are ``@dataclass(kw_only=True)`` classes with a docstring under each field. Python keeps no
runtime record of those docstrings, so :func:`field_docs` reads them from the class's source.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config field with a bad value; the message names the field."""


class ReasonedError(ValueError):
    """Bad input whose message says what is wrong in library terms, with a ``reason`` code naming the kind
    of problem so a front-end can add its own advice (a flag to change, a command to run): the library
    never names the front-end's flags or commands."""

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def reject_unknown(cls: type, raw: dict[str, Any], what: str) -> None:
    """Refuse keys of ``raw`` that are not fields of the dataclass ``cls``, naming them and the valid ones."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; valid: {sorted(fields)}")


def strict_from_dict(cls: type[T], raw: dict[str, Any], what: str) -> T:
    """``cls(**raw)`` after :func:`reject_unknown`; a missing required field is a ConfigError too."""
    reject_unknown(cls, raw, what)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing {what} field(s) {missing}")
    return cls(**raw)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it, over the whole class hierarchy (a subclass's
    docstring for a redefined field wins). Fields without a docstring are absent."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined interactively: no source to read
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, following in zip(body, body[1:], strict=False):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and \
                isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and \
                isinstance(following.value.value, str):
            docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (a factory is called); MISSING when it has none."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING
