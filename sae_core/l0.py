"""Holding an SAE at a target L0 (mean number of active latents per token), for every architecture.

Each architecture meets ``target_l0`` (the field group :class:`TargetL0Fields`) its own way:

- TopK family (and transcoders/crosscoders with a topk activation): ``k`` is the L0 by construction;
- jumprelu (and jumprelu transcoders): the L0 penalty becomes a target loss
  ``target_l0_coefficient * (L0_batch / target - 1)^2`` (the STE-trained L0 of the batch, as in the
  JumpReLU literature's target-sparsity variant), which pulls L0 towards the target from both sides.
  Adam moves each log-threshold by at most about lr per step, while the encoder moves the pre-activations
  by up to about lr x |x| = lr x sqrt(d_in): thresholds starting at ``init_threshold`` needed 1200 steps
  at lr 3e-3 to reach target 12 on the synthetic benchmark, and on SmolLM2 blocks.6 (d_sae 1152, target
  32) the L0 was still 130 after 400 steps. So with a target the thresholds start at it (each latent's
  (1 - target / d_sae) quantile of pre-activations on the init sample: ``init_from_sample``, initial L0
  = the target) and train at ``target_l0_threshold_lr`` (10) times the learning rate. At 1x the encoder
  outruns them (the synthetic L0 fell from 12 to 4 within 100 steps, 8.4 at step 400; SmolLM2 ended at
  18 after 300 steps); at 10x it lands 12.5 in 400 steps and 32.8 held-out on SmolLM2 in 200 steps of
  256 at lr 2e-3; at 30x latents die (30% dead on the synthetic benchmark);
- kl_sparse: rho = target_l0 / d_sae (its sigmoid latents are never exactly zero; see kl_sparse.py);
- relu and gated (and relu transcoders/crosscoders): the penalty has no L0 it aims at, so the trainer
  adapts the sparsity coefficient with :class:`SparsityController`.

Controller dynamics. The controller keeps a multiplier m on the architecture's own coefficient
(l1_coefficient x m is what the loss uses) and after every step integrates the error of the batch L0:

    e = clip(EMA_0.9(log(L0 + 1)) - log(target + 1), -1, 1)        log m  <-  log m + g * e,   g = gain * lr / 1e-3

L0 falls as m grows, so this is an integral controller on log m: at its fixed point the smoothed L0
equals the target, whatever coefficient that takes (the configured coefficient is only the starting
guess). Working in logs makes the step relative (a 10% error moves m by about g x 10% whether m is
1e-3 or 10); +1 keeps the error finite when nothing fires; the clip bounds m's change to a factor e^g
per step while the L0 is far off. The SAE follows a change of m only as fast as the optimizer moves
its weights, which Adam bounds by the learning rate: the response lags by a time tau proportional to
1/lr (hundreds of steps at lr 4e-4), so the gain is scaled by the learning rate, keeping g x tau, and
with it the damping, the same at every lr. With g x tau well above ~1 the loop rings: m overshoots
while the L0 is still catching up, the L0 then falls below the target (ReLU latents die and come back
slowly), and the cycle repeats; the pure-integral design with the default gain 0.005 settles on the
synthetic benchmark (d=32, 128 latents, target 12) within ~300 steps at lr 3e-3 without ringing
(tested: tests/core/test_l0.py) and at lr 4e-4 undershoots once (to ~L0 5 at step 800) before settling
near the target by ~2000 steps. A target far from the configured coefficient's natural L0 takes
longer: start from a coefficient near the one expected, or lower the gain for long low-lr runs. Under
data parallelism the L0 is summed over ranks through ``reduce`` before the update, so every rank holds
the same multiplier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sae_core.architectures.base import Reducer, SAEConfig, require


@dataclass(kw_only=True)
class TargetL0Fields:
    """The L0 target every architecture accepts, and the knobs of the two ways of holding it."""

    target_l0: float | None = None
    """Mean number of active latents per token to hold; None keeps the architecture's own sparsity
    setting. TopK-style activations take it as k, jumprelu as a target loss, kl_sparse as rho, relu and
    gated through the trainer's coefficient controller (sae_core/l0.py)."""
    target_l0_gain: float = 0.005
    """Coefficient controller (relu, gated): per step, log(multiplier) moves by gain x (lr / 1e-3) x
    log((L0 + 1) / (target + 1)) (sae_core/l0.py describes the dynamics)."""
    target_l0_coefficient: float = 1.0
    """jumprelu activations: weight of the target loss (L0 / target_l0 - 1)^2."""
    target_l0_threshold_lr: float = 10.0
    """jumprelu activations: learning rate of the log-thresholds as a multiple of the configured one, so
    they keep up with the encoder while it trains (sae_core/l0.py)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        d_sae = self.d_sae  # type: ignore[attr-defined]
        target = self.target_l0
        require(target is None or (isinstance(target, (int, float)) and 0 < target <= d_sae),
                f"target_l0 must be in (0, d_sae={d_sae}] or None, got {target!r}")
        require(self.target_l0_gain > 0, f"target_l0_gain must be > 0, got {self.target_l0_gain}")
        require(self.target_l0_coefficient > 0, f"target_l0_coefficient must be > 0, got {self.target_l0_coefficient}")
        require(self.target_l0_threshold_lr > 0,
                f"target_l0_threshold_lr must be > 0, got {self.target_l0_threshold_lr}")

    def controlled_target(self) -> float | None:
        """The L0 the trainer must hold by adapting the sparsity coefficient; None when the architecture
        meets ``target_l0`` itself (k, a target loss, rho) or no target is set."""
        return self.target_l0

    def target_as_k(self) -> int:
        """``target_l0`` as a TopK ``k`` (rounded, at least 1)."""
        return max(1, round(float(self.target_l0)))  # type: ignore[arg-type]


class NullController:
    """No target: the coefficient stays as configured (multiplier 1)."""

    multiplier = 1.0

    def update(self, fire_counts_F: Tensor, n_rows: int, reduce: Reducer) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SparsityController(NullController):
    """Integral control of the sparsity coefficient's log-multiplier from the batch L0 (module docstring)."""

    MAX_LOG_MULTIPLIER = 25.0
    """|log m| bound: a target the architecture cannot reach saturates instead of overflowing."""
    REFERENCE_LR = 1e-3
    """The learning rate at which ``gain`` is the integral gain per step (it scales with lr / this)."""
    SMOOTHING = 0.9
    """EMA momentum of log(L0 + 1): the batch L0 is noisy."""

    def __init__(self, target_l0: float, gain: float, lr: float = REFERENCE_LR):
        self.log_target = math.log(float(target_l0) + 1.0)
        self.gain = float(gain) * lr / self.REFERENCE_LR
        self.log_multiplier = 0.0
        self.smoothed: float | None = None

    @property
    def multiplier(self) -> float:  # type: ignore[override]
        return math.exp(self.log_multiplier)

    @torch.no_grad()
    def update(self, fire_counts_F: Tensor, n_rows: int, reduce: Reducer) -> None:
        fired = reduce(fire_counts_F.sum().float(), "sum")
        rows = reduce(torch.tensor(float(n_rows), device=fire_counts_F.device), "sum")
        log_l0 = math.log(float(fired) / max(float(rows), 1.0) + 1.0)
        m = self.SMOOTHING
        self.smoothed = log_l0 if self.smoothed is None else m * self.smoothed + (1 - m) * log_l0
        step = self.gain * min(max(self.smoothed - self.log_target, -1.0), 1.0)
        bound = self.MAX_LOG_MULTIPLIER
        self.log_multiplier = min(max(self.log_multiplier + step, -bound), bound)

    def metrics(self) -> dict[str, float]:
        return {"sparsity_multiplier": self.multiplier}

    def state_dict(self) -> dict[str, Any]:
        return {"log_multiplier": self.log_multiplier, "smoothed": self.smoothed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_multiplier = float(state.get("log_multiplier", 0.0))
        self.smoothed = state.get("smoothed")


def sparsity_controller(cfg: SAEConfig, lr: float = SparsityController.REFERENCE_LR) -> NullController:
    """The controller the trainer runs for this config: a :class:`SparsityController` when the
    architecture holds its target through its coefficient, else a :class:`NullController`."""
    target = cfg.controlled_target() if isinstance(cfg, TargetL0Fields) else None
    if target is None:
        return NullController()
    return SparsityController(target, cfg.target_l0_gain, lr)  # type: ignore[attr-defined]
