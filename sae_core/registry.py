"""The architecture registry. Each file in ``sae_core/architectures`` calls :func:`register` at import,
and :func:`discover` imports them all, so adding an architecture is adding one file."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_core.architectures.base import SAEConfig, SparseAutoencoder


class RegistryError(ValueError):
    """An architecture name that is not registered."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    config_cls: type[SAEConfig]
    model_cls: type[SparseAutoencoder]
    summary: str


_REGISTRY: dict[str, ArchSpec] = {}
_DISCOVERED = False


def register(name: str, config_cls: type[SAEConfig], model_cls: type[SparseAutoencoder], summary: str) -> None:
    if name in _REGISTRY and _REGISTRY[name].model_cls is not model_cls:
        raise RegistryError(f"architecture {name!r} is registered twice")
    config_cls.arch = name
    model_cls.arch = name
    _REGISTRY[name] = ArchSpec(name, config_cls, model_cls, summary)


def discover() -> None:
    """Import every module under ``sae_core.architectures`` once."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    from sae_core import architectures

    for info in sorted(pkgutil.iter_modules(architectures.__path__), key=lambda m: m.name):
        importlib.import_module(f"{architectures.__name__}.{info.name}")
    _DISCOVERED = True


def names() -> list[str]:
    discover()
    return sorted(_REGISTRY)


def get(name: str) -> ArchSpec:
    discover()
    if name not in _REGISTRY:
        raise RegistryError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_config(name: str, **fields: Any) -> SAEConfig:
    return get(name).config_cls.from_dict(fields)


def build(cfg: SAEConfig) -> SparseAutoencoder:
    return get(cfg.arch).model_cls(cfg)
