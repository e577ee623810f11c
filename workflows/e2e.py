"""The end-to-end objective (Braun et al. 2024): the SAE learns what the model's output needs, not what
reconstructs its input. It trains on token windows (workflows/sources.py ``WindowSource``) through the
one training loop, in process or on Ray Train.

Per step every rank takes its slice of a global batch of token windows, runs the frozen model clean
(no grad) and again with the SAE's output spliced in (autograd on), and minimises

    kl_coefficient * KL(clean || spliced)  +  downstream_coefficient * MSE(later residuals)
    + the architecture's own sparsity / aux terms (a ReLU keeps its L1; TopK has none).

Any architecture whose spec says it splices into the model can be trained this way: a SITE wiring
reads and replaces ``hook``; a PAIR wiring (e.g. MLP in -> MLP out) reads ``hook`` and replaces ``out_hook``.
A STACKED wiring rewrites several sites at once and is refused.

Positions follow workflows/evaluate.py: only kept positions (``Windows.keep``) are spliced, and the
next-token KL counts position t iff t and t + 1 are kept. Each rank divides its sums by the *global*
count (times the world size, which DDP's gradient averaging divides out again), so the gradient is
that of the global mean whatever the split. The held-out windows are the ones after the training
windows; ``evaluate_sae`` on them fills metrics.json (kl_div, ce_loss_recovered, ...).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from sae_core.architectures.base import SAEOutput, Wiring
from sae_core.io import load_sae, save_sae
from sae_core.trainer import Trainer
from workflows.corpus import Windows
from workflows.errors import UserError
from workflows.evaluate import ce_positions, evaluate_sae, next_token_losses, replace_kept
from workflows.hooks import parse_hook, run_with_hooks
from workflows.job import TrainJob
from workflows.objectives import Evaluation


def splice_site(job: TrainJob) -> str:
    """Where the SAE's output replaces the model's: the site it reads, or a PAIR's output site."""
    return job.out_hook or job.hook


def downstream_hooks(job: TrainJob, n_layers: int) -> list[str]:
    """Sites of the downstream term: the job's, else the residual after every block after the splice."""
    if job.downstream_coefficient == 0:
        return []  # not captured at all: no cost when the term is off
    point = parse_hook(splice_site(job), n_layers)
    if job.downstream_hooks is not None:
        hooks = [parse_hook(h, n_layers).name for h in job.downstream_hooks]
    else:  # a resid_post site is itself its block's residual; other kinds feed their own block's
        first = point.layer + 1 if point.kind == "resid_post" else point.layer
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(first, n_layers)]
    if not hooks or splice_site(job) in hooks:
        raise UserError(f"no later residual to compare after {splice_site(job)!r} (the model has {n_layers} blocks); "
                        "drop --downstream-coef or pick an earlier --hook")
    return hooks


@torch.no_grad()
def hook_sample(model: nn.Module, sites: str | list[str], windows: Windows, n_tokens: int, device: torch.device,
                batch_windows: int = 16) -> Tensor | dict[str, Tensor]:
    """Activations at the kept positions of the first windows, ``n_tokens`` rows at most: a tensor for
    one site, a dict of equal-length tensors for several."""
    names = [sites] if isinstance(sites, str) else list(sites)
    rows: dict[str, list[Tensor]] = {h: [] for h in names}
    for start in range(0, len(windows.token_ids), batch_windows):
        ids_BT = torch.from_numpy(windows.token_ids[start : start + batch_windows].astype(np.int64)).to(device)
        keep_BT = torch.from_numpy(np.array(windows.keep[start : start + batch_windows])).to(device)
        acts = run_with_hooks(model, ids_BT, capture=names).activations
        for h in names:
            rows[h].append(acts[h][keep_BT].float())
        if sum(len(r) for r in rows[names[0]]) >= n_tokens:
            break
    out = {h: torch.cat(r)[:n_tokens] for h, r in rows.items()}
    return out[names[0]] if isinstance(sites, str) else out


