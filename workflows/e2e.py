"""End-to-end SAE training (Braun et al. 2024) on Ray Train: the SAE learns what the model's output
needs, not what reconstructs its input.

Per step every rank takes its slice of a global batch of token windows (one seeded order, so N
workers see what one worker would), runs the frozen model clean (no grad) and again with the SAE
spliced in at the hook (autograd on), and minimises

    kl_coefficient * KL(clean || spliced)  +  downstream_coefficient * MSE(later residuals)
    + the architecture's own sparsity / aux terms (a ReLU keeps its L1; TopK has none).

Positions follow workflows/evaluate.py: only kept positions (``Windows.keep``) are spliced, and the
next-token KL counts position t iff t and t + 1 are kept. Each rank divides its sums by the *global*
count (times the world size, which DDP's gradient averaging divides out again), so the gradient is
that of the global mean whatever the split. The held-out windows are the ones after the training
windows; ``evaluate_sae`` on them fills metrics.json (kl_div, ce_loss_recovered, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

import sae_core
from sae_core.architectures.base import ConfigError, SAEOutput
from sae_core.io import SPARSITY_FILE, load_checkpoint, load_sae, save_sae
from sae_core.trainer import TrainConfig, Trainer
from workflows.corpus import DEFAULT_CORPUS, Windows, iter_documents, pack_windows
from workflows.errors import UserError
from workflows.evaluate import _next_token_losses, _replace_kept, ce_positions, evaluate_sae, held_out_windows
from workflows.hooks import parse_hook, run_with_hooks
from workflows.models import DEFAULT_MODEL, load_config, load_model, load_tokenizer
from workflows.raysession import ensure_ray
from workflows.tracking import MlflowTracker, NullTracker
from workflows.train_ray import (
    JOB_FILE,
    DistributedOptions,
    check_resources,
    check_run_dir,
    make_reducer,
    prepare_run_dir,
    report_checkpoint,
    start_tracking,
    torch_trainer,
)
from workflows.training import TrainJob, log_final, sae_config_for

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class E2EJob:
    """An end-to-end training run; goes whole into job.json, MLflow params and the resume check."""

    hook: str
    """Hook the SAE reads and is spliced back into, e.g. ``blocks.6.hook_resid_post``."""
    arch: str = "topk"
    """Registered (flat) architecture name."""
    sae: dict[str, Any] = field(default_factory=dict)
    """Architecture config fields (d_sae, k, ...); d_in comes from the model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings; ``batch_size`` is tokens per step, rounded down to whole windows."""
    out: str = "runs/e2e"
    """Output folder: the SAELens folder, metrics.json, job.json, Ray's checkpoints."""
    model: str = DEFAULT_MODEL
    """The frozen model: ``builtin:...``, a .gguf file, a folder or a hub id."""
    corpus: str = DEFAULT_CORPUS
    """Text to train on (see workflows/corpus.py); held-out text is what follows it."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet, hf) holding the text."""
    n_tokens: int
    """Kept tokens of training text (whole windows); the steps cycle over them in seeded epochs."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    kl_coefficient: float = 1.0
    """Weight of KL(clean || spliced) of the next-token distributions."""
    downstream_coefficient: float = 0.0
    """Weight of the MSE of later residuals (spliced vs clean), in the SAE's normalised units."""
    downstream_hooks: list[str] | None = None
    """Hooks the downstream term compares; None: ``hook_resid_post`` of every later block."""
    eval_tokens: int = 8192
    """Held-out kept tokens (after the training text) for the final evaluation."""

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        for name in ("n_tokens", "eval_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context_size < 2:
            raise UserError(f"context size must be at least 2 (BOS + one token), got {self.context_size}")
        if self.kl_coefficient < 0 or self.downstream_coefficient < 0:
            raise UserError("the KL and downstream coefficients must be >= 0")
        if self.kl_coefficient == 0 and self.downstream_coefficient == 0:
            raise UserError("both the KL and the downstream coefficient are 0: nothing to train on")
        if {"d_out", "n_sources"} & set(sae_core.get(self.arch).config_cls.__dataclass_fields__):
            raise UserError(f"--loss e2e splices an SAE back where it reads; {self.arch!r} maps between hooks. "
                            "Choose a flat architecture (topk, batchtopk, relu, jumprelu, ...)")
        if self.windows_per_step < 1:
            raise UserError(f"--batch-size {self.train.batch_size} is less than one window of "
                            f"--context-size {self.context_size}; raise --batch-size")

    @property
    def windows_per_step(self) -> int:
        return self.train.batch_size // self.context_size

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> E2EJob:
        return cls(**raw)

    def as_train_job(self) -> TrainJob:
        """The same SAE and optimisation as a streaming TrainJob, for the helpers shared with `sae train`."""
        stream = {"model": self.model, "corpus": self.corpus, "n_tokens": self.n_tokens,
                  "context_size": self.context_size, "text_field": self.text_field}
        return TrainJob(hook=self.hook, arch=self.arch, sae=self.sae, train=self.train, out=self.out, stream=stream)

    def metadata(self) -> dict[str, Any]:
        """SAELens cfg.json metadata, the fields StreamSource.metadata writes."""
        return {"model_name": self.model, "hook_name": self.hook, "context_size": self.context_size,
                "prepend_bos": True, "dataset_path": self.corpus, "exclude_special_tokens": True}


def saved_e2e_job(folder: str | Path | None) -> E2EJob | None:
    """The E2EJob of a run folder, or None when it holds none (absent, or an MSE run's job.json)."""
    job_file = Path(folder) / JOB_FILE if folder else None
    if job_file is None or not job_file.is_file():
        return None
    raw = json.loads(job_file.read_text())
    return E2EJob.from_dict(raw) if "kl_coefficient" in raw else None


def downstream_hooks(job: E2EJob, n_layers: int) -> list[str]:
    """Hooks of the downstream term: the job's, else the residual after every later block."""
    if job.downstream_coefficient == 0:
        return []  # not captured at all: no cost when the term is off
    point = parse_hook(job.hook, n_layers)
    if job.downstream_hooks is not None:
        hooks = [parse_hook(h, n_layers).name for h in job.downstream_hooks]
    else:  # a resid_post hook is itself its block's residual; other kinds feed their own block's
        first = point.layer + 1 if point.kind == "resid_post" else point.layer
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(first, n_layers)]
    if not hooks or job.hook in hooks:
        raise UserError(f"no later residual to compare after {job.hook!r} (the model has {n_layers} blocks); "
                        "drop --downstream-coef or pick an earlier --hook")
    return hooks


