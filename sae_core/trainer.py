"""The training step and loop: any iterator of activation batches in, metric dicts out.

Data parallelism stays outside: a caller running under DDP passes the wrapped module as
``forward_module`` and a ``reduce`` that all-reduces across ranks; everything estimated from data
(scaling factor, b_dec init, dead-latent counters, running thresholds) goes through ``reduce`` so
every rank holds the same state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae_core import metrics
from sae_core.architectures.base import Reducer, SAEOutput, SparseAutoencoder, no_reduce
from sae_core.config import require, strict_from_dict
from sae_core.l0 import sparsity_controller

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainConfig:
    """How to train; the SAE's own hyperparameters live in its architecture config."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 4096
    """Tokens per step (global, over all data-parallel ranks)."""
    lr: float = 4e-4
    """Peak Adam learning rate."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1, beta2."""
    lr_warmup_steps: int = 0
    """Linear LR warm-up from 0 over this many steps."""
    lr_decay_steps: int = 0
    """Linear LR decay to 0 over the last this-many steps."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the sparsity coefficient from 0 over this many steps."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; None disables."""
    normalize_activations: bool = True
    """Scale inputs so their mean squared norm is d_in; the factor is folded into the weights at save."""
    b_dec_init: str = "geometric_median"
    """Initialise b_dec to the "geometric_median", the "mean" of a sample, or "zeros"."""
    init_sample_tokens: int = 8192
    """Tokens used to estimate the scaling factor and b_dec at the start."""
    dead_after_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (AuxK, resampling, metrics)."""
    autocast_bf16: bool = False
    """Run forward and backward under bf16 autocast (weights and Adam stay fp32)."""
    log_every: int = 50
    """Yield a metrics dict every this many steps (and on the last step)."""
    seed: int = 0
    """Seed for initialisation."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.b_dec_init in ("geometric_median", "mean", "zeros"),
                f"b_dec_init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")
        require(self.lr_warmup_steps >= 0 and self.lr_decay_steps >= 0, "LR warm-up/decay steps must be >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip}")
        require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        self.adam_betas = tuple(self.adam_betas)

    def to_dict(self) -> dict[str, Any]:
        """JSON-clean (tuples as lists), so a saved config compares equal to a fresh one."""
        return {**dataclasses.asdict(self), "adam_betas": list(self.adam_betas)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        return strict_from_dict(cls, raw, "training")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at ``step`` (0-based): linear warm-up, constant, linear decay."""
    factor = 1.0
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        factor = (step + 1) / cfg.lr_warmup_steps
    decay_start = cfg.steps - cfg.lr_decay_steps
    if cfg.lr_decay_steps and step >= decay_start:
        factor = min(factor, (cfg.steps - step) / cfg.lr_decay_steps)
    return factor


def geometric_median(points_ND: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    median_D = points_ND.mean(dim=0)
    for _ in range(iters):
        dist_N = (points_ND - median_D).norm(dim=1).clamp_min(1e-8)
        weights_N = 1.0 / dist_N
        new_D = (weights_N[:, None] * points_ND).sum(dim=0) / weights_N.sum()
        if (new_D - median_D).norm() <= tol * median_D.norm().clamp_min(1e-8):
            return new_D
        median_D = new_D
    return median_D


def param_groups(sae: SparseAutoencoder) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: everything at the configured learning rate (``lr_scale`` 1), then
    one group per parameter the architecture trains at a multiple of it (``SparseAutoencoder.lr_scales``)."""
    scales = sae.lr_scales()
    named = dict(sae.named_parameters())
    unknown = sorted(set(scales) - set(named))
    require(not unknown, f"lr_scales names no parameter of the SAE: {unknown}")
    rest = [{"params": [p for name, p in named.items() if name not in scales], "lr_scale": 1.0}]
    return rest + [{"params": [named[name]], "lr_scale": float(scale)} for name, scale in scales.items()]


class DeadLatentTracker:
    """Tokens since each latent last fired, kept identical across ranks through ``reduce``."""

    def __init__(self, d_sae: int, dead_after_tokens: int, device: torch.device | str = "cpu"):
        self.tokens_since_fired_F = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.dead_after_tokens = dead_after_tokens

    def update(self, fire_counts_F: Tensor, n_rows: int, reduce: Reducer) -> None:
        """Count a batch of ``n_rows`` rows in which latent f fired on ``fire_counts_F[f]`` rows (this rank's
        share); on the device, no host sync."""
        fired_F = reduce((fire_counts_F > 0).float(), "max") > 0
        n_tokens = reduce(torch.tensor(float(n_rows), device=fire_counts_F.device), "sum").long()
        self.tokens_since_fired_F.add_(n_tokens).masked_fill_(fired_F, 0)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired_F >= self.dead_after_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())


