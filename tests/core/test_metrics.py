from __future__ import annotations

import pytest
import torch

from sae_core import metrics


def test_l0_mse_fvu_on_hand_values():
    latents = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert float(metrics.l0(latents)) == pytest.approx(1.5)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    assert float(metrics.mse(x_hat, x)) == pytest.approx(0.5)
    # total variance around the mean (2, 3): 4 * 1 = 4; residual 2
    assert float(metrics.fvu(x_hat, x)) == pytest.approx(0.5)
    assert float(metrics.variance_explained(x_hat, x)) == pytest.approx(0.5)


def test_dead_dense_and_density_histogram():
    counts = torch.tensor([0, 0, 5, 50])
    freq = metrics.firing_frequency(counts, 100)
    assert float(metrics.dead_fraction(counts)) == 0.5
    assert float(metrics.dense_fraction(freq)) == 0.25
    hist, edges = metrics.density_histogram(freq, bins=10)
    assert hist.sum() == 4 and len(edges) == 11
    assert hist[0] == 2  # the dead latents sit at log10(1e-10) = -10
    torch.testing.assert_close(metrics.log_density(freq)[2:], torch.log10(torch.tensor([0.05, 0.5])))


def test_mmcs_perfect_permuted_and_orthogonal():
    truth = torch.eye(4)
    assert float(metrics.mmcs(truth[[2, 0, 3, 1]] * 3.0, truth)) == pytest.approx(1.0)
    assert float(metrics.mmcs(torch.tensor([[1.0, 1.0, 0, 0]]), truth[:2])) == pytest.approx(2 ** -0.5)
    assert float(metrics.mmcs(truth[:2], truth[2:])) == pytest.approx(0.0)
