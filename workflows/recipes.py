"""Recipes: typed Python functions returning the whole pipeline's configuration.

`sae run --recipe NAME [--set FIELD=VALUE ...]` picks one; `--set` overrides any field, with dotted
names reaching into the nested dicts (``--set sae.k=64``, ``--set train.steps=2000``).
A recipe is data, so it goes whole into MLflow params and is written beside the run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workflows.corpus import DEFAULT_CORPUS
from workflows.errors import UserError
from workflows.models import DEFAULT_MODEL
from workflows.options import DEFAULT_CONTEXT_SIZE


@dataclass(kw_only=True)
class Recipe:
    """One end-to-end run: collect -> train -> evaluate -> dashboards."""

    name: str
    """Recipe name (also the MLflow run name prefix)."""
    model: str = DEFAULT_MODEL
    """Base model spec (see `sae hooks`)."""
    corpus: str = DEFAULT_CORPUS
    """Text source."""
    hook: str = "blocks.6.hook_resid_post"
    """Hook point the SAE reads."""
    layers: list[int] | str = field(default_factory=list)
    """Transcoder sets: train one transcoder per layer's MLP (hook_mlp_in -> hook_mlp_out) instead of one SAE
    at ``hook``; a list or a range string ("0-5,8"). Empty: one SAE."""
    context_size: int = DEFAULT_CONTEXT_SIZE
    """Tokens per window."""
    tokens: int = 120_000
    """Training tokens to collect into the store."""
    store_dtype: str = "float16"
    """Storage dtype of the activations."""
    collect_workers: int = 1
    """Model actors collecting activations."""
    arch: str = "topk"
    """SAE architecture."""
    sae: dict[str, Any] = field(default_factory=lambda: {"d_sae": 4608, "k": 32})
    """Architecture fields."""
    train: dict[str, Any] = field(default_factory=lambda: {"steps": 600, "batch_size": 2048, "lr": 1e-3,
                                                            "log_every": 25, "dead_after_tokens": 500_000})
    """TrainConfig fields."""
    workers: int = 1
    """Ray Train workers."""
    cpus_per_worker: float = 2.0
    """CPUs per training worker (its torch threads)."""
    eval_tokens: int = 4096
    """Held-out tokens (fresh windows after the training ones) for CE loss recovered."""
    dashboard_features: int = 50
    """Dashboards for this many most active features."""
    dashboard_tokens: int = 20_000
    """Tokens scanned for dashboard examples."""
    sweep: dict[str, list[Any]] = field(default_factory=lambda: {"k": [16, 32, 64]})
    """Grid for `sae run --sweep` (knob -> values)."""
    sweep_steps: int = 300
    """Training steps per sweep trial."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """A copy with ``overrides`` applied; dotted keys reach into dict fields."""
        data = self.to_dict()
        fields = {f.name for f in dataclasses.fields(self)}
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            if head not in fields:
                raise UserError(f"recipe {self.name!r} has no field {head!r}; fields: {sorted(fields)}")
            if rest:
                if not isinstance(data[head], dict):
                    raise UserError(f"recipe field {head!r} is not a dict; use --set {head}=VALUE")
                data[head] = {**data[head], rest: value}
            else:
                data[head] = value
        return Recipe(**data)


def smollm2_topk() -> Recipe:
    """The default: SmolLM2-135M-Instruct, layer 6 residual stream (of 30), TopK 8x expansion.
    Sized to finish `make demo` on a 2-core CPU in well under 15 minutes."""
    return Recipe(name="smollm2-topk")


def smollm2_batchtopk() -> Recipe:
    """As the default with BatchTopK (saved as JumpReLU with its learned threshold)."""
    return Recipe(name="smollm2-batchtopk", arch="batchtopk")


def smollm2_jumprelu() -> Recipe:
    """As the default with a JumpReLU SAE and its L0 penalty."""
    return Recipe(name="smollm2-jumprelu", arch="jumprelu", sae={"d_sae": 4608, "l0_coefficient": 5e-3},
                  sweep={"l0": [2e-3, 5e-3, 1e-2]})


def smollm2_large() -> Recipe:
    """A cluster-sized run: 50M tokens, 16x expansion, 4 GPU workers."""
    return Recipe(name="smollm2-large", tokens=50_000_000, sae={"d_sae": 9216, "k": 64}, collect_workers=4,
                  train={"steps": 20_000, "batch_size": 4096, "lr": 4e-4, "log_every": 100,
                         "lr_decay_steps": 4000, "lr_warmup_steps": 500},
                  workers=4, eval_tokens=65_536, dashboard_tokens=1_000_000, dashboard_features=500,
                  sweep={"d_sae": [4608, 9216, 18432], "k": [32, 64, 128]}, sweep_steps=5000)


def smollm2_transcoders() -> Recipe:
    """A skip transcoder per MLP of SmolLM2 (all 30 layers; --set layers=0-3 for fewer), for circuit tracing
    (`sae attribute`). Each layer trains as its own Tune trial; sized for a cluster, not `make demo`."""
    return Recipe(name="smollm2-transcoders", layers="0-29", arch="skip_transcoder", tokens=60_000,
                  sae={"d_sae": 2304, "k": 32}, train={"steps": 400, "batch_size": 1024, "lr": 1e-3, "log_every": 25},
                  cpus_per_worker=1.0, dashboard_features=0)


def tiny_transcoders() -> Recipe:
    """`tiny` for transcoder sets (tests): every layer of a tiny model (--set model=...; --set layers=...)."""
    return Recipe(name="tiny-transcoders", layers="0-2", arch="skip_transcoder", context_size=32, tokens=2000,
                  store_dtype="float32", sae={"d_sae": 96, "k": 8}, cpus_per_worker=0.5, eval_tokens=256,
                  train={"steps": 40, "batch_size": 128, "lr": 3e-3, "log_every": 10}, dashboard_features=0)


def tiny() -> Recipe:
    """Seconds-scale settings for tests and CI; point ``model`` at a small model with --set model=..."""
    return Recipe(name="tiny", hook="blocks.1.hook_resid_post", context_size=32, tokens=3000, store_dtype="float32",
                  sae={"d_sae": 128, "k": 8}, train={"steps": 40, "batch_size": 128, "lr": 3e-3, "log_every": 10},
                  cpus_per_worker=0.5, eval_tokens=256, dashboard_features=5, dashboard_tokens=1000,
                  sweep={"k": [4, 8]}, sweep_steps=20)


RECIPES: dict[str, Callable[[], Recipe]] = {
    "smollm2-topk": smollm2_topk,
    "smollm2-batchtopk": smollm2_batchtopk,
    "smollm2-jumprelu": smollm2_jumprelu,
    "smollm2-large": smollm2_large,
    "smollm2-transcoders": smollm2_transcoders,
    "tiny": tiny,
    "tiny-transcoders": tiny_transcoders,
}


def get_recipe(name: str, overrides: dict[str, Any] | None = None) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]().with_overrides(overrides or {})


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` strings -> dict; values parsed as JSON when they are JSON, else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out