class Trainer:
    """Owns the optimizer and everything estimated during training; ``step`` does one update."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig, *, reduce: Reducer = no_reduce,
                 forward_module: nn.Module | None = None, world_size: int = 1):
        self.sae, self.cfg, self.reduce = sae, cfg, reduce
        self.forward_module = forward_module or sae
        self.world_size = world_size
        self.device = next(sae.parameters()).device
        # The fused kernel exists on CPU too and beats foreach there (benchmarks/kernels.py times both).
        self.optimizer = torch.optim.Adam(param_groups(sae), lr=cfg.lr, betas=cfg.adam_betas, fused=True)
        self.tracker = DeadLatentTracker(sae.cfg.d_sae, cfg.dead_after_tokens, self.device)
        self.l0_control = sparsity_controller(sae.cfg, cfg.lr)
        """Scales the sparsity coefficient to hold the config's ``target_l0`` (multiplier 1 without one)."""
        self.window = metrics.RunningMetrics()
        self.step_count = 0
        self.scaling_factor = 1.0
        self.output_scaling_factor: float | None = None
        """A transcoder's target scale (None until trained on (x, target) pairs)."""
        self.initialized = False

    # -- initialisation from data -----------------------------------------------------------------
    def _scale_for(self, sample: Tensor) -> float:
        """sqrt(d / mean squared norm) over rows of width d (a crosscoder's [N, S, D] counts N*S rows)."""
        rows = sample.reshape(-1, sample.shape[-1])
        sq_norm = self.reduce(rows.pow(2).sum(dim=1).sum(), "sum")
        count = self.reduce(torch.tensor(float(len(rows)), device=self.device), "sum")
        return math.sqrt(rows.shape[1] / float(sq_norm / count))

    @torch.no_grad()
    def initialize(self, sample_ND: Tensor | tuple[Tensor, Tensor]) -> None:
        """Estimate the scaling factor(s) and b_dec from a sample (each rank passes its own part); an
        (input, target) pair gives the target its own scaling factor and initialises b_dec from it."""
        sample_ND, target = sample_ND if isinstance(sample_ND, (tuple, list)) else (sample_ND, None)
        sample = sample_ND.to(self.device, torch.float32)
        if self.cfg.normalize_activations:
            self.scaling_factor = self._scale_for(sample)
        sample = inputs = sample * self.scaling_factor
        if target is not None:
            target = target.to(self.device, torch.float32)
            self.output_scaling_factor = self._scale_for(target) if self.cfg.normalize_activations else 1.0
            sample = target * self.output_scaling_factor
        if self.cfg.b_dec_init != "zeros":
            flat = sample.flatten(1)
            center = flat.mean(dim=0) if self.cfg.b_dec_init == "mean" else geometric_median(flat)
            # Ranks average their estimates so the initial weights agree everywhere.
            self.sae.b_dec.copy_((self.reduce(center, "sum") / self.world_size).view_as(self.sae.b_dec))
        self.sae.set_decoder_norm_to_unit_norm()
        self.sae.init_encoder_from_decoder()
        self.sae.init_from_sample(inputs, self.reduce, self.world_size)
        self.initialized = True

    # -- one step ---------------------------------------------------------------------------------
    def sparsity_scale(self) -> float:
        """The sparsity term's multiplier: the warm-up ramp times the L0 controller's multiplier."""
        warmup = 1.0
        if self.cfg.sparsity_warmup_steps:
            warmup = min(1.0, (self.step_count + 1) / self.cfg.sparsity_warmup_steps)
        return warmup * self.l0_control.multiplier

    def step(self, x_BD: Tensor | tuple[Tensor, Tensor]) -> dict[str, float] | None:
        """One optimizer step on a batch of raw activations, or on an (input, target) pair of batches
        for a transcoder. Returns the metrics of the steps since the last logged row on a logging step
        (every ``log_every`` steps and the last), None otherwise: between logs nothing waits for the device."""
        if not self.initialized:
            self.initialize(x_BD)
        self.window.begin_step()
        x_BD, target = x_BD if isinstance(x_BD, (tuple, list)) else (x_BD, None)
        x_BD = x_BD.to(self.device, torch.float32) * self.scaling_factor
        targets = {}
        if target is not None:
            out_scale = self.scaling_factor if self.output_scaling_factor is None else self.output_scaling_factor
            targets["target_BO"] = target.to(self.device, torch.float32) * out_scale

        def compute() -> tuple[Tensor, SAEOutput, Tensor]:
            out = self.forward_module(x_BD, dead_mask_F=self.tracker.dead_mask(), **targets)
            return out.loss(self.sparsity_scale()), out, x_BD

        loss, out = self.update(compute)
        self.window.add(loss, out, targets.get("target_BO", x_BD))
        return self.log_row() if self.is_log_step() else None

    def is_log_step(self, step: int | None = None) -> bool:
        """Whether a metrics row is due after ``step`` (1-based; default: the steps done so far)."""
        step = self.step_count if step is None else step
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    def log_row(self) -> dict[str, float]:
        """The metrics row of the steps since the last one (every rank must call it: it reduces)."""
        return {"step": self.step_count, **self.window.row(self.reduce, self.world_size),
                "dead_fraction": self.tracker.dead_fraction(), "lr": self.optimizer.param_groups[0]["lr"],
                **self.l0_control.metrics()}

    def update(self, compute: Callable[[], tuple[Tensor, SAEOutput, Tensor]]) -> tuple[Tensor, SAEOutput]:
        """One optimizer step on the loss ``compute()`` returns with the SAE's output it came from and the
        SAE's (normalised) inputs: the LR schedule, gradient projection and clipping, decoder
        renormalisation, running statistics, dead-latent tracking and resampling (which draws from the
        inputs). ``step`` uses it with the reconstruction loss; other losses (workflows/e2e.py) bring
        their own ``compute``. Nothing here waits for the device except on logging steps."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.step_count, self.cfg) * group["lr_scale"]
        self.sae.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
            loss, out, x_BD = compute()
        # Checked when a row is due only (a host sync): a non-finite step leaves non-finite weights, so the
        # loss of every later step is non-finite too.
        if self.is_log_step(self.step_count + 1) and not bool(torch.isfinite(loss.detach())):
            raise FloatingPointError(f"loss is {float(loss.detach())} at step {self.step_count + 1}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self._clipped_adam_step()
        self.sae.set_decoder_norm_to_unit_norm()
        self.sae.update_running_stats(out, self.reduce)
        fire_counts_F = out.fire_counts()
        self.tracker.update(fire_counts_F, x_BD.shape[0], self.reduce)
        self.l0_control.update(fire_counts_F, x_BD.shape[0], self.reduce)
        self._maybe_resample(x_BD.detach())
        self.step_count += 1
        return loss, out

    def _clipped_adam_step(self) -> None:
        """clip_grad_norm_ then Adam, with the clipping folded into the fused Adam kernel, which divides
        every gradient by ``grad_scale`` as it reads it (the hook AMP's GradScaler uses): the same update
        without clip_grad_norm_'s extra read-write pass over every gradient."""
        if self.cfg.grad_clip is not None:
            grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
            total_norm = nn.utils.get_total_norm(grads)
            self.optimizer.grad_scale = ((total_norm + 1e-6) / self.cfg.grad_clip).clamp_min(1.0)
        try:
            self.optimizer.step()
        finally:
            self.optimizer.grad_scale = None

    def _maybe_resample(self, x_BD: Tensor) -> None:
        every = self.sae.resample_interval()
        if every and self.step_count > 0 and self.step_count % every == 0:
            dead_F = self.tracker.dead_mask()
            if dead_F.any():
                self.sae.resample_dead(dead_F, x_BD)
                self._reset_adam_state(dead_F)
                self.tracker.tokens_since_fired_F[dead_F] = 0

    def _reset_adam_state(self, dead_F: Tensor) -> None:
        for param in self.sae.parameters():
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in state:
                    continue
                if param.shape[0] == dead_F.shape[0]:
                    state[key][dead_F] = 0
                elif param.dim() == 2 and param.shape[1] == dead_F.shape[0]:
                    state[key][:, dead_F] = 0

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, batches: Iterator[Any], on_step: Callable[[int], None] | None = None,
            step: Callable[[Any], dict[str, float]] | None = None) -> Iterator[dict[str, float]]:
        """Train until ``cfg.steps``; yield a metrics dict every ``log_every`` steps and at the end.

        ``step`` turns one batch into one optimizer update and returns its metrics row (at least on
        logging steps; None elsewhere is fine): :meth:`step` (reconstruction) by default; other
        objectives pass their own, built on :meth:`update`. ``on_step(step_count)`` runs after every
        update (checkpointing)."""
        step = step or self.step
        for batch in batches:
            if self.step_count >= self.cfg.steps:
                return
            row = step(batch)
            if on_step is not None:
                on_step(self.step_count)
            if self.is_log_step() and row is not None:
                yield row
        if self.step_count < self.cfg.steps:
            logger.warning("batches ran out at step %d of %d", self.step_count, self.cfg.steps)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "scaling_factor": self.scaling_factor,
            "output_scaling_factor": self.output_scaling_factor,
            "initialized": self.initialized,
            "tokens_since_fired": self.tracker.tokens_since_fired_F.cpu(),
            "sae_config": self.sae.cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "torch_rng": torch.get_rng_state(),
            "l0_control": self.l0_control.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.scaling_factor = float(state["scaling_factor"])
        self.output_scaling_factor = state.get("output_scaling_factor")
        self.initialized = bool(state["initialized"])
        self.tracker.tokens_since_fired_F.copy_(state["tokens_since_fired"])
        torch.set_rng_state(state["torch_rng"])
        self.l0_control.load_state_dict(state.get("l0_control", {}))


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, acts_ND: Tensor, *, scaling_factor: float = 1.0,
             batch_size: int = 4096, targets_NO: Tensor | None = None,
             output_scaling_factor: float | None = None) -> dict[str, float]:
    """Held-out metrics on raw activations (in their own units): l0, mse, fvu, dead and dense fractions.

    A transcoder passes ``targets_NO`` (and their scale; None means ``scaling_factor``): mse and fvu are
    then measured on the targets. A crosscoder's [N, S, D] inputs add ``fvu_source_<s>`` per source.
    """
    targets = acts_ND if targets_NO is None else targets_NO
    out_scale = scaling_factor if output_scaling_factor is None else output_scaling_factor
    was_training = sae.training
    sae.eval()
    device = next(sae.parameters()).device
    counts_F = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    sq_err = torch.zeros(targets.shape[1:], dtype=torch.float64)
    l0_sum, n = 0.0, 0
    for start in range(0, len(acts_ND), batch_size):
        x = acts_ND[start : start + batch_size].to(device, torch.float32)
        y = targets[start : start + batch_size].to(device, torch.float32)
        extra = {} if targets_NO is None else {"target_BO": y * out_scale}
        out = sae(x * scaling_factor, **extra)
        sq_err += (out.x_hat_BD / out_scale - y).double().pow(2).sum(dim=0).cpu()
        fired_F = out.fire_counts().cpu()
        l0_sum += float(fired_F.sum())
        counts_F += fired_F
        n += len(x)
    sae.train(was_training)
    ys = targets.double()
    var = (ys - ys.mean(dim=0)).pow(2).sum(dim=0)
    freq_F = metrics.firing_frequency(counts_F, n)
    result = {
        "l0": l0_sum / max(n, 1),
        "mse": float(sq_err.sum()) / max(ys.numel(), 1),
        "fvu": float(sq_err.sum()) / max(float(var.sum()), 1e-12),
        "dead_fraction": float(metrics.dead_fraction(counts_F)),
        "dense_fraction": float(metrics.dense_fraction(freq_F)),
        "n_tokens": n,
    }
    if ys.dim() == 3:
        for s, (err, total) in enumerate(zip(sq_err.sum(dim=1), var.sum(dim=1), strict=True)):
            result[f"fvu_source_{s}"] = float(err) / max(float(total), 1e-12)
    return result
