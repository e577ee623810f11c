"""The correct-L0 diagnostic: the decoder metrics against their definitions, the pick's rules, and the pick
on TopK and BatchTopK sweeps over k on planted data with known true L0 (several truths, three seeds)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import sae_core
from sae_core.l0_diagnostic import decoder_cosine, decoder_projection, diagnostic_metrics, pick_l0
from sae_core.synthetic import SyntheticConfig, SyntheticData
from sae_core.trainer import TrainConfig, Trainer, evaluate


def test_decoder_cosine_is_the_mean_absolute_pairwise_cosine():
    W = torch.randn(7, 5) * torch.rand(7, 1)
    unit = torch.nn.functional.normalize(W, dim=1)
    pairs = [abs(float(unit[i] @ unit[j])) for i, j in itertools.combinations(range(7), 2)]
    assert decoder_cosine(W) == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
    assert decoder_cosine(torch.eye(6)) == pytest.approx(0.0, abs=1e-7)  # orthogonal: no mixing at all
    assert decoder_cosine(torch.ones(4, 3)) == pytest.approx(1.0)
    sampled = decoder_cosine(torch.randn(300, 8), max_latents=100)
    assert sampled == pytest.approx(decoder_cosine(torch.randn(300, 8)), abs=0.05)  # a sample estimates the mean


def test_decoder_projection_is_the_nth_largest_projection_per_input():
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config("topk", d_in=6, d_sae=10, k=2))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(10, 1) + 0.5)
        sae.b_dec.normal_()
    x = torch.randn(50, 6)
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    ranked = ((2.0 * x - sae.b_dec.detach()) @ unit.T).flatten().sort(descending=True).values
    for n in (0, 3, 7):
        assert decoder_projection(sae, x, n, scaling_factor=2.0) == pytest.approx(float(ranked[n * 50]))
    assert set(diagnostic_metrics(sae, x)) == {"decoder_cosine", "decoder_projection"}


def test_pick_reads_the_minimum_of_a_u_and_says_how_sure_it_is():
    u = [(l0, (math.log(l0 / 8)) ** 2) for l0 in (2, 4, 8, 16, 32)]
    pick = pick_l0(u)
    assert pick.l0 == pytest.approx(8.0) and (pick.low, pick.high) == (4, 16) and pick.at_edge is None
    assert pick.confidence == pytest.approx(1.0)
    skewed = pick_l0([(l0, (math.log(l0 / 10)) ** 2) for l0 in (2, 4, 8, 16, 32)])
    assert 8 < skewed.l0 < 12  # the parabola through the minimum's neighbours moves it off the grid point
    shallow = pick_l0([(2, 1.0), (4, 0.5), (8, 0.45), (16, 0.48), (32, 0.9)])
    assert shallow.l0 == pytest.approx(8, rel=0.2) and shallow.confidence < 0.3
    edge = pick_l0([(2, 1.0), (4, 0.5), (8, 0.2)])
    assert edge.at_edge == "high" and edge.confidence == 0 and edge.l0 == 8
    repeats = pick_l0([(4, 1.0), (4, 0.2), (8, 0.5), (16, 0.7)])  # the two trials at L0 4 average to 0.6
    assert repeats.at_edge is None and (repeats.low, repeats.high) == (4, 16)
    assert pick_l0([(4, 1.0)]) is None and pick_l0([(4, math.nan), (8, 1.0)]) is None


# -- the pick on planted data -------------------------------------------------------------------------
D = N_FEATURES = 64
TRUTHS = (11, 14)
STEPS, BATCH = 250, 512


def planted(true_l0: float, seed: int) -> tuple[SyntheticData, torch.Tensor, torch.Tensor]:
    """sae_core.synthetic's sampler (Zipf-like firing rates, known mean number of active features) with the
    features made orthogonal: then a correct dictionary has c_dec = 0 and every mixed latent raises it."""
    data = SyntheticData(SyntheticConfig(d=D, n_features=N_FEATURES, mean_active=true_l0, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    data.dictionary_ND = torch.linalg.qr(torch.randn(D, N_FEATURES, generator=gen))[0].T.contiguous()
    return data, data.sample(STEPS * BATCH)[0], data.sample(4096)[0]


def sweep_over_k(arch: str, true_l0: float, seed: int) -> tuple[float, list[tuple[float, float]]]:
    data, train_ND, held_ND = planted(true_l0, seed)
    measured = float((data.sample(8192)[1] > 0).sum(dim=1).float().mean())
    points = []
    for k in sorted({round(true_l0 * 2 ** (i / 3)) for i in range(-3, 4)}):  # k from truth/2 to 2 x truth
        torch.manual_seed(seed)
        sae = sae_core.build(sae_core.make_config(arch, d_in=D, d_sae=N_FEATURES, k=k))
        trainer = Trainer(sae, TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, log_every=STEPS))
        list(trainer.fit(iter(train_ND.split(BATCH))))
        l0 = evaluate(sae, held_ND, scaling_factor=trainer.scaling_factor)["l0"]
        points.append((l0, diagnostic_metrics(sae, held_ND, trainer.scaling_factor)["decoder_cosine"]))
    return measured, points


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_the_pick_lands_within_25_percent_of_the_true_l0(arch):
    misses = []
    for true_l0, seed in itertools.product(TRUTHS, range(3)):
        measured, points = sweep_over_k(arch, true_l0, seed)
        pick = pick_l0(points)
        error = pick.l0 / measured - 1
        print(f"{arch} seed {seed}: true L0 {measured:.2f}, picked {pick.l0:.2f} ({error:+.0%}), "
              f"interval [{pick.low:.3g}, {pick.high:.3g}], confidence {pick.confidence:.2f}")
        if abs(error) > 0.25 or pick.at_edge:
            misses.append((true_l0, seed, round(pick.l0, 2)))
    assert not misses
