"""Absorption and sparse probing on planted cases, where the right answer is known by construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workflows.absorption import LETTERS, absorption_scores, split_and_probe

D = 96


class PlantedSAE(nn.Module):
    """One main latent per letter (encoder = the letter's direction) plus one token-specific latent per
    absorbed word of letter 'a' (encoder = that word's own direction). Where a word latent fires, the
    main 'a' latent is silenced: the word latent has absorbed the letter. With ``letter_in_decoder`` its
    decoder row carries the letter's direction too (absorption); without, it does not (the control)."""

    def __init__(self, U_CD: torch.Tensor, W_ND: torch.Tensor, letter_in_decoder: bool):
        super().__init__()
        self.U, self.Wabs = U_CD, W_ND
        dec_abs = W_ND + U_CD[0] if letter_in_decoder else W_ND
        self.W_dec = nn.Parameter(torch.cat([U_CD, dec_abs / dec_abs.norm(dim=1, keepdim=True)]))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        main = torch.relu(x_BD @ self.U.T - 1.0)
        words = torch.relu(x_BD @ self.Wabs.T - 1.0)
        main[:, 0] = main[:, 0] * (words.sum(1) == 0)
        return torch.cat([main, words], dim=1)


@pytest.fixture(scope="module")
def planted():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T  # orthonormal rows
    U = basis[: len(LETTERS)]
    n_a, n_other, absorbed_every = 90, 30, 3  # every 3rd 'a' word is absorbed: a third of them
    W = basis[len(LETTERS) : len(LETTERS) + n_a // absorbed_every]
    acts, labels, words = [], [], []
    for c in range(len(LETTERS)):
        for i in range(n_a if c == 0 else n_other):
            x = 4.0 * U[c] + 0.05 * torch.randn(D, generator=g)
            name = f"{LETTERS[c]}{i}"
            if c == 0 and i % absorbed_every == 0:
                x = x + 4.0 * W[i // absorbed_every]
                name += "*"
            acts.append(x)
            labels.append(c)
            words.append(name)
    data = split_and_probe(words, torch.stack(acts), torch.tensor(labels), test_fraction=0.5, seed=0)
    return U, W, data


def test_absorption_flags_a_latent_planted_to_absorb_a_letter(planted):
    U, W, data = planted
    result = absorption_scores(PlantedSAE(U, W, letter_in_decoder=True), data)
    letters = result.details["letters"]
    a = letters["a"]
    absorbed_tp = sum(w.endswith("*") for w in a["absorbed_words"])
    # A third of the 'a' words are absorbed; exactly those are flagged, by their own word latents.
    assert 0.2 < a["full_absorption_rate"] < 0.5, a
    assert a["mean_absorption_fraction"] == pytest.approx(a["full_absorption_rate"], abs=0.05)
    assert absorbed_tp == len(a["absorbed_words"]) > 0
    assert all(latent >= len(LETTERS) for latent in a["absorbing_latents"])
    assert a["main_latents"] == [0]
    others = [r["full_absorption_rate"] for k, r in letters.items() if k != "a" and not r.get("skipped")]
    assert len(others) >= 20 and max(others) == 0.0
    assert result.metrics["mean_full_absorption"] == pytest.approx(a["full_absorption_rate"] / (len(others) + 1))


def test_absorption_control_without_the_letter_in_the_decoder_is_not_flagged(planted):
    U, W, data = planted
    result = absorption_scores(PlantedSAE(U, W, letter_in_decoder=False), data)
    assert result.details["letters"]["a"]["full_absorption_rate"] == 0.0
    assert result.metrics["mean_absorption_fraction"] == 0.0


def test_sparse_probe_on_a_planted_feature_reaches_the_expected_accuracy():
    """Texts carry a planted direction u iff their (10%-noisy) label says so: the best any probe can do is
    90% accuracy. The latent reading u must be ranked first and its 1-sparse probe must reach ~90%; the
    other latents are noise, so a 1-sparse probe on any of them sits near chance."""
    from workflows.probing import probe_scores

    g = torch.Generator().manual_seed(1)
    n, d, flip = 3000, 32, 0.1
    feature = torch.rand(n, generator=g) < 0.5
    label = feature ^ (torch.rand(n, generator=g) < flip)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    acts = torch.randn(n, d, generator=g) * 0.3 + 3.0 * feature[:, None].float() * u
    other = torch.randn(d, 15, generator=g)
    other = torch.nn.functional.normalize(other - u[:, None] * (u @ other), dim=0)
    lat = torch.relu(acts @ torch.cat([u[:, None], other], dim=1) - 0.3)  # latent 0 reads u, the others not
    train, test = slice(0, 2000), slice(2000, n)
    out = probe_scores(acts[train], label[train], acts[test], label[test], lat[train], lat[test], ks=[1, 2])
    expected = 1 - flip
    assert out["top_latents"][0] == 0
    assert out["top_1_accuracy"] == pytest.approx(expected, abs=0.03)
    assert out["llm_accuracy"] == pytest.approx(expected, abs=0.03)
    noise_only = probe_scores(acts[train], label[train], acts[test], label[test], lat[train, 1:], lat[test, 1:], ks=[1])
    assert noise_only["top_1_accuracy"] < 0.65


def test_builtin_probing_tasks_take_labels_from_the_source(shakespeare):
    from workflows.probing import DEFAULTS
    from workflows.probing_tasks import load_task, shakespeare_speakers

    texts, labels = shakespeare_speakers(shakespeare)
    text = shakespeare.read_text(encoding="utf-8")
    i = labels.index("ROMEO")
    assert f"ROMEO:\n{texts[i].split()[0]}" in text  # the speech follows its speaker's heading in the play
    texts, labels = load_task("builtin:stdlib-packages", DEFAULTS, seed=0)  # the 4 largest packages, <= 240 each
    assert {"email", "asyncio", "xml"} <= set(labels) and len(set(labels)) == 4 and all(len(t) >= 200 for t in texts)
    assert max(labels.count(x) for x in set(labels)) <= 2 * DEFAULTS["max_per_class"]
