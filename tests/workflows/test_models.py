"""Model loading and hook points on tiny random Llama / GPT-2 / GPT-NeoX; the real SmolLM2 when slow."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import threading
import time

import pytest
import torch

from sae_core.lock import LockError
from workflows.errors import UserError
from workflows.hooks import decoder_layers, hook_target, list_hooks, run_with_hooks
from workflows.models import DEFAULT_MODEL, ensure_local, gguf_cache_dir, load_model

FAMILIES = ["tiny_llama_dir", "tiny_gpt2_dir", "tiny_neox_dir"]


@pytest.fixture(params=FAMILIES)
def tiny(request):
    return load_model(str(request.getfixturevalue(request.param)))


def ids_BT(tokenizer, batch: int = 2, seq: int = 12) -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(3, len(tokenizer), (batch, seq))
    ids[:, 0] = tokenizer.bos_token_id
    return ids


def test_list_hooks_names_every_block_and_kind(tiny):
    n = len(decoder_layers(tiny.model))
    hooks = list_hooks(tiny.model)
    assert len(hooks) == 4 * n
    assert f"blocks.{n - 1}.hook_mlp_in" in hooks and "blocks.0.hook_resid_post" in hooks


def test_hooks_agree_with_hidden_states(tiny):
    ids = ids_BT(tiny.tokenizer)
    with torch.no_grad():
        ref = tiny.model(ids, output_hidden_states=True).hidden_states
        run = run_with_hooks(tiny.model, ids, capture=["blocks.0.hook_resid_post", "blocks.1.hook_attn_out",
                                                       "blocks.1.hook_mlp_out", "blocks.1.hook_mlp_in"])
    acts = run.activations
    assert run.logits is None
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], ref[1])
    # The block adds exactly what attention and the MLP put out (sequential and parallel residuals alike).
    torch.testing.assert_close(ref[1] + acts["blocks.1.hook_attn_out"] + acts["blocks.1.hook_mlp_out"],
                               _resid_post(tiny.model, ids, 1), atol=1e-5, rtol=1e-5)
    mlp, _ = hook_target(decoder_layers(tiny.model)[1], "mlp_out")
    with torch.no_grad():
        torch.testing.assert_close(mlp(acts["blocks.1.hook_mlp_in"]), acts["blocks.1.hook_mlp_out"])


def _resid_post(model, ids, layer):
    with torch.no_grad():
        return run_with_hooks(model, ids, capture=[f"blocks.{layer}.hook_resid_post"]).activations[
            f"blocks.{layer}.hook_resid_post"]


def test_forward_stops_at_the_deepest_hook(tiny):
    layers = decoder_layers(tiny.model)
    calls = []
    handle = layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            run_with_hooks(tiny.model, ids_BT(tiny.tokenizer), capture=["blocks.0.hook_mlp_out"])
            assert calls == []
            run = run_with_hooks(tiny.model, ids_BT(tiny.tokenizer), capture=["blocks.0.hook_mlp_out"],
                                 stop_at_last=False)
    finally:
        handle.remove()
    assert calls == [1] and run.logits is not None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in layers.modules() if m is not layers[-1])


def test_replace_changes_downstream_and_capture_sees_the_original(tiny):
    ids = ids_BT(tiny.tokenizer)
    hook = "blocks.0.hook_resid_post"
    with torch.no_grad():
        base = tiny.model(ids).logits
        same = run_with_hooks(tiny.model, ids, replace={hook: lambda x: x.clone()}).logits
        zeroed = run_with_hooks(tiny.model, ids, capture=[hook], replace={hook: torch.zeros_like}, stop_at_last=False)
        mlp_in = run_with_hooks(tiny.model, ids, replace={"blocks.1.hook_mlp_in": lambda x: 2 * x}).logits
    torch.testing.assert_close(same, base)
    assert zeroed.activations[hook].abs().sum() > 0
    assert not torch.allclose(zeroed.logits, base) and not torch.allclose(mlp_in, base)


@pytest.mark.parametrize("bad", ["blocks.9.hook_resid_post", "blocks.0.hook_resid_pre_x", "resid", "blocks.a.hook_mlp_in"])
def test_bad_hook_names_are_user_errors(tiny_llama_dir, bad):
    model = load_model(str(tiny_llama_dir)).model
    with pytest.raises(UserError, match="hook"):
        run_with_hooks(model, torch.ones(1, 4, dtype=torch.long), capture=[bad])


def test_load_model_dtype_and_bad_specs(tiny_llama_dir, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in loaded.model.parameters())
    with pytest.raises(UserError, match="dtype"):
        load_model(str(tiny_llama_dir), dtype="int8")
    with pytest.raises(UserError, match="does not exist"):
        ensure_local(str(tmp_path / "nope.gguf"))
    with pytest.raises(UserError, match="not a model folder"):
        ensure_local(str(tmp_path / "missing-folder"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so patched here
    with pytest.raises(UserError, match="cannot load"):
        load_model("someone/surely-not-a-cached-model")


def test_gguf_cache_key_follows_the_file(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    monkeypatch.setenv("SAE_RAY_CACHE", str(tmp_path / "cache"))
    first = gguf_cache_dir(gguf)
    assert first.parent == tmp_path / "cache" / "models"
    gguf.write_bytes(b"y" * 11)
    assert gguf_cache_dir(gguf) != first
    assert gguf_cache_dir(gguf, tmp_path / "other").parent == tmp_path / "other"
    # A file that is not GGUF is a clear error, and leaves no cache folder that would pass for complete.
    with pytest.raises(UserError, match="cannot load GGUF"):
        ensure_local(str(gguf))
    assert not any((p / ".complete").exists() for p in (tmp_path / "cache" / "models").glob("*"))


def test_a_second_process_waits_for_the_one_converting_and_never_converts_again(tmp_path, monkeypatch):
    """While another live process holds the cache entry's lock, ensure_local waits; when that process
    publishes the cache and releases the lock, it reads the result (converting this non-GGUF file itself
    would fail loudly). With a short wait it refuses, naming the holder."""
    import workflows.models as models
    from sae_core.lock import lock_path

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not gguf")
    target = gguf_cache_dir(gguf, tmp_path / "cache")
    target.parent.mkdir(parents=True)
    holder = subprocess.Popen(["sleep", "30"])
    try:
        lock_path(target).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        monkeypatch.setattr(models, "CONVERT_WAIT_SECONDS", 0.3)
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            ensure_local(str(gguf), tmp_path / "cache")

        def publish_then_release():
            time.sleep(0.5)
            target.mkdir()
            (target / ".complete").write_text("done")
            lock_path(target).unlink()

        monkeypatch.setattr(models, "CONVERT_WAIT_SECONDS", 30.0)
        thread = threading.Thread(target=publish_then_release)
        thread.start()
        assert ensure_local(str(gguf), tmp_path / "cache") == target
        thread.join()
    finally:
        holder.kill()
        holder.wait()
    assert not lock_path(target).exists()


@pytest.mark.slow
def test_real_smollm2_default_loss_on_default_corpus():
    from workflows.corpus import iter_documents, pack_windows

    loaded = load_model(None)
    assert loaded.name == DEFAULT_MODEL
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    hooks = list_hooks(loaded.model)
    assert len(hooks) == 4 * 30 and loaded.model.config.hidden_size == 576
    windows = pack_windows(itertools.islice(iter_documents(None), 200), loaded.tokenizer, context_size=128,
                           n_tokens=2048)
    ids = torch.from_numpy(windows.token_ids).long()
    with torch.inference_mode():
        logits = loaded.model(ids).logits
    targets = ids[:, 1:].clone()
    targets[~torch.from_numpy(windows.keep[:, 1:])] = -100
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert loss.item() < 4.0, loss
