"""Importing foreign SAE files: each layout is written from known weights with the orientation, names
and biases formats.md gives, then the imported SAE must reproduce an independent forward of that layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sae_core
from sae_core.interop import detect_format, import_sae
from sae_core.io import SAEFormatError, load_sae, save_sae
from sae_core.normalization import InputNormalizedSAE
from sae_core.registry import RegistryError

D, F, K = 12, 40, 5  # D != F so a transposed matrix can never pass


def cli_main(argv: list[str]) -> int:
    """The CLI with only this file's subcommand registered, so another command's import error (the CLI
    discovers every module in workflows/commands) cannot fail these tests."""
    from workflows import cli

    return cli.main(argv, modules=["import_sae"])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def x_batch(n=32):
    return rand(n, D, seed=99) * 3 + 1


def topk_relu(h, k):
    vals, idx = h.topk(k, dim=-1)
    return torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))


def assert_reproduces(sae, x, latents_ref, x_hat_ref):
    with torch.no_grad():
        out = sae(x)
        torch.testing.assert_close(sae.encode(x), latents_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.latents_BF, latents_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x_hat_BD, x_hat_ref, atol=1e-5, rtol=1e-5)
    assert (latents_ref != 0).any()


# -- sparsify -------------------------------------------------------------------------------------
def write_sparsify(folder, enc_FD, enc_b_F, W_dec_FD, b_dec_D, **cfg_changes):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"activation": "topk", "k": K, "num_latents": F, "expansion_factor": 32, "normalize_decoder": True,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **cfg_changes}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": enc_FD, "encoder.bias": enc_b_F, "W_dec": W_dec_FD, "b_dec": b_dec_D},
              str(folder / "sae.safetensors"))
    return folder


def test_sparsify_import_reproduces_sparsify_forward(tmp_path):
    enc, enc_b, W_dec, b_dec = rand(F, D, seed=1), rand(F, seed=2), rand(F, D, seed=3), rand(D, seed=4)
    src = write_sparsify(tmp_path / "layers.3", enc, enc_b, W_dec, b_dec)
    x = x_batch()
    pre = torch.relu((x - b_dec) @ enc.T + enc_b)  # sparsify: relu, then top-k
    vals, idx = pre.topk(K, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, idx, vals)
    x_hat = latents @ W_dec + b_dec  # W_dec is [F, D]: no transpose
    assert detect_format(src) == "sparsify"
    imported = import_sae(src)
    assert imported.format == "sparsify" and imported.sae.cfg.k == K
    assert_reproduces(imported.sae, x, latents, x_hat)
    with pytest.raises(SAEFormatError, match="layers.3"):  # a run folder: pick the hook's subfolder
        import_sae(tmp_path, "sparsify")


def test_sparsify_transposed_decoder_is_named(tmp_path):
    src = write_sparsify(tmp_path / "s", rand(F, D), rand(F), rand(D, F), rand(D))
    with pytest.raises(SAEFormatError, match=r"'W_dec' has shape \(12, 40\), expected \(40, 12\)"):
        import_sae(src, "sparsify")
    src = write_sparsify(tmp_path / "t", rand(F, D), rand(F), rand(F, D), rand(D), transcode=True)
    with pytest.raises(SAEFormatError, match="transcode.*not supported yet"):
        import_sae(src, "sparsify")


# -- Gemma Scope ----------------------------------------------------------------------------------
def gemmascope_arrays():
    return {"W_enc": rand(D, F, seed=5), "W_dec": rand(F, D, seed=6), "b_enc": rand(F, seed=7) * 0.5,
            "b_dec": rand(D, seed=8), "threshold": rand(F, seed=9).abs() + 0.5}


def test_gemmascope_import_reproduces_jumprelu(tmp_path):
    p = gemmascope_arrays()
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    x = x_batch()
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope does not subtract b_dec first
    latents = torch.relu(pre) * (pre > p["threshold"])
    x_hat = latents @ p["W_dec"] + p["b_dec"]
    imported = import_sae(tmp_path)
    assert imported.format == "gemmascope" and imported.sae.cfg.apply_b_dec_to_input is False
    assert_reproduces(imported.sae, x, latents, x_hat)


def test_gemmascope_missing_threshold_and_pickle(tmp_path):
    p = gemmascope_arrays()
    del p["threshold"]
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    with pytest.raises(SAEFormatError, match="threshold"):
        import_sae(tmp_path / "params.npz")
    np.savez(tmp_path / "evil.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SAEFormatError, match="pickle"):
        import_sae(tmp_path / "evil.npz", "gemmascope")


# -- OpenAI ---------------------------------------------------------------------------------------
def openai_state(activation="TopK"):
    return {"encoder.weight": rand(F, D, seed=10), "decoder.weight": rand(D, F, seed=11), "pre_bias": rand(D, seed=12),
            "latent_bias": rand(F, seed=13), "stats_last_nonzero": torch.zeros(F, dtype=torch.long),
            "activation": activation, "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}


def openai_reference(s, x):
    mu = x.mean(dim=-1, keepdim=True)
    std = (x - mu).std(dim=-1, keepdim=True)
    x_n = (x - mu) / (std + 1e-5)
    latents = topk_relu((x_n - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"], K)
    recon_n = latents @ s["decoder.weight"].T + s["pre_bias"]
    return latents, recon_n * std + mu


def test_openai_import_layer_norms_and_survives_our_folder(tmp_path):
    s = openai_state()
    torch.save(s, tmp_path / "ae.pt")
    x = x_batch()
    latents, x_hat = openai_reference(s, x)
    imported = import_sae(tmp_path / "ae.pt")
    assert imported.format == "openai" and isinstance(imported.sae, InputNormalizedSAE)
    assert_reproduces(imported.sae, x, latents, x_hat)
    save_sae(imported.sae, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "layer_norm" and cfg["architecture"] == "topk"
    assert_reproduces(load_sae(tmp_path / "ours"), x, latents, x_hat)
    (tmp_path / "ours" / "sae_ray.json").unlink()  # as SAELens would see it
    assert_reproduces(load_sae(tmp_path / "ours"), x, latents, x_hat)


def test_openai_refuses_pickled_objects_and_names_missing_tensor(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(SAEFormatError, match="weights_only"):
        import_sae(tmp_path / "module.pt", "openai")
    s = openai_state()
    del s["latent_bias"]
    torch.save(s, tmp_path / "bad.pt")
    with pytest.raises(SAEFormatError, match="latent_bias"):
        import_sae(tmp_path / "bad.pt")


# -- SAELens folders written by another tool -----------------------------------------------------
def write_saelens(folder, arch, tensors, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.1.hook_resid_post", "context_size": 64}, **extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_reference(arch, t, x):
    x_in = x - t["b_dec"]
    if arch == "gated":
        gate = x_in @ t["W_enc"] + t["b_gate"]
        mag = x_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
        latents = (gate > 0) * torch.relu(mag)
    else:
        h = x_in @ t["W_enc"] + t["b_enc"]
        latents = {"standard": torch.relu(h), "topk": topk_relu(h, K) if arch == "topk" else None,
                   "jumprelu": torch.relu(h) * (h > t.get("threshold", 0))}[arch]
    return latents, latents @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_foreign_folder(tmp_path, arch):
    t = {"W_enc": rand(D, F, seed=20), "W_dec": rand(F, D, seed=21), "b_dec": rand(D, seed=22)}
    if arch == "gated":
        t.update(b_gate=rand(F, seed=23), b_mag=rand(F, seed=24), r_mag=rand(F, seed=25) * 0.1)
    else:
        t["b_enc"] = rand(F, seed=26)
    if arch == "jumprelu":
        t["threshold"] = rand(F, seed=27).abs()
    src = write_saelens(tmp_path / arch, arch, t, **({"k": K} if arch == "topk" else {}))
    imported = import_sae(src)
    assert imported.format == "saelens" and imported.metadata["hook_name"] == "blocks.1.hook_resid_post"
    x = x_batch()
    assert_reproduces(imported.sae, x, *saelens_reference(arch, t, x))


def test_saelens_bad_folders_name_the_problem(tmp_path):
    t = {"W_enc": rand(D, F), "b_enc": rand(F), "W_dec": rand(F, D), "b_dec": rand(D)}
    with pytest.raises(RegistryError, match="'architecture'.*'mystery'"):
        import_sae(write_saelens(tmp_path / "a", "mystery", t))
    with pytest.raises(SAEFormatError, match="threshold"):
        import_sae(write_saelens(tmp_path / "c", "jumprelu", t))
    with pytest.raises(SAEFormatError, match="'b_dec' has shape"):
        import_sae(write_saelens(tmp_path / "d", "standard", {**t, "b_dec": rand(D + 1)}))


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoder_layouts_import(tmp_path, arch):
    d_out = 7  # != D and != F: a transposed or misplaced matrix cannot pass
    t = {"W_enc": rand(D, F, seed=30), "b_enc": rand(F, seed=31), "W_dec": rand(F, d_out, seed=32),
         "b_dec": rand(d_out, seed=33)}
    if "jumprelu" in arch:
        t["threshold"] = rand(F, seed=34).abs()
    if "skip" in arch:
        t["W_skip"] = rand(d_out, D, seed=35)
    src = write_saelens(tmp_path / arch, arch, t, d_out=d_out, apply_b_dec_to_input=False)
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["metadata"]["hook_name_out"] = "blocks.1.hook_mlp_out"
    (src / "cfg.json").write_text(json.dumps(cfg))
    imported = import_sae(src)
    assert imported.metadata["hook_name_out"] == "blocks.1.hook_mlp_out"
    x = x_batch()
    h = x @ t["W_enc"] + t["b_enc"]
    latents = torch.relu(h) * (h > t["threshold"]) if "jumprelu" in arch else torch.relu(h)
    y_hat = latents @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "skip" in arch else 0)
    assert_reproduces(imported.sae, x, latents, y_hat)


def test_our_folder_round_trips_through_import(tmp_path):
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config("jumprelu", d_in=D, d_sae=F))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_sae(sae, tmp_path / "ours", metadata={"hook_name": "blocks.0.hook_resid_post"})
    imported = import_sae(tmp_path / "ours")
    x = x_batch()
    with torch.no_grad():
        ref = sae.eval()(x)
    with torch.no_grad():  # decoder norms are folded at save: latents rescale, reconstructions agree
        torch.testing.assert_close(imported.sae(x).x_hat_BD, ref.x_hat_BD, atol=1e-5, rtol=1e-5)
    assert imported.metadata["hook_name"] == "blocks.0.hook_resid_post"


def test_cli_import_writes_loadable_folder_and_errors_are_one_line(tmp_path, capsys):
    s = openai_state()
    torch.save(s, tmp_path / "ae.pt")
    assert cli_main(["import", "--format", "openai", str(tmp_path / "ae.pt"), "--out", str(tmp_path / "out"),
                 "--hook-name", "blocks.8.hook_resid_post", "--model-name", "gpt2"]) == 0
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.8.hook_resid_post" and cfg["k"] == K
    x = x_batch()
    assert_reproduces(load_sae(tmp_path / "out"), x, *openai_reference(s, x))
    del s["pre_bias"]
    torch.save(s, tmp_path / "bad.pt")
    capsys.readouterr()
    assert cli_main(["import", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "pre_bias" in err and len(err.strip().splitlines()) == 1
