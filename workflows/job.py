"""A training job: a data source x an objective x an architecture config x ``TrainConfig``.

The job is plain data (it goes whole into job.json, MLflow params and the resume check). What it means
is decided by the architecture's spec (what it reads and writes: ``sae_core.Wiring``) and by the
objective (``loss``): workflows/sources.py turns it into batches, workflows/objectives.py into updates.

Model sites: ``hook`` is the site the SAE reads; a PAIR wiring (MLP in -> MLP out) also names the site it
writes, ``out_hook``; a STACKED wiring reads ``sources`` (``hook`` first), stacked [B, S, D].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import sae_core
from sae_core.architectures.base import ConfigError, Wiring
from sae_core.config import reject_unknown
from sae_core.trainer import TrainConfig
from workflows.errors import UserError

LOSSES = ("mse", "e2e")


@dataclass(kw_only=True)
class TrainJob:
    """Everything a training run needs; goes whole into MLflow params, job.json and checkpoints."""

    activations: str = ""
    """Activation store (a folder or an object-storage URI); empty when ``stream`` is the data."""
    stream: dict[str, Any] | None = None
    """Run the model instead of reading a store: CollectConfig fields (model, corpus, n_tokens, context_size,
    text_field). The reconstruction loss trains on its activations, the end-to-end loss on its text."""
    hook: str
    """Model site the SAE reads (and, unless ``out_hook`` is set, reconstructs)."""
    out_hook: str = ""
    """PAIR wirings: the model site the SAE writes, e.g. blocks.L.hook_mlp_out for hook blocks.L.hook_mlp_in."""
    sources: list[str] = field(default_factory=list)
    """STACKED wirings: every site the dictionary reads and writes, ``hook`` first; empty otherwise."""
    arch: str = "topk"
    """Registered architecture name."""
    sae: dict[str, Any] = field(default_factory=dict)
    """Architecture config fields (d_sae, k, ...); d_in (and d_out / n_sources) come from the data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings; ``batch_size`` is tokens per step."""
    out: str = "runs/sae"
    """Output folder: the SAELens folder, metrics.json, job.json (and Ray's checkpoints)."""
    eval_fraction: float = 0.05
    """Fraction of the activations (the store's last rows, the stream's last windows) held out for evaluation."""
    loss: str = "mse"
    """mse: reconstruct the activations; e2e: KL(clean || spliced) of the next-token distributions."""
    kl_coefficient: float = 1.0
    """e2e: weight of KL(clean || spliced)."""
    downstream_coefficient: float = 0.0
    """e2e: weight of the MSE of later residuals (spliced vs clean), in the SAE's normalised units."""
    downstream_hooks: list[str] | None = None
    """e2e: sites the downstream term compares; None: ``hook_resid_post`` of every later block."""
    eval_tokens: int = 8192
    """e2e: held-out kept tokens (the text after the training text) for the final evaluation."""

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if not 0 < self.eval_fraction < 1:
            raise UserError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "e2e" and self.activations:
            raise UserError("--loss e2e trains through the model on text, not on stored activations: drop "
                            "--activations (choose the model with --from-model and the text with --corpus/--tokens)")
        if bool(self.activations) == bool(self.stream):
            raise UserError("give exactly one data source: an activation store (--activations) or a live model "
                            "stream (--from-model/--corpus/--tokens)")
        check_sites(self)

    @property
    def wiring(self) -> Wiring:
        return sae_core.get(self.arch).wiring

    def sites(self) -> list[str]:
        """Every model site the job reads: the ones the SAE reads, then a PAIR's output site."""
        return [*(self.sources or [self.hook]), *([self.out_hook] if self.out_hook else [])]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainJob:
        raw = upgrade_job_dict(raw)
        try:
            reject_unknown(cls, raw, "training job")
        except ConfigError as exc:
            raise UserError(str(exc)) from exc
        return cls(**raw)


LEGACY_E2E_STREAM = ("model", "corpus", "n_tokens", "context_size", "text_field")


def upgrade_job_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A job.json of an end-to-end run written before jobs had one shape (its text settings at the top
    level, no ``loss``) in today's shape; anything else as it is."""
    if "loss" in raw or "kl_coefficient" not in raw or "stream" in raw:
        return raw
    stream = {k: raw[k] for k in LEGACY_E2E_STREAM if k in raw}
    return {**{k: v for k, v in raw.items() if k not in LEGACY_E2E_STREAM}, "stream": stream, "loss": "e2e"}


def archs_wired(wiring: Wiring) -> str:
    return ", ".join(name for name in sae_core.names() if sae_core.get(name).wiring is wiring)


def check_sites(job: TrainJob) -> None:
    """The sites must fit what the architecture reads and writes (its spec's wiring)."""
    wiring = job.wiring
    if wiring is Wiring.PAIR and not job.out_hook:
        raise UserError(f"architecture {job.arch!r} maps one site to another: name its target with --out-hook "
                        "(e.g. --hook blocks.3.hook_mlp_in --out-hook blocks.3.hook_mlp_out)")
    if job.out_hook and wiring is not Wiring.PAIR:
        raise UserError(f"--out-hook is for transcoders, the architectures mapping one site to another "
                        f"({archs_wired(Wiring.PAIR)}), not {job.arch!r}; drop it or choose one of those")
    if len(job.sources) > 1 and wiring is not Wiring.STACKED:
        raise UserError(f"several --hook values need a multi-source architecture ({archs_wired(Wiring.STACKED)}), "
                        f"not {job.arch!r}; give --hook once")
    if job.sources and job.sources[0] != job.hook:
        raise UserError(f"sources {job.sources} must start with hook {job.hook!r}")
    if len(set(job.sources)) != len(job.sources):
        raise UserError(f"--hook names a source twice: {job.sources}")


def data_widths(job: TrainJob, widths: dict[str, int]) -> dict[str, int]:
    """The config fields the data sets: d_in, and the wiring's derived field (d_out or n_sources)."""
    read = job.sources or [job.hook]
    if len({widths[h] for h in read}) > 1:
        raise UserError(f"a multi-source SAE's sources must have one width, got {({h: widths[h] for h in read})}; "
                        "choose sites of the same kind (e.g. residual streams of several layers)")
    derived = {"d_in": widths[read[0]]}
    extra = job.wiring.derived_field
    if extra == "d_out":
        derived["d_out"] = widths[job.out_hook]
    elif extra == "n_sources":
        derived["n_sources"] = len(read)
    return derived


def sae_config_for(job: TrainJob, widths: dict[str, int]) -> sae_core.SAEConfig:
    """The architecture config of ``job`` for data whose sites have ``widths``; a setting the data
    contradicts (d_in, d_out, n_sources) is refused."""
    derived = data_widths(job, widths)
    origin = {"d_in": f"site {job.hook!r} has d", "d_out": f"site {job.out_hook!r} has d",
              "n_sources": "the --hook values give n_sources"}
    for name, actual in derived.items():
        given = job.sae.get(name)
        if given is not None and given != actual:
            raise UserError(f"{origin[name]}={actual}, but the SAE was asked for {name}={given}; drop that setting")
    try:
        return sae_core.make_config(job.arch, **{**job.sae, **derived})
    except ConfigError as exc:
        raise UserError(str(exc)) from exc


def saved_job_differences(saved: dict[str, Any], job: TrainJob) -> list[str]:
    """Top-level fields where a job.json (filled with today's defaults) differs from ``job``."""
    normalized = TrainJob.from_dict(saved).to_dict()
    current = job.to_dict()
    return sorted(k for k in set(normalized) | set(current) if normalized.get(k) != current.get(k))