# -- inside each worker -------------------------------------------------------------------------
def window_batches(windows: Windows, *, per_step: int, seed: int, rank: int, world: int,
                   skip: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(ids_BT, keep_BT) of this rank's slice of each global batch, epochs in seeded orders; the
    first ``skip`` global batches (already trained on before a resume) are passed over."""
    local, n = per_step // world, len(windows.token_ids)
    index, epoch = 0, 0
    while True:
        order = np.random.default_rng(seed + epoch).permutation(n)
        for start in range(0, n - per_step + 1, per_step):
            if index >= skip:
                pick = order[start : start + per_step][rank * local : (rank + 1) * local]
                yield (torch.from_numpy(windows.token_ids[pick].astype(np.int64)),
                       torch.from_numpy(windows.keep[pick]))
            index += 1
        epoch += 1


@torch.no_grad()
def hook_sample(model: nn.Module, hook: str, windows: Windows, n_tokens: int, device: torch.device,
                batch_windows: int = 16) -> Tensor:
    """The hook's activations at the kept positions of the first windows, ``n_tokens`` rows at most."""
    rows: list[Tensor] = []
    for start in range(0, len(windows.token_ids), batch_windows):
        ids_BT = torch.from_numpy(windows.token_ids[start : start + batch_windows].astype(np.int64)).to(device)
        keep_BT = torch.from_numpy(np.array(windows.keep[start : start + batch_windows])).to(device)
        rows.append(run_with_hooks(model, ids_BT, capture=[hook]).activations[hook][keep_BT].float())
        if sum(len(r) for r in rows) >= n_tokens:
            break
    return torch.cat(rows)[:n_tokens]


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


def e2e_terms(trainer: Trainer, model: nn.Module, job: E2EJob, later: list[str], ids_BT: Tensor,
              keep_BT: Tensor) -> E2ETerms:
    scale, world = trainer.scaling_factor, trainer.world_size
    with torch.no_grad():
        clean = run_with_hooks(model, ids_BT, capture=[job.hook, *later], stop_at_last=False)
    x_ND = clean.activations[job.hook][keep_BT].float() * scale
    out = trainer.forward_module(x_ND, dead_mask_F=trainer.tracker.dead_mask())
    spliced = run_with_hooks(model, ids_BT, capture=later, replace={job.hook: _replace_kept(keep_BT, out.x_hat_BD / scale)},
                             stop_at_last=False)
    mask_BT = ce_positions(keep_BT)
    counts = trainer.reduce(torch.stack([mask_BT.sum(), keep_BT.sum() * x_ND.shape[1]]).float(), "sum")
    logp_clean, _ = _next_token_losses(clean.logits, ids_BT, mask_BT)
    logp_spliced, _ = _next_token_losses(spliced.logits, ids_BT, mask_BT)
    kl_sum = (logp_clean.exp() * (logp_clean - logp_spliced)).sum()
    # Later residuals in the SAE's normalised units, so the coefficient does not depend on the model's scale.
    ds_sum = sum((((spliced.activations[h] - clean.activations[h])[keep_BT].float() * scale).pow(2).sum()
                  for h in later), x_ND.new_zeros(())) / max(len(later), 1)
    loss = (job.kl_coefficient * kl_sum / counts[0].clamp_min(1) + job.downstream_coefficient * ds_sum
            / counts[1].clamp_min(1)) * world + trainer.sparsity_scale() * out.sparsity + out.aux
    sums = torch.stack([kl_sum.detach(), ds_sum.detach(), (out.latents_BF != 0).sum().float(),
                        x_ND.new_tensor(float(len(x_ND)))])
    return E2ETerms(loss=loss, out=out, x_ND=x_ND, sums=sums, counts=counts)


def e2e_step(trainer: Trainer, model: nn.Module, job: E2EJob, later: list[str], ids_BT: Tensor,
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


def worker_trainer(job: E2EJob, d_in: int, world: int, device: torch.device) -> Trainer:
    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    sae = sae_core.build(sae_config_for(job.as_train_job(), d_in)).to(device)
    ddp = nn.parallel.DistributedDataParallel(sae) if world > 1 else None
    return Trainer(sae, job.train, reduce=make_reducer(world), forward_module=ddp, world_size=world)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from transformers.utils import logging as hf_logging

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    job, opts = E2EJob.from_dict(config["job"]), DistributedOptions(**config["options"])
    if not opts.use_gpu:  # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this worker reserved
        torch.set_num_threads(max(1, int(opts.cpus_per_worker)))
    hf_logging.disable_progress_bar()
    device = ray.train.torch.get_device()
    model = load_model(job.model, device=str(device)).model
    windows = Windows(*ray.get(config["windows"]))
    trainer = worker_trainer(job, config["d_in"], world, device)
    tracker = MlflowTracker(config["mlflow_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else NullTracker()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(load_checkpoint(folder))
        tracker.log_metrics({"resumed_from_step": trainer.step_count}, step=trainer.step_count)
    else:  # the same sample on every rank, so the scale and b_dec match a single worker's
        trainer.initialize(hook_sample(model, job.hook, windows, job.train.init_sample_tokens, device))
    batches = window_batches(windows, per_step=job.windows_per_step, seed=job.train.seed, rank=rank, world=world,
                             skip=trainer.step_count)
    cfg = job.train
    for ids_BT, keep_BT in batches:
        if trainer.step_count >= cfg.steps:
            break
        row = e2e_step(trainer, model, job, config["downstream_hooks"], ids_BT, keep_BT)
        step = trainer.step_count
        if step % cfg.log_every == 0 or step == cfg.steps:
            tracker.log_metrics(row, step=step)
        if step % opts.checkpoint_every == 0 or step == cfg.steps:
            report_checkpoint(trainer, rank, {"step": step, "kl": row["kl"]})


# -- the driver -----------------------------------------------------------------------------------
def check_job(job: E2EJob, opts: DistributedOptions) -> tuple[int, list[str]]:
    """(d_in, downstream hooks), refusing a bad job before anything starts."""
    if opts.data != "direct":
        raise UserError("--loss e2e reads token windows directly; drop --data ray")
    if job.windows_per_step % opts.workers:
        raise UserError(f"a step of {job.windows_per_step} window(s) (--batch-size {job.train.batch_size} / "
                        f"--context-size {job.context_size}) does not split over --workers {opts.workers}")
    config = load_config(job.model)
    n_layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    d_in = int(getattr(config, "hidden_size", None) or config.n_embd)
    parse_hook(job.hook, n_layers)
    later = downstream_hooks(job, n_layers)
    try:
        sae_config_for(job.as_train_job(), d_in)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    return d_in, later


def training_windows(job: E2EJob) -> Windows:
    docs = iter_documents(job.corpus, text_field=job.text_field)
    windows = pack_windows(docs, load_tokenizer(job.model), context_size=job.context_size, n_tokens=job.n_tokens)
    if len(windows.token_ids) < job.windows_per_step:
        raise UserError(f"--tokens {job.n_tokens} gives {len(windows.token_ids)} window(s), fewer than a step's "
                        f"{job.windows_per_step}; raise --tokens or lower --batch-size")
    return windows


def train_e2e(job: E2EJob, opts: DistributedOptions, *, resume: bool = False) -> dict[str, Any]:
    """Train ``job`` end to end on Ray Train (RAY_ADDRESS or a local Ray), then evaluate it on held-out text."""
    import ray

    d_in, later = check_job(job, opts)
    check_run_dir(job, resume)  # duck-typed: it needs only .out and .to_dict()
    ensure_ray()
    check_resources(opts)
    windows = training_windows(job)
    run_dir = prepare_run_dir(job, resume)
    tracker = start_tracking(job.as_train_job(), opts, run_dir, None)
    tracker.log_params({"loss": "e2e", "kl_coefficient": job.kl_coefficient, "eval_tokens": job.eval_tokens,
                        "downstream_coefficient": job.downstream_coefficient, "downstream_hooks": ",".join(later)})
    config = {"job": job.to_dict(), "options": asdict(opts), "d_in": d_in, "downstream_hooks": later,
              "windows": ray.put((windows.token_ids, windows.doc_ids, windows.keep)), "run_id": tracker.run_id,
              "mlflow_uri": tracker.uri}
    trainer = torch_trainer(train_loop_per_worker, config, opts, run_dir)
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end("KILLED")
        raise
    return finish_e2e(job, result, tracker, d_in, train_tokens=int(windows.keep.sum()))


def finish_e2e(job: E2EJob, result, tracker: MlflowTracker, d_in: int, train_tokens: int) -> dict[str, Any]:
    """Save the SAELens folder, evaluate the saved SAE on the windows after the training text, write
    metrics.json (with sparsity.safetensors) and job.json, and close the MLflow run."""
    from safetensors.torch import save_file

    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint: {result.error}")
    torch.manual_seed(job.train.seed)
    trainer = Trainer(sae_core.build(sae_config_for(job.as_train_job(), d_in)), job.train)
    with result.checkpoint.as_directory() as folder:
        trainer.load_state_dict(load_checkpoint(folder))
    out = Path(job.out)
    save_sae(trainer.sae, out, scaling_factor=trainer.scaling_factor, metadata=job.metadata())
    loaded = load_model(job.model)
    held_out = held_out_windows(loaded.tokenizer, corpus=job.corpus, context_size=job.context_size,
                                n_tokens=job.eval_tokens, skip_tokens=train_tokens, text_field=job.text_field)
    evaluated = evaluate_sae(load_sae(out), loaded.model, job.hook, held_out)
    save_file({"sparsity": evaluated.log_sparsity().contiguous()}, str(out / SPARSITY_FILE))
    metrics = {**evaluated.metrics(), "steps": trainer.step_count, "train_tokens": train_tokens}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / JOB_FILE).write_text(json.dumps(job.to_dict(), indent=2))
    log_final(tracker, job, metrics, trainer.step_count)
    return {**metrics, "mlflow_run_id": tracker.run_id}