class E2ETerms(NamedTuple):
    loss: Tensor
    """What this rank back-propagates (its share of the global mean, see the module docstring)."""
    out: SAEOutput
    """The SAE's output on the kept positions (normalised units)."""
    x_ND: Tensor
    """The SAE's inputs (normalised), for resampling."""
    sums: Tensor
    """[kl sum, downstream squared-error sum, fired latents, kept rows] of this rank, for the metrics."""
    counts: Tensor
    """[counted next-token positions, kept positions x width] over all ranks."""


class EndToEnd:
    """``loss="e2e"``: see the module docstring."""

    name = "e2e"
    needs = "windows"

    def __init__(self) -> None:
        self.job: TrainJob | None = None
        self.model: nn.Module | None = None
        self.later: list[str] = []
        self.device = torch.device("cpu")

    # -- refusing what cannot work, before anything starts ------------------------------------------
    def check(self, job: TrainJob) -> None:
        if not job.wiring.splices:
            raise UserError(f"--loss e2e splices the SAE's output into the model; {job.arch!r} rewrites several "
                            "sites at once. Choose an architecture that reads one site (or maps one to another)")
        if job.kl_coefficient < 0 or job.downstream_coefficient < 0:
            raise UserError("the KL and downstream coefficients must be >= 0")
        if job.kl_coefficient == 0 and job.downstream_coefficient == 0:
            raise UserError("both the KL and the downstream coefficient are 0: nothing to train on")
        if job.eval_tokens < 1:
            raise UserError(f"eval_tokens must be at least 1, got {job.eval_tokens}")

    def prepare(self, job: TrainJob, source: Any) -> None:
        """Check the sites against the model (the source read its config); the downstream sites."""
        for site in job.sites():
            parse_hook(site, source.n_layers)
        self.later = downstream_hooks(job, source.n_layers)

    def params(self, job: TrainJob) -> dict[str, Any]:
        return {"loss": self.name, "kl_coefficient": job.kl_coefficient, "eval_tokens": job.eval_tokens,
                "downstream_coefficient": job.downstream_coefficient, "downstream_hooks": ",".join(self.later)}

    # -- in the worker ------------------------------------------------------------------------------
    def bind(self, job: TrainJob, source: Any, device: torch.device) -> None:
        from transformers.utils import logging as hf_logging

        from workflows.models import load_model

        hf_logging.disable_progress_bar()
        self.prepare(job, source)
        self.job = job
        self.model, self.device = load_model(source.cfg.model, device=str(device)).model, device

    def init_sample(self, source: Any, n_tokens: int):
        """The same sample on every rank, so the scaling factors and b_dec match a single worker's."""
        job = source.job
        acts = hook_sample(self.model, job.sites(), source.windows, n_tokens, self.device)
        return (acts[job.hook], acts[job.out_hook]) if job.wiring is Wiring.PAIR else acts[job.hook]

    def step_fn(self, trainer: Trainer) -> Callable[[Any], dict[str, float]]:
        def step(batch: tuple[Tensor, Tensor]) -> dict[str, float]:
            return e2e_step(trainer, self.model, self.job, self.later, *batch)

        return step

    def evaluate(self, job: TrainJob, trainer: Trainer, source: Any) -> Evaluation:
        """Evaluate exactly what is saved (folded weights, raw units) on the text after the training text."""
        from safetensors.torch import save

        from workflows.models import load_model

        with tempfile.TemporaryDirectory() as folder:
            save_sae(trainer.sae, folder, scaling_factor=trainer.scaling_factor,
                     output_scaling_factor=trainer.output_scaling_factor)
            sae = load_sae(folder)
        loaded = load_model(source.cfg.model)
        held_out = source.held_out_windows(loaded.tokenizer, job.eval_tokens)
        result = evaluate_sae(sae, loaded.model, job.hook, held_out, out_hook=job.out_hook or None)
        sparsity = save({"sparsity": result.log_sparsity().contiguous()})
        return Evaluation({**result.metrics(), "train_tokens": source.train_tokens}, {"sparsity.safetensors": sparsity})


