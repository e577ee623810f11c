"""Transcoders and crosscoders on planted problems: the features they must find are known.

- Transcoding: x = c @ U (+ dense noise), y = c @ V (+ x @ M.T): a transcoder's decoder must find V;
  the skip variant must put M in W_skip and still find V, and beat the plain one where the linear
  part is not sparse.
- Two sources: shared features write to both sources (different directions in each), specific ones
  to one; the crosscoder's per-source decoder norms must tell them apart.
"""

from __future__ import annotations

import torch

import sae_core
from sae_core.architectures.crosscoder import shared_specific_report
from sae_core.metrics import mmcs
from sae_core.synthetic import SyntheticConfig, SyntheticData
from sae_core.trainer import TrainConfig, Trainer, evaluate

D_IN, D_OUT, N_FEATURES = 64, 48, 256


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def planted_skip() -> torch.Tensor:
    """M [D_OUT, D_IN]: the linear part of the planted MLP."""
    return torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(7)) / D_IN**0.5


def transcoding_problem(n: int, *, linear: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, D_IN], y [n, D_OUT], V [N_FEATURES, D_OUT]); with ``linear``, x carries dense noise and
    y adds x @ M.T, a part no sparse code of x can carry."""
    data = SyntheticData(SyntheticConfig(d=D_IN, n_features=N_FEATURES, mean_active=5, seed=0))
    x, coeffs = data.sample(n)
    V = unit_rows(N_FEATURES, D_OUT, seed=5)
    y = coeffs @ V
    if linear:
        x = x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
        y = y + x @ planted_skip().T
    return x, y, V


def train_pairs(arch: str, x: torch.Tensor, y: torch.Tensor, steps: int = 600) -> tuple[sae_core.SparseAutoencoder, Trainer]:
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config(arch, d_in=D_IN, d_out=D_OUT, d_sae=512, k=5))
    trainer = Trainer(sae, TrainConfig(steps=steps, batch_size=512, lr=1e-2, log_every=steps, dead_after_tokens=20_000))
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            rows = torch.randint(0, len(x), (512,), generator=gen)
            yield x[rows], y[rows]

    rows = list(trainer.fit(batches()))
    assert rows[-1]["step"] == steps
    return sae, trainer


def held_out_metrics(sae: sae_core.SparseAutoencoder, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> dict:
    return evaluate(sae, x[-4096:], targets_NO=y[-4096:], scaling_factor=trainer.scaling_factor,
                    output_scaling_factor=trainer.output_scaling_factor)


def test_transcoder_finds_the_planted_output_features():
    x, y, V = transcoding_problem(60_000, linear=False)
    sae, trainer = train_pairs("transcoder", x, y)
    score = float(mmcs(sae.W_dec.detach(), V))
    assert score >= 0.9, f"MMCS of W_dec against the planted V is {score:.3f}"
    held = held_out_metrics(sae, trainer, x, y)
    # A TopK SAE reconstructing x itself reaches FVU ~0.17 in this budget; the mean predictor is 1.
    assert held["fvu"] < 0.35, held


def test_skip_path_carries_the_linear_part():
    x, y, V = transcoding_problem(60_000, linear=True)
    results, saes = {}, {}
    for arch in ("transcoder", "skip_transcoder"):
        saes[arch], trainer = train_pairs(arch, x, y)
        results[arch] = held_out_metrics(saes[arch], trainer, x, y)
    plain, skip = results["transcoder"], results["skip_transcoder"]
    assert abs(plain["l0"] - skip["l0"]) < 0.1 * plain["l0"], results  # the same sparsity budget
    assert skip["fvu"] < 0.6 * plain["fvu"], results  # measured: 0.19 vs 0.37
    # W_skip is trained on scaled x and y: unscale it before comparing with the planted M.
    W_skip = saes["skip_transcoder"].W_skip.detach() * trainer.scaling_factor / trainer.output_scaling_factor
    M = planted_skip()
    assert float((W_skip - M).norm() / M.norm()) < 0.5
    assert float(mmcs(saes["skip_transcoder"].W_dec.detach(), V)) >= 0.85  # the latents found V, not V + U M^T


def two_source_problem(n: int, n_shared: int = 96, n_specific: int = 80, d: int = 32):
    """x [n, 2, d] and the planted decoder [N, 2, d] with each feature's kind (shared, specific:0/1)."""
    total = n_shared + 2 * n_specific
    data = SyntheticData(SyntheticConfig(d=d, n_features=total, mean_active=4, seed=1))
    _, coeffs = data.sample(n)
    planted = torch.zeros(total, 2, d)
    planted[:, 0] = unit_rows(total, d, seed=11)
    planted[:, 1] = unit_rows(total, d, seed=12)
    planted[n_shared : n_shared + n_specific, 1] = 0  # written to source 0 only
    planted[n_shared + n_specific :, 0] = 0  # source 1 only
    kinds = ["shared"] * n_shared + ["specific:0"] * n_specific + ["specific:1"] * n_specific
    return torch.einsum("nf,fsd->nsd", coeffs, planted), planted, kinds


def test_crosscoder_separates_shared_and_specific_features():
    x, planted, kinds = two_source_problem(60_000)
    torch.manual_seed(0)
    cc = sae_core.build(sae_core.make_config("crosscoder", d_in=32, d_sae=512, n_sources=2))
    trainer = Trainer(cc, TrainConfig(steps=800, batch_size=512, lr=5e-3, log_every=800, dead_after_tokens=20_000))
    gen = torch.Generator().manual_seed(0)
    list(trainer.fit(x[torch.randint(0, len(x), (512,), generator=gen)] for _ in range(10**9)))
    assert float(mmcs(cc.W_dec.detach().flatten(1), planted.flatten(1))) >= 0.85
    held = x[-4096:]
    alive_F = (cc.encode(held * trainer.scaling_factor) != 0).any(dim=0)
    report = shared_specific_report(cc, alive_F=alive_F)
    # Each planted feature's best-matching latent (cosine over both sources) must carry its kind.
    cos = torch.nn.functional.normalize(planted.flatten(1), dim=1) @ torch.nn.functional.normalize(
        cc.W_dec.detach().flatten(1), dim=1).T
    best = cos.masked_fill(~alive_F[None, :], -2).argmax(dim=1)
    agree = sum(report.labels[int(j)] == kind for j, kind in zip(best, kinds, strict=True))
    assert agree >= 0.9 * len(kinds), (agree, len(kinds), report.counts)
    per_source = evaluate(cc, held, scaling_factor=trainer.scaling_factor)
    assert per_source["fvu"] < 0.35, per_source
