"""Steering on a tiny Llama: scale 0 is the unsteered run, a large scale or clamp changes the tokens."""

from __future__ import annotations

import pytest
import torch

from sae_core.io import load_sae, save_sae
from sae_core.registry import build, make_config
from workflows.cli import main
from workflows.errors import UserError
from workflows.hooks import run_with_hooks
from workflows.models import load_model
from workflows.steering import steer, steering_fn

HOOK = "blocks.1.hook_resid_post"
PROMPT = "To be, or not to be, that is"


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_llama_dir):
    torch.manual_seed(0)
    sae = build(make_config("relu", d_in=48, d_sae=40))
    return save_sae(sae, tmp_path_factory.mktemp("sae"), metadata={"hook_name": HOOK, "model_name": str(tiny_llama_dir)})


def test_scale_zero_is_the_unsteered_greedy_generation(loaded, sae_dir):
    result = steer(loaded, load_sae(sae_dir), HOOK, 3, 0.0, PROMPT, 8)
    assert result.steered_ids == result.baseline_ids and result.steered_text == result.baseline_text
    # The baseline is what Hugging Face's own greedy decoding gives.
    ids = torch.tensor([result.prompt_ids])
    hf = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=loaded.tokenizer.pad_token_id, eos_token_id=None)
    assert hf[0, ids.shape[1]:].tolist()[: len(result.baseline_ids)] == result.baseline_ids


def test_large_scale_changes_the_tokens(loaded, sae_dir):
    sae = load_sae(sae_dir)
    result = steer(loaded, sae, HOOK, 3, 20.0, PROMPT, 8)
    assert result.steered_ids != result.baseline_ids
    # The hook moved every position by exactly scale * unit decoder row.
    x = torch.randn(1, 5, 48)
    moved = steering_fn(sae, 3, 20.0, None)(x) - x
    row = sae.W_dec.detach()[3]
    torch.testing.assert_close(moved, (20.0 * row / row.norm()).expand_as(moved))


def test_clamp_to_the_current_activation_is_a_no_op_and_a_large_clamp_steers(loaded, sae_dir):
    sae = load_sae(sae_dir)
    ids = torch.tensor([[0, 5, 9, 17, 33]])
    with torch.no_grad():
        x = run_with_hooks(loaded.model, ids, capture=[HOOK]).activations[HOOK]
        act = sae.encode(x[0])[:, 3]
        # Clamping to VALUE adds (VALUE - a) * decoder row at each position.
        out = steering_fn(sae, 3, 0.0, 2.0)(x)
    torch.testing.assert_close(out - x, ((2.0 - act)[:, None] * sae.W_dec.detach()[3])[None])
    result = steer(loaded, sae, HOOK, 3, 0.0, PROMPT, 8, clamp=60.0)
    assert result.steered_ids != result.baseline_ids


def test_cli_prints_both_and_rejects_bad_input(sae_dir, tiny_llama_dir, capsys):
    base = ["steer", str(sae_dir), "--prompt", PROMPT, "--max-new-tokens", "4"]
    assert main([*base, "--feature", "3", "--scale", "20"]) == 0
    out = capsys.readouterr().out
    assert "unsteered:" in out and "steered:" in out and "feature 3 at blocks.1.hook_resid_post" in out
    assert main([*base, "--feature", "40", "--scale", "1"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*base, "--feature", "1", "--scale", "1", "--hook", "blocks.7.hook_resid_post"]) == 2
    with pytest.raises(SystemExit):
        main([*base, "--feature", "1", "--scale", "1", "--clamp", "3"])


def test_width_mismatch_is_a_user_error(tiny_gpt2_dir, sae_dir):
    with pytest.raises(UserError, match="width"):
        steer(load_model(str(tiny_gpt2_dir)), load_sae(sae_dir), HOOK, 0, 1.0, PROMPT, 2)