def e2e_terms(trainer: Trainer, model: nn.Module, job: TrainJob, later: list[str], ids_BT: Tensor,
              keep_BT: Tensor) -> E2ETerms:
    scale, world, site = trainer.scaling_factor, trainer.world_size, splice_site(job)
    out_scale = trainer.output_scaling_factor or scale
    with torch.no_grad():
        clean = run_with_hooks(model, ids_BT, capture=list(dict.fromkeys([job.hook, site, *later])),
                               stop_at_last=False)
    x_ND = clean.activations[job.hook][keep_BT].float() * scale
    targets = {"target_BO": clean.activations[site][keep_BT].float() * out_scale} if job.out_hook else {}
    out = trainer.forward_module(x_ND, dead_mask_F=trainer.tracker.dead_mask(), **targets)
    spliced = run_with_hooks(model, ids_BT, capture=later, replace={site: replace_kept(keep_BT, out.x_hat_BD / out_scale)},
                             stop_at_last=False)
    mask_BT = ce_positions(keep_BT)
    counts = trainer.reduce(torch.stack([mask_BT.sum(), keep_BT.sum() * out.x_hat_BD.shape[1]]).float(), "sum")
    logp_clean, _ = next_token_losses(clean.logits, ids_BT, mask_BT)
    logp_spliced, _ = next_token_losses(spliced.logits, ids_BT, mask_BT)
    kl_sum = (logp_clean.exp() * (logp_clean - logp_spliced)).sum()
    # Later residuals in the SAE's normalised units, so the coefficient does not depend on the model's scale.
    ds_sum = sum((((spliced.activations[h] - clean.activations[h])[keep_BT].float() * out_scale).pow(2).sum()
                  for h in later), x_ND.new_zeros(())) / max(len(later), 1)
    loss = (job.kl_coefficient * kl_sum / counts[0].clamp_min(1) + job.downstream_coefficient * ds_sum
            / counts[1].clamp_min(1)) * world + trainer.sparsity_scale() * out.sparsity + out.aux
    sums = torch.stack([kl_sum.detach(), ds_sum.detach(), out.fire_counts().sum().float(),
                        x_ND.new_tensor(float(len(x_ND)))])
    return E2ETerms(loss=loss, out=out, x_ND=x_ND, sums=sums, counts=counts)


def e2e_step(trainer: Trainer, model: nn.Module, job: TrainJob, later: list[str], ids_BT: Tensor,
             keep_BT: Tensor) -> dict[str, float]:
    """Trainer.update (the same LR schedule, projection, clipping, renormalisation, statistics and
    resampling as an MSE step) on the e2e loss."""
    start, device = time.perf_counter(), trainer.device
    terms: list[E2ETerms] = []

    def compute() -> tuple[Tensor, SAEOutput, Tensor]:
        terms.append(e2e_terms(trainer, model, job, later, ids_BT.to(device), keep_BT.to(device)))
        return terms[0].loss, terms[0].out, terms[0].x_ND

    trainer.update(compute)
    return step_metrics(trainer, terms[0], time.perf_counter() - start)


@torch.no_grad()
def step_metrics(trainer: Trainer, terms: E2ETerms, seconds: float) -> dict[str, float]:
    kl, ds, fired, rows = trainer.reduce(terms.sums, "sum").tolist()
    loss = float(trainer.reduce(terms.loss.detach(), "sum")) / trainer.world_size
    return {"step": trainer.step_count, "loss": loss, "kl": kl / max(float(terms.counts[0]), 1.0),
            "downstream_mse": ds / max(float(terms.counts[1]), 1.0), "mse": float(terms.out.mse),
            "sparsity": float(terms.out.sparsity), "aux": float(terms.out.aux), "l0": fired / max(rows, 1.0),
            "dead_fraction": trainer.tracker.dead_fraction(), "lr": trainer.optimizer.param_groups[0]["lr"],
            "tokens_per_s": rows / max(seconds, 1e-9)}
