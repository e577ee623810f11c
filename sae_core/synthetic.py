"""Synthetic ground truth: activations that are sparse non-negative combinations of known unit features.

``sae synth`` writes them as an activation store plus ``ground_truth.safetensors`` (the dictionary
[n_features, d] and per-feature firing probabilities), so an SAE's recovered dictionary can be scored
with MMCS.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch import Tensor

from sae_core.architectures.base import ConfigError, require
from sae_core.store import Manifest, StoreWriter, make_table

GROUND_TRUTH_FILE = "ground_truth.safetensors"


@dataclass(kw_only=True)
class SyntheticConfig:
    d: int = 128
    """Dimension of the activations."""
    n_features: int = 512
    """Number of ground-truth features (unit vectors in R^d)."""
    mean_active: float = 8.0
    """Expected number of features active per token."""
    correlation: float = 0.0
    """Correlation in [0, 1) of the features' firing, through one shared Gaussian factor."""
    noise: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to each activation."""
    min_magnitude: float = 0.5
    """Active coefficients are uniform in [min_magnitude, max_magnitude]."""
    max_magnitude: float = 1.5
    """Upper end of the coefficient range."""
    seed: int = 0
    """Seed of the dictionary and the samples."""

    def __post_init__(self) -> None:
        require(self.d > 0 and self.n_features > 0, "d and n_features must be positive")
        require(0 < self.mean_active <= self.n_features, f"mean_active must be in (0, n_features], got {self.mean_active}")
        require(0 <= self.correlation < 1, f"correlation must be in [0, 1), got {self.correlation}")
        require(self.noise >= 0, f"noise must be >= 0, got {self.noise}")
        require(0 <= self.min_magnitude <= self.max_magnitude, "need 0 <= min_magnitude <= max_magnitude")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SyntheticData:
    """A fixed dictionary and a sampler of sparse codes over it."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        self.dictionary_ND = torch.nn.functional.normalize(torch.randn(cfg.n_features, cfg.d, generator=gen), dim=1)
        # Zipf-like spread of firing rates around the requested mean, as in real SAEs' density plots.
        ranks = torch.arange(1, cfg.n_features + 1, dtype=torch.float64)
        weights = ranks.pow(-0.5)[torch.randperm(cfg.n_features, generator=gen)]
        self.prob_N = (weights / weights.sum() * cfg.mean_active).clamp(max=0.95).float()
        normal = torch.distributions.Normal(0.0, 1.0)
        self._cutoff_N = normal.icdf(1 - self.prob_N.double()).float()
        self._gen = torch.Generator().manual_seed(cfg.seed + 1)

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw n activations: (acts [n, d], coefficients [n, n_features])."""
        cfg, gen = self.cfg, self._gen
        rho = cfg.correlation
        shared = torch.randn(n, 1, generator=gen)
        own = torch.randn(n, cfg.n_features, generator=gen)
        z = math.sqrt(rho) * shared + math.sqrt(1 - rho) * own
        active = z > self._cutoff_N
        span = cfg.max_magnitude - cfg.min_magnitude
        magnitude = cfg.min_magnitude + span * torch.rand(n, cfg.n_features, generator=gen)
        coeffs = torch.where(active, magnitude, torch.zeros(()))
        acts = coeffs @ self.dictionary_ND
        if cfg.noise > 0:
            acts = acts + cfg.noise * torch.randn(n, cfg.d, generator=gen)
        return acts, coeffs


def write_synthetic_store(out: str | Path, cfg: SyntheticConfig, n_tokens: int, *, hook: str = "synthetic",
                          more_hooks: tuple[str, ...] = (), dtype: str = "float32", context_size: int = 128,
                          rows_per_file: int = 65536) -> Path | str:
    """Write ``n_tokens`` synthetic activations as an activation store, plus the ground truth, to a
    local folder or a URI (see sae_core/fs.py); returns the store's root as given. Each of ``more_hooks``
    is a further site with its own draws from the same dictionary (sources for a crosscoder or a
    transcoder)."""
    if n_tokens <= 0:
        raise ConfigError(f"tokens must be positive, got {n_tokens}")
    data = SyntheticData(cfg)
    hooks = (hook, *more_hooks)
    manifest = Manifest(model="synthetic", hooks={h: {"d": cfg.d} for h in hooks}, dtype=dtype, context_size=context_size,
                        corpus=f"synthetic:{cfg.to_dict()}", excluded=[], bos_token_id=None,
                        extra={"synthetic": cfg.to_dict(), "complete": False})
    with StoreWriter(out, manifest) as writer:  # resumes a store a killed run left; finished by finish()
        for index, start in enumerate(range(0, n_tokens, rows_per_file)):
            rows = min(rows_per_file, n_tokens - start)
            columns = {h: data.sample(rows)[0].numpy() for h in hooks}
            row_ids = np.arange(start, start + rows)
            meta = {"token_id": np.zeros(rows), "window_id": row_ids // context_size,
                    "position": row_ids % context_size, "doc_id": row_ids // context_size}
            writer.write_part(index, make_table(meta, columns, dtype))
        truth = {"dictionary": data.dictionary_ND.contiguous(), "firing_probability": data.prob_N.contiguous()}
        writer.location.write_bytes(GROUND_TRUTH_FILE, save(truth))
        writer.finish()
    return writer.root


def topic_activations(doc_of_row: np.ndarray, *, d: int, n_topics: int, seed: int = 0) -> np.ndarray:
    """Activations [N, d] whose statistics depend on the document: each document draws one of
    ``n_topics`` topics, each topic owns 8 of the 8 * n_topics unit features; a row fires each of its
    topic's features with probability 1/2 and each other feature with probability 1/(8 * n_topics),
    coefficients uniform in [0.5, 1.5]. Consecutive rows of one document are thus strongly correlated,
    as a language model's are, and a reader that does not mix documents feeds a trainer few topics at
    a time."""
    rng = np.random.default_rng([seed, 1])
    n_features = 8 * n_topics
    dictionary = rng.standard_normal((n_features, d)).astype(np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    topic = rng.integers(0, n_topics, int(doc_of_row.max()) + 1)[doc_of_row]
    own = (np.arange(n_features)[None, :] // 8) == topic[:, None]
    fires = rng.random((len(doc_of_row), n_features)) < np.where(own, 0.5, 1 / n_features)
    coeffs = np.where(fires, rng.uniform(0.5, 1.5, fires.shape), 0).astype(np.float32)
    return coeffs @ dictionary


def document_rows(n_tokens: int, *, mean_doc: int, seed: int = 0) -> np.ndarray:
    """The document of each of ``n_tokens`` rows: documents of geometric length (mean ``mean_doc``), in order."""
    rng = np.random.default_rng(seed)
    doc_lengths = rng.geometric(1 / mean_doc, size=n_tokens // mean_doc * 2 + 10)
    return np.repeat(np.arange(len(doc_lengths)), doc_lengths)[:n_tokens]


def write_document_ordered_store(out: str | Path, n_tokens: int, *, context_size: int, mean_doc: int, seed: int = 0,
                                 rows_per_file: int = 1 << 20, d: int = 1, n_topics: int = 0) -> Path | str:
    """A store shaped like a collected one for measuring shuffles: documents of geometric length (mean
    ``mean_doc`` tokens) packed in order into windows of ``context_size`` rows. Its one hook ``h`` is
    1 wide and zero (only ``window_id`` and ``doc_id`` matter), or with ``n_topics``, ``d`` wide
    :func:`topic_activations` (to train on)."""
    doc_of_row = document_rows(n_tokens, mean_doc=mean_doc, seed=seed)
    if n_topics:
        values = topic_activations(doc_of_row, d=d, n_topics=n_topics, seed=seed)
        dtype = "float32"
    else:
        values, dtype = np.zeros((n_tokens, 1), dtype=np.float16), "float16"
    manifest = Manifest(model="none", hooks={"h": {"d": values.shape[1]}}, dtype=dtype, context_size=context_size,
                        corpus=f"document-ordered:{mean_doc}:{seed}:{n_topics}", extra={"complete": False})
    with StoreWriter(out, manifest) as writer:
        for part, lo in enumerate(range(0, n_tokens, rows_per_file)):
            rows = np.arange(lo, min(lo + rows_per_file, n_tokens))
            meta = {"token_id": np.zeros(len(rows)), "window_id": rows // context_size,
                    "position": rows % context_size, "doc_id": doc_of_row[rows]}
            writer.write_part(part, make_table(meta, {"h": values[rows]}, dtype))
        writer.finish()
    return writer.root
