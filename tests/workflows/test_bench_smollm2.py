"""Absorption and sparse probing on the real default model (SmolLM2-135M), offline: one small slow test."""

from __future__ import annotations

import json

import pytest
import torch

import sae_core
from sae_core.io import load_sae, save_sae
from sae_core.trainer import TrainConfig, Trainer
from workflows.absorption import absorption
from workflows.bench import BenchContext
from workflows.evaluate import held_out_windows
from workflows.models import load_model
from workflows.probing import sparse_probing

HOOK = "blocks.6.hook_resid_post"


@pytest.mark.slow
def test_absorption_and_probing_run_offline_on_smollm2(smollm2_store, tmp_path):
    acts = smollm2_store.read_hook(HOOK)
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config("topk", d_in=acts.shape[1], d_sae=1152, k=32))
    trainer = Trainer(sae, TrainConfig(steps=120, batch_size=1024, lr=1e-3, log_every=1000))
    order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))
    list(trainer.fit(acts[order[(i * 1024) % (len(acts) - 1024):][:1024]] for i in range(120)))
    sae = load_sae(save_sae(sae, tmp_path / "sae", scaling_factor=trainer.scaling_factor))  # reads raw activations
    loaded = load_model()
    ctx = BenchContext(sae=sae, sae_dir=None, loaded=loaded, hook=HOOK, device="cpu",
                       windows=held_out_windows(loaded.tokenizer, corpus=None, context_size=128, n_tokens=256),
                       options={"absorption": {"max_words": 1000, "n_icl": 3},
                                "sparse_probing": {"max_per_class": 40, "max_tokens": 48, "ks": [1, 5],
                                                  "tasks": ["builtin:stdlib-packages"]}})
    ab, sp = absorption(ctx), sparse_probing(ctx)
    print("\nSmolLM2 absorption:", json.dumps(ab.metrics), "\nsparse probing:", json.dumps(sp.metrics))
    # The model's residual stream at layer 6 knows first letters: the ground-truth probe, trained on only
    # 700 words (SAEBench uses the whole vocabulary), passes F1 >= 0.6 on several letters (9 of 26 at 1200 words).
    assert ab.metrics["letters_evaluated"] >= 5
    assert 0.0 <= ab.metrics["mean_absorption_fraction"] <= 1.0 and 0.0 <= ab.metrics["mean_full_absorption"] <= 1.0
    stdlib = sp.details["tasks"]["builtin:stdlib-packages"]["mean"]
    # Which package a docstring is from is linearly readable (0.95 measured), from the latents of even a
    # briefly trained SAE (0.90), and partly from 5 of them (0.68); chance is 0.5 (balanced one-vs-rest).
    assert stdlib["llm_accuracy"] > 0.85 and stdlib["sae_accuracy"] > 0.75
    assert stdlib["top_5_accuracy"] > 0.55
