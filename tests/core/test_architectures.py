"""Every registered architecture, checked the same way: a new file in sae_core/architectures is
picked up here without editing this test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy

import sae_core
from sae_core.io import load_sae, save_sae
from sae_core.metrics import mmcs
from sae_core.synthetic import SyntheticConfig, SyntheticData
from sae_core.trainer import TrainConfig, Trainer

ARCHS = sae_core.names()
D_IN, D_SAE = 16, 48


def small_sae(arch: str, **fields) -> sae_core.SparseAutoencoder:
    torch.manual_seed(0)
    return sae_core.build(sae_core.make_config(arch, d_in=D_IN, d_sae=D_SAE, **fields))


def full_decode(sae: sae_core.SparseAutoencoder, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """decode(latents) plus a skip transcoder's linear path x @ W_skip.T (forward's output)."""
    skip = getattr(sae, "skip_term", None)
    return sae.decode(latents) + (skip(x) if skip is not None else 0.0)


def perturbed(sae: sae_core.SparseAutoencoder) -> sae_core.SparseAutoencoder:
    """Move every parameter off its initial value (biases start at 0, where bugs hide)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return sae


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trip_and_unknown_field(arch):
    cfg = sae_core.make_config(arch, d_in=D_IN, d_sae=D_SAE)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    json.dumps(cfg.to_dict())  # goes into MLflow params and Tune spaces as is
    with pytest.raises(ValueError, match="no_such_field"):
        sae_core.make_config(arch, d_in=D_IN, d_sae=D_SAE, no_such_field=1)
    with pytest.raises(ValueError, match="d_sae"):
        sae_core.make_config(arch, d_in=D_IN, d_sae=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes(arch):
    sae = perturbed(small_sae(arch))
    x = torch.randn(10, D_IN)
    out = sae(x)
    assert out.x_hat_BD.shape == (10, D_IN)
    assert out.latents_BF.shape == (10, D_SAE)
    for term in (out.mse, out.sparsity, out.aux, out.loss()):
        assert term.shape == () and torch.isfinite(term)
    assert sae.encode(x).shape == (10, D_SAE)
    assert sae.decode(sae.encode(x)).shape == (10, D_IN)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("training", [False, True])
def test_forward_equals_decode_of_encode(arch, training):
    sae = perturbed(small_sae(arch)).train(training)
    x = torch.randn(32, D_IN)
    out = sae(x)
    torch.testing.assert_close(out.latents_BF, sae.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.x_hat_BD, full_decode(sae, x, sae.encode(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_learnable_parameter(arch):
    sae = perturbed(small_sae(arch)).train()
    x = 3 * torch.randn(64, D_IN)
    out = sae(x, dead_mask_F=torch.ones(D_SAE, dtype=torch.bool))
    out.loss().backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None, f"{arch}: no gradient reaches {name}"
        assert torch.isfinite(param.grad).all(), f"{arch}: non-finite gradient in {name}"
        assert param.grad.abs().sum() > 0, f"{arch}: zero gradient for {name}"


@pytest.mark.parametrize("arch", ARCHS)
def test_parameters_and_gradients_are_row_major(arch):
    """A parameter in another layout than its gradient costs a full copy in AccumulateGrad and a clone in
    the fused Adam step, every step (a transposed W_enc did: the sparse kernels write row-major)."""
    sae = small_sae(arch).train()
    sae(3 * torch.randn(64, D_IN), dead_mask_F=torch.ones(D_SAE, dtype=torch.bool)).loss().backward()
    for name, param in sae.named_parameters():
        assert param.is_contiguous(), f"{arch}: {name} has strides {param.stride()}"
        assert param.grad is None or param.grad.is_contiguous(), f"{arch}: {name}'s gradient is not row-major"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaling_factor", [1.0, 2.5])
def test_save_load_round_trip(arch, scaling_factor, tmp_path):
    sae = perturbed(small_sae(arch)).eval()
    sae.set_decoder_norm_to_unit_norm()
    x = torch.randn(40, D_IN)
    save_sae(sae, tmp_path, scaling_factor=scaling_factor)
    loaded = load_sae(tmp_path)
    assert loaded.arch == sae.arch and not loaded.training
    with torch.no_grad():
        latents = sae.encode(x * scaling_factor)
        expected = full_decode(sae, x * scaling_factor, latents) / scaling_factor
        got_latents = loaded.encode(x)
        torch.testing.assert_close(full_decode(loaded, x, got_latents), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(got_latents != 0, latents != 0)
        if scaling_factor == 1.0 and sae.cfg.normalize_decoder:
            torch.testing.assert_close(got_latents, latents, rtol=1e-4, atol=1e-5)


def spec_forward(folder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SAELens inference forward written from the format description alone (no sae_core)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_numpy(str(folder / "sae_weights.safetensors"))
    assert cfg["normalize_activations"] == "none"
    x_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    arch = cfg["architecture"]
    if arch == "gated":
        gate = x_in @ w["W_enc"] + w["b_gate"]
        mag = x_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"]
        f = (gate > 0) * np.maximum(mag, 0)
    elif arch == "crosscoder":  # our documented extension (sae_core/architectures/crosscoder.py)
        x_bsd = x.reshape(len(x), cfg["n_sources"], cfg["d_in"])
        h = np.einsum("bsd,sdf->bf", x_bsd - w["b_dec"] if cfg["apply_b_dec_to_input"] else x_bsd, w["W_enc"]) + w["b_enc"]
        f = np.maximum(h, 0) if cfg["activation"] == "relu" else _topk(h, cfg["k"])
        return f, (np.einsum("bf,fsd->bsd", f, w["W_dec"]) + w["b_dec"]).reshape(x.shape)
    else:
        h = x_in @ w["W_enc"] + w["b_enc"]
        if arch in ("standard", "transcoder", "skip_transcoder"):
            f = np.maximum(h, 0)
        elif arch in ("jumprelu", "jumprelu_transcoder", "jumprelu_skip_transcoder"):
            f = np.maximum(h, 0) * (h > w["threshold"])
        elif arch == "topk":
            f = _topk(h, cfg["k"])
        elif arch == "kl_sparse":  # our documented extension: a sigmoid autoencoder
            assert cfg["activation_fn"] == "sigmoid"
            f = 1 / (1 + np.exp(-h))
        else:
            raise AssertionError(f"no spec forward for {arch}")
    skip = x @ w["W_skip"].T if "W_skip" in w else 0.0  # skip transcoders
    return f, f @ w["W_dec"] + w["b_dec"] + skip


def _topk(h: np.ndarray, k: int) -> np.ndarray:
    f = np.zeros_like(h)
    idx = np.argsort(-h, axis=1)[:, :k]
    np.put_along_axis(f, idx, np.maximum(np.take_along_axis(h, idx, axis=1), 0), axis=1)
    return f


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_follows_the_saelens_spec(arch, tmp_path):
    sae = perturbed(small_sae(arch)).eval()
    x = torch.randn(50, D_IN)
    save_sae(sae, tmp_path, scaling_factor=1.7)
    f_spec, x_hat_spec = spec_forward(tmp_path, x.numpy().astype(np.float64))
    loaded = load_sae(tmp_path)
    with torch.no_grad():
        f_ours = loaded.encode(x)
        np.testing.assert_allclose(f_spec, f_ours.double().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(x_hat_spec, full_decode(loaded, x, f_ours).double().numpy(), rtol=1e-4, atol=1e-4)
        expected = full_decode(sae, x * 1.7, sae.encode(x * 1.7)) / 1.7
    np.testing.assert_allclose(x_hat_spec, expected.double().numpy(), rtol=1e-4, atol=1e-4)


# Sparsity settings under which each architecture is expected to find the planted features; an
# architecture not listed must learn them with its defaults.
SYNTHETIC_OVERRIDES: dict[str, dict] = {
    "topk": {"k": 5},
    "batchtopk": {"k": 5},
    "matryoshka": {"k": 5},
    "transcoder": {"k": 5},
    "skip_transcoder": {"k": 5},
}
# Architectures for which recovering x's own dictionary is not the question; each is checked on its
# own planted problem instead.
PLANTED_ELSEWHERE = {
    "skip_transcoder": "W_skip = I alone reconstructs x, leaving the latents idle; tests/core/test_transcoders.py "
                       "plants features in a transcoding problem with a linear part",
}


@pytest.mark.parametrize("arch", ARCHS)
def test_recovers_planted_features(arch):
    """d=64, 256 unit features, ~5 active per token, noise-free: MMCS >= 0.9 in a few seconds."""
    if arch in PLANTED_ELSEWHERE:
        pytest.skip(PLANTED_ELSEWHERE[arch])
    torch.manual_seed(0)
    data = SyntheticData(SyntheticConfig(d=64, n_features=256, mean_active=5, seed=0))
    acts, _ = data.sample(100_000)
    sae = sae_core.build(sae_core.make_config(arch, d_in=64, d_sae=512, **SYNTHETIC_OVERRIDES.get(arch, {})))
    trainer = Trainer(sae, TrainConfig(steps=500, batch_size=512, lr=1e-2, log_every=500, dead_after_tokens=20_000))
    gen = torch.Generator().manual_seed(0)
    batches = (acts[torch.randint(0, len(acts), (512,), generator=gen)] for _ in range(10**9))
    rows = list(trainer.fit(batches))
    assert rows[-1]["step"] == 500
    score = float(mmcs(sae.W_dec.detach().flatten(1), data.dictionary_ND))  # a crosscoder's is [F, 1, D]
    assert score >= 0.9, f"{arch}: MMCS {score:.3f} < 0.9 (final metrics {rows[-1]})"
