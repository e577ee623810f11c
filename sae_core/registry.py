"""The architecture registry. Each file in ``sae_core/architectures`` calls :func:`register` at import,
and :func:`discover` imports them all, so adding an architecture is adding one file.

An architecture can also live outside this package: name its module in the environment variable
``SAE_RAY_ARCHITECTURES`` (comma-separated module names, importable from ``sys.path``) or declare it
under the ``sae_ray.architectures`` entry-point group of an installed package.

Everything the rest of the project needs to know about an architecture is on its :class:`ArchSpec`:
what it reads and writes (``wiring``), whether it resamples dead latents, its config class. Code that
feeds, trains or evaluates SAEs asks the spec, never the name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_core.architectures.base import SAEConfig, SparseAutoencoder, Wiring

logger = logging.getLogger(__name__)

PLUGINS_ENV = "SAE_RAY_ARCHITECTURES"
ENTRY_POINT_GROUP = "sae_ray.architectures"


class RegistryError(ValueError):
    """An architecture name that is not registered."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    config_cls: type[SAEConfig]
    model_cls: type[SparseAutoencoder]
    summary: str

    @property
    def wiring(self) -> Wiring:
        """What the architecture reads from the model and writes back."""
        return self.model_cls.wiring

    @property
    def can_resample(self) -> bool:
        """Whether the module re-initialises dead latents during training (``resample_dead``)."""
        from sae_core.architectures.base import SparseAutoencoder

        return self.model_cls.resample_dead is not SparseAutoencoder.resample_dead

    @property
    def fields(self) -> list[str]:
        """The config's field names."""
        import dataclasses

        return [f.name for f in dataclasses.fields(self.config_cls)]


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
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RegistryError(f"{PLUGINS_ENV} names module {module!r}, which cannot be imported: {exc}") from exc
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


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
