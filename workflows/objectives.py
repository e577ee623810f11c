"""What a training job minimises. An objective turns batches from its source into optimizer updates
(``Trainer.update`` under the hood), draws the initialisation sample, and evaluates the trained SAE:

- :class:`Reconstruction` (``loss="mse"``): reconstruct activations (from a store or the live stream);
- ``EndToEnd`` (``loss="e2e"``, workflows/e2e.py): the model's next-token KL with the SAE spliced in,
  trained on token windows.

An objective refuses the architectures it cannot train (``check``), asking the architecture's spec.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_core.architectures.base import Wiring
from sae_core.l0_diagnostic import diagnostic_metrics
from sae_core.trainer import Trainer, evaluate
from workflows.job import TrainJob


@dataclass
class Evaluation:
    """Held-out metrics of a trained SAE and any files to publish with it (name -> bytes)."""

    metrics: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


class Reconstruction:
    """Mean-squared reconstruction of the activations the source yields (each architecture adds its own
    sparsity and auxiliary terms); held-out metrics on the source's held-out rows."""

    name = "mse"
    needs = "activations"

    def check(self, job: TrainJob) -> None:
        """Every wiring can be trained to reconstruct."""

    def prepare(self, job: TrainJob, source: Any) -> None:
        """Nothing to check against the data beyond what the source checked."""

    def params(self, job: TrainJob) -> dict[str, Any]:
        return {"loss": self.name}

    def bind(self, job: TrainJob, source: Any, device: torch.device) -> None:
        """Nothing to load: the activations come from the source."""

    def init_sample(self, source: Any, n_tokens: int):
        return source.init_sample(n_tokens)

    def step_fn(self, trainer: Trainer) -> Callable[[Any], dict[str, float]]:
        return trainer.step

    def evaluate(self, job: TrainJob, trainer: Trainer, source: Any) -> Evaluation:
        held_out = source.held_out()
        x, targets = held_out if isinstance(held_out, tuple) else (held_out, None)
        metrics = evaluate(trainer.sae, x, scaling_factor=trainer.scaling_factor, targets_NO=targets,
                           output_scaling_factor=trainer.output_scaling_factor)
        if job.wiring is not Wiring.STACKED:  # the correct-L0 diagnostic reads one [F, D] decoder
            metrics.update(diagnostic_metrics(trainer.sae, x, scaling_factor=trainer.scaling_factor))
        return Evaluation(metrics)


def objective_for(job: TrainJob):
    """The objective named by ``job.loss``, checked against the job's architecture."""
    if job.loss == "e2e":
        from workflows.e2e import EndToEnd

        objective = EndToEnd()
    else:
        objective = Reconstruction()
    objective.check(job)
    return objective


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode()
