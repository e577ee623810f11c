"""Our modules against SAEBench's custom-SAE interface (its ``BaseSAE``), checked without importing SAEBench:
attribute names and shapes, encode/decode/forward, ``cfg`` fields, device, dtype and unit decoder norms."""

from __future__ import annotations

import pytest
import torch

import sae_core
from sae_core.architectures.base import SAEBenchConfig, Wiring
from sae_core.io import load_sae, save_sae

D, F = 12, 40
HOOK = "blocks.3.hook_resid_post"
SITE_ARCHS = [n for n in sae_core.names() if sae_core.get(n).wiring is Wiring.SITE]
CFG_FIELDS = ("model_name", "d_in", "d_sae", "hook_name", "hook_layer", "context_size", "hook_head_index",
              "architecture", "apply_b_dec_to_input", "prepend_bos", "normalize_activations", "dtype", "device")


@pytest.mark.parametrize("arch", SITE_ARCHS)
def test_saved_sae_satisfies_the_custom_sae_interface(arch, tmp_path):
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config(arch, d_in=D, d_sae=F, init_scale=3.0))
    save_sae(sae, tmp_path, scaling_factor=1.7, metadata={"model_name": "tiny", "hook_name": HOOK, "context_size": 64})
    loaded = load_sae(tmp_path)
    view = loaded.saebench()
    assert view.W_enc.shape == (D, F) and view.W_dec.shape == (F, D)
    assert view.b_enc.shape == (F,) and view.b_dec.shape == (D,)
    assert view.W_dec is loaded.W_dec and view.b_dec is loaded.b_dec  # the SAE's own parameters, not copies
    assert all(hasattr(view.cfg, name) for name in CFG_FIELDS)
    cfg = view.cfg
    assert (cfg.model_name, cfg.hook_name, cfg.hook_layer, cfg.d_in, cfg.d_sae) == ("tiny", HOOK, 3, D, F)
    assert (cfg.dtype, cfg.device, cfg.architecture) == ("float32", "cpu", arch)
    assert view.device == torch.device("cpu") and view.dtype == torch.float32
    assert loaded.device == view.device and loaded.dtype == view.dtype
    # Decoder norms are folded at save into homogeneous activations (SAEBench's probes assume unit rows);
    # a sigmoid (kl_sparse) cannot absorb them, and SAEBench's own check says so.
    assert view.check_decoder_norms() == loaded.homogeneous
    x = torch.randn(7, D) * 2
    f = view.encode(x)
    assert f.shape == (7, F) and torch.equal(f, loaded.encode(x))
    out = view(x)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, view.decode(f))
    assert torch.allclose(out, loaded(x).x_hat_BD, atol=1e-5)


def test_interface_follows_dtype_and_names_what_is_missing():
    sae = sae_core.build(sae_core.make_config("relu", d_in=D, d_sae=F, init_scale=3.0))
    view = sae.saebench("m", "blocks.0.hook_mlp_out")
    assert not view.check_decoder_norms()  # rows of norm 3: SAEBench would refuse this SAE
    view.to(torch.float64)
    assert view.cfg.dtype == "float64" and sae.W_dec.dtype == torch.float64 and view.dtype == torch.float64
    assert isinstance(view.cfg, SAEBenchConfig) and view.cfg.hook_layer == 0
    with pytest.raises(sae_core.ConfigError, match="hook"):
        sae.saebench("m")
    with pytest.raises(sae_core.ConfigError, match="layer"):
        sae.saebench("m", "embed")
    assert sae.saebench("m", "embed", hook_layer=0).cfg.hook_layer == 0
