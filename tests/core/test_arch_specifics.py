"""Per-architecture mechanics, each checked against a hand computation of its paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

import sae_core
from sae_core.architectures.kl_sparse import kl_divergence

D_IN, D_SAE = 8, 24


def make(arch: str, **fields) -> sae_core.SparseAutoencoder:
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config(arch, d_in=D_IN, d_sae=D_SAE, **fields))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the initial values, and decoder rows of unequal norms
        for param in sae.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=gen) + 0.5)
    return sae


def x_batch(n: int = 16, seed: int = 2) -> torch.Tensor:
    return 2 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


# -- relu -----------------------------------------------------------------------------------------
def test_relu_l1_is_weighted_by_decoder_norms():
    sae = make("relu", l1_coefficient=3.0)
    x = x_batch()
    out = sae(x)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    norms = sae.W_dec.norm(dim=1)
    expected = 3.0 * sum(float(f[b, i] * norms[i].detach()) for b in range(len(x)) for i in range(D_SAE)) / len(x) / D_IN
    assert float(out.sparsity.detach()) == pytest.approx(expected, rel=1e-5)
    assert not sae.cfg.normalize_decoder  # the April-2024 recipe leaves decoder norms free


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_tied_weights_share_one_matrix(arch):
    sae = make(arch, tied=True, **({"k": 4} if arch == "topk" else {}))
    assert sae.W_enc is None and "W_enc" not in dict(sae.named_parameters())
    torch.testing.assert_close(sae.inference_tensors()["W_enc"], sae.W_dec.detach().T)
    x = x_batch()
    sae(x, dead_mask_F=torch.ones(D_SAE, dtype=torch.bool)).loss().backward()
    grad_before = sae.W_dec.grad.clone()
    # Without the encoder path, W_dec's gradient would be the decoder's alone: tying must add to it.
    sae.zero_grad()
    latents = sae.encode(x).detach()
    (sae.decode(latents) - x).pow(2).mean().backward()
    assert not torch.allclose(grad_before, sae.W_dec.grad)


def test_resampling_changes_only_dead_latents():
    sae = make("relu", resample_every=10)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 5, 17]] = True
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    torch.manual_seed(3)
    sae.resample_dead(dead, x_batch(64))
    after = sae.state_dict()
    torch.testing.assert_close(after["W_dec"][~dead], before["W_dec"][~dead], rtol=0, atol=0)
    torch.testing.assert_close(after["W_enc"][:, ~dead], before["W_enc"][:, ~dead], rtol=0, atol=0)
    torch.testing.assert_close(after["b_enc"][~dead], before["b_enc"][~dead], rtol=0, atol=0)
    assert torch.equal(after["b_dec"], before["b_dec"])
    assert not torch.allclose(after["W_dec"][dead], before["W_dec"][dead])
    assert torch.all(after["b_enc"][dead] == 0)
    torch.testing.assert_close(after["W_dec"][dead].norm(dim=1), torch.ones(3))
    alive_enc = before["W_enc"][:, ~dead].norm(dim=0).mean()
    torch.testing.assert_close(after["W_enc"][:, dead].norm(dim=0), torch.full((3,), 0.2 * float(alive_enc)))
    # Encoder and decoder rows of a resampled latent point the same way.
    cos = torch.nn.functional.cosine_similarity(after["W_enc"][:, dead].T, after["W_dec"][dead], dim=1)
    torch.testing.assert_close(cos, torch.ones(3))


# -- batchtopk ------------------------------------------------------------------------------------
def test_batchtopk_keeps_k_times_batch_in_training_and_learns_a_threshold():
    sae = make("batchtopk", k=3, threshold_momentum=0.5).train()
    x = x_batch(10)
    out = sae(x)
    assert int((out.latents_BF != 0).sum()) == 3 * 10
    rows = (out.latents_BF != 0).sum(dim=1)
    assert rows.min() != rows.max()  # per-token counts vary; only the batch total is fixed
    h = sae.pre_acts(x).detach()
    kept = out.latents_BF != 0
    assert float(h[~kept].max()) <= float(h[kept].min())  # the kept are the batch's largest
    torch.testing.assert_close(out.latents_BF[kept], h[kept])

    min1 = float(out.latents_BF.detach()[kept].min())
    sae.update_running_stats(out)
    assert torch.all(sae.threshold == min1)  # first step sets it, every latent the same
    out2 = sae(x_batch(10, seed=5))
    min2 = float(out2.latents_BF.detach()[out2.latents_BF > 0].min())
    sae.update_running_stats(out2)
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), 0.5 * min1 + 0.5 * min2))

    reduced = []
    sae.update_running_stats(out2, lambda t, op: reduced.append(op) or t - 0.01)
    assert reduced == ["min"]

    sae.eval()
    x3 = x_batch(12, seed=7)
    jump = sae_core.build(sae_core.make_config("jumprelu", d_in=D_IN, d_sae=D_SAE))
    state = {k: v for k, v in sae.state_dict().items() if k != "threshold"}
    jump.load_state_dict({**state, "log_threshold": sae.threshold.log()})
    torch.testing.assert_close(sae.encode(x3), jump.encode(x3))
    assert (sae.encode(x3) != 0).any()


def test_batchtopk_saves_its_threshold_as_jumprelu():
    sae = make("batchtopk", k=4)
    sae.threshold.fill_(0.7)
    assert sae.saelens_architecture == "jumprelu"
    torch.testing.assert_close(sae.inference_tensors()["threshold"], torch.full((D_SAE,), 0.7))


# -- jumprelu -------------------------------------------------------------------------------------
def test_jumprelu_ste_gradient_of_log_threshold():
    eps = 0.5
    sae = sae_core.build(sae_core.make_config("jumprelu", d_in=2, d_sae=3, bandwidth=eps, l0_coefficient=0.25))
    theta = torch.tensor([1.0, 2.0, 0.5])
    with torch.no_grad():
        sae.log_threshold.copy_(theta.log())
    h = torch.tensor([[1.1, 1.9, 0.1],    # |h - theta| < eps/2 for latents 0 and 1
                      [0.5, 2.6, 0.6]])   # latent 2 within the window, latents 0, 1 outside
    f = sae.activation(h)
    torch.testing.assert_close(f, h * (h > theta))
    f.sum().backward()
    # d/dtheta sum_b h H(h - theta) := -(theta/eps) sum_b K((h - theta)/eps), times dtheta/dlog = theta.
    K = ((h - theta).abs() < eps / 2).float()
    expected_jump = -(theta / eps) * K.sum(0) * theta
    torch.testing.assert_close(sae.log_threshold.grad, expected_jump)
    assert expected_jump.ne(0).all()

    sae.log_threshold.grad = None
    sae.sparsity_loss(f, h).backward()
    expected_l0 = 0.25 * (-(1 / eps) * K.sum(0) / len(h)) * theta
    torch.testing.assert_close(sae.log_threshold.grad, expected_l0)
    assert float(sae.sparsity_loss(f, h).detach()) == pytest.approx(0.25 * float((h > theta).sum()) / len(h))


def test_jumprelu_pre_act_loss_pulls_only_dead_latents():
    sae = make("jumprelu", pre_act_loss_coefficient=2.0)
    x = x_batch()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:4] = True
    out = sae(x, dead_mask_F=dead)
    h = sae.pre_acts(x)
    gap = torch.relu(sae.log_threshold.exp() - h)[:, :4]
    expected = 2.0 * (gap * sae.W_dec.norm(dim=1)[:4]).sum(1).mean() / D_IN
    torch.testing.assert_close(out.aux, expected)
    assert out.aux.item() > 0
    assert sae(x).aux.item() == 0


def test_jumprelu_saves_threshold_not_log_threshold():
    sae = make("jumprelu")
    tensors = sae.inference_tensors()
    assert "log_threshold" not in tensors
    torch.testing.assert_close(tensors["threshold"], sae.log_threshold.detach().exp())
    back = sae.inference_to_state(tensors)
    torch.testing.assert_close(back["log_threshold"], sae.log_threshold.detach())


# -- gated ----------------------------------------------------------------------------------------
def test_gated_latents_follow_the_spec_and_aux_does_not_train_the_decoder():
    sae = make("gated")
    assert sae.b_enc is None and "b_enc" not in sae.state_dict()
    x = x_batch()
    out = sae(x)
    x_in = x - sae.b_dec
    gate = x_in @ sae.W_enc + sae.b_gate
    mag = x_in @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    torch.testing.assert_close(out.latents_BF, (gate > 0).float() * torch.relu(mag))
    assert (out.latents_BF != 0).any() and ((gate > 0) != (out.latents_BF != 0)).any()  # both paths matter

    frozen = torch.relu(gate) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.aux, (frozen - x).pow(2).mean())
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(out.sparsity, sae.cfg.l1_coefficient * (torch.relu(gate) @ norms).mean() / D_IN)

    out.aux.backward()
    assert sae.W_dec.grad is None or float(sae.W_dec.grad.abs().sum()) == 0
    assert float(sae.W_enc.grad.abs().sum()) > 0 and float(sae.b_gate.grad.abs().sum()) > 0
    assert sae.b_mag.grad is None and sae.r_mag.grad is None  # the aux trains the gate path only


# -- matryoshka -----------------------------------------------------------------------------------
def test_matryoshka_prefix_losses():
    sae = make("matryoshka", k=4, prefixes=[3, 9, D_SAE], aux_coefficient=0.0).train()
    x = x_batch()
    out = sae(x)
    f = out.latents_BF
    assert int((f != 0).sum()) == 4 * len(x)
    # Hand-built prefix reconstructions, one latent at a time.
    def recon(m):
        r = sae.b_dec.expand(len(x), -1).clone()
        for i in range(m):
            r = r + f[:, i : i + 1] * sae.W_dec[i]
        return r
    mses = [(recon(m) - x).pow(2).mean().item() for m in (3, 9, D_SAE)]
    assert out.mse.item() == pytest.approx(mses[2], rel=1e-5)
    assert out.aux.item() == pytest.approx(mses[0] + mses[1], rel=1e-5)
    assert len({round(m, 4) for m in mses}) == 3  # the prefixes really differ


def test_matryoshka_default_prefixes_are_geometric_halves():
    cfg = sae_core.make_config("matryoshka", d_in=D_IN, d_sae=64)
    assert cfg.prefix_sizes() == [4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="prefixes"):
        sae_core.make_config("matryoshka", d_in=D_IN, d_sae=64, prefixes=[8, 4, 64])
    with pytest.raises(ValueError, match="prefixes"):
        sae_core.make_config("matryoshka", d_in=D_IN, d_sae=64, prefixes=[8, 32])


# -- kl_sparse ------------------------------------------------------------------------------------
def test_kl_sparse_penalty_is_the_bernoulli_kl():
    sae = make("kl_sparse", rho=0.1, beta=3.0)
    x = x_batch(32)
    out = sae(x)
    f = torch.sigmoid((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(out.latents_BF, f)
    expected = 0.0
    for i in range(D_SAE):
        q = f[:, i].mean().item()
        expected += 0.1 * math.log(0.1 / q) + 0.9 * math.log(0.9 / (1 - q))
    assert out.sparsity.item() == pytest.approx(3.0 * expected / D_IN, rel=1e-4)
    assert float(kl_divergence(0.1, torch.tensor([0.1]))) == pytest.approx(0.0, abs=1e-7)
    assert sae.homogeneous is False and sae.saelens_cfg_extra() == {"activation_fn": "sigmoid"}


def test_batch_top_entries_are_exactly_the_largest():
    from sae_core.architectures.batchtopk import top_entries

    gen = torch.Generator().manual_seed(0)
    for values in (torch.randn(50_000, generator=gen), torch.arange(50_000.0).flip(0),  # the sample sees the top
                   torch.cat([torch.zeros(49_000), torch.rand(1000, generator=gen)])):  # ties at the cut-off
        for n in (10, 3000, 12_000):
            picked = top_entries(values, n, sample=1000, min_n=1)
            assert len(picked) == len(set(picked.tolist())) == n and bool((picked.diff() > 0).all())
            torch.testing.assert_close(values[picked].sort().values, values.topk(n).values.sort().values)


@pytest.mark.parametrize("arch,bias", [("relu", "b_enc"), ("jumprelu", "b_enc"), ("gated", "b_gate")])
def test_variable_l0_takes_the_sparse_path_only_while_few_latents_fire(arch, bias):
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config(arch, d_in=16, d_sae=200))
    x = torch.randn(64, 16)
    assert sae(x).active is None and sae(x).active is None  # about half fire: dense, measured each step
    with torch.no_grad():
        getattr(sae, bias).fill_(-2.5)  # a few fire per row
    assert sae(x).active is None  # the previous step was dense and wide: dense once more, measuring
    out = sae(x)
    assert out.active is not None and 0 < float((out.latents_BF != 0).sum(1).float().mean()) < 10
    assert sae.eval()(x).active is None  # inference stays dense
