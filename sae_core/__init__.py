"""sae_core: a pure-PyTorch sparse autoencoder library (torch, numpy, safetensors; no Ray, no MLflow)."""

from sae_core.architectures.base import ConfigError, SAEConfig, SAEOutput, SparseAutoencoder
from sae_core.registry import ArchSpec, RegistryError, build, get, make_config, names

__all__ = [
    "ArchSpec",
    "ConfigError",
    "RegistryError",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "build",
    "get",
    "make_config",
    "names",
]
