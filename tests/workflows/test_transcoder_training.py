"""Transcoders and crosscoders on a real (tiny, random) model: a store with several hooks from one
collection pass, `sae train --out-hook` / repeated `--hook`, Ray Train on (input, target) pairs, and
`sae eval` splicing a transcoder in place of the MLP output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sae_core.io import load_sae
from sae_core.store import ActivationStore
from sae_core.trainer import TrainConfig
from workflows.evaluate import evaluate_per_site, evaluate_sae, held_out_windows
from workflows.job import TrainJob
from workflows.models import load_model
from workflows.training import train_local

MLP_IN, MLP_OUT = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
RESID = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
CONTEXT = 32


def sae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory, local_ray, tiny_llama_dir, shakespeare) -> ActivationStore:
    from workflows.activations import CollectConfig, collect

    out = tmp_path_factory.mktemp("tc") / "acts"
    cfg = CollectConfig(hooks=[MLP_IN, MLP_OUT, *RESID], n_tokens=12_000, model=str(tiny_llama_dir),
                        corpus=str(shakespeare), context_size=CONTEXT, out=str(out))
    return ActivationStore(collect(cfg).path)


def transcoder_job(store: ActivationStore, arch: str, out, **train) -> TrainJob:
    return TrainJob(activations=str(store.root), hook=MLP_IN, out_hook=MLP_OUT, arch=arch,
                    sae={"d_sae": 192, "k": 8}, out=str(out), eval_fraction=0.1,
                    train=TrainConfig(steps=300, batch_size=256, lr=3e-3, log_every=100, seed=0, **train))


def test_transcoders_reconstruct_the_mlp_output_and_skip_helps(store, tmp_path, tiny_llama_dir):
    results = {arch: train_local(transcoder_job(store, arch, tmp_path / arch)) for arch in ("transcoder", "skip_transcoder")}
    plain, skip = results["transcoder"], results["skip_transcoder"]
    print(f"\ntiny Llama {MLP_IN} -> {MLP_OUT}, d_sae=192 k=8, 300 steps: transcoder {json.dumps(plain)}, "
          f"skip transcoder {json.dumps(skip)}")
    assert plain["fvu"] < 0.5, plain  # the mean predictor has FVU 1
    assert abs(skip["l0"] - plain["l0"]) < 0.25 * plain["l0"], results  # equal sparsity budget (threshold-based)
    assert skip["fvu"] <= plain["fvu"], results
    cfg = json.loads((tmp_path / "skip_transcoder" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_out"] == store.d(MLP_OUT)
    assert cfg["metadata"]["hook_name"] == MLP_IN and cfg["metadata"]["hook_name_out"] == MLP_OUT
    # The saved folder reads raw MLP inputs and writes raw MLP outputs: check against the store.
    loaded = load_sae(tmp_path / "skip_transcoder")
    x, y = store.read_hook(MLP_IN, 11_000), store.read_hook(MLP_OUT, 11_000)
    with torch.no_grad():
        fvu = float((loaded(x).x_hat_BD - y).pow(2).sum() / (y - y.mean(dim=0)).pow(2).sum())
    assert fvu == pytest.approx(skip["fvu"], rel=0.2)


def test_eval_splices_a_transcoder_in_place_of_the_mlp(store, tmp_path, tiny_llama_dir):
    train_local(transcoder_job(store, "transcoder", tmp_path / "tc"))
    model = load_model(str(tiny_llama_dir))
    windows = held_out_windows(model.tokenizer, corpus=None, context_size=CONTEXT, n_tokens=256)
    result = evaluate_sae(load_sae(tmp_path / "tc"), model.model, MLP_IN, windows, out_hook=MLP_OUT)
    assert result.ce_loss_spliced != result.ce_loss_clean and result.ce_loss_zero != result.ce_loss_clean
    assert result.fvu < 1.0 and result.kl_div >= 0
    out = sae("eval", str(tmp_path / "tc"), "--model", str(tiny_llama_dir), "--tokens", "256",
              "--context-size", str(CONTEXT), "--corpus", "builtin:stdlib")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "tc" / "eval.json").read_text())
    assert report["out_hook"] == MLP_OUT and report["ce_loss_recovered"] == pytest.approx(result.ce_loss_recovered)


def test_crosscoder_on_two_layers_reports_fvu_per_source(store, tmp_path, tiny_llama_dir):
    out = tmp_path / "cc"
    result = sae("train", "--activations", str(store.root), "--hook", RESID[0], "--hook", RESID[1], "--arch",
                 "crosscoder", "--d-sae", "192", "--set", "activation=\"topk\"", "--k", "8", "--steps", "200",
                 "--batch-size", "256", "--lr", "3e-3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fvu_source_0"] < 1 and metrics["fvu_source_1"] < 1
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["n_sources"] == 2 and cfg["metadata"]["hook_names"] == RESID
    model = load_model(str(tiny_llama_dir))
    windows = held_out_windows(model.tokenizer, corpus=None, context_size=CONTEXT, n_tokens=256)
    per_source = evaluate_per_site(load_sae(out), model.model, RESID, windows)
    assert set(per_source) >= {f"fvu/{h}" for h in RESID} and 0 < per_source["l0"] <= 8
    assert all(0 <= per_source[f"fvu/{h}"] < 1 for h in RESID)


def test_transcoder_on_ray_train_matches_in_process(store, tmp_path):
    from workflows.train_ray import DistributedOptions, train_distributed

    # ReLU + L1: no per-batch statistic (a TopK transcoder's inference threshold is estimated per rank,
    # like BatchTopK's), so 2 workers must match 1 exactly.
    job = transcoder_job(store, "skip_transcoder", tmp_path / "local")
    job.sae = {"d_sae": 192, "activation": "relu"}
    job.train = TrainConfig(**{**job.train.to_dict(), "steps": 40})
    local = train_local(job)
    job.out = str(tmp_path / "ray")
    ray_result = train_distributed(job, DistributedOptions(workers=2, checkpoint_every=20))
    assert ray_result["steps"] == 40
    for name in ("fvu", "l0", "mse"):
        assert ray_result[name] == pytest.approx(local[name], rel=1e-3, abs=1e-5), name
    a, b = load_sae(tmp_path / "local").state_dict(), load_sae(tmp_path / "ray").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--hook", MLP_IN, "--arch", "transcoder"], "name its target with --out-hook"),
    (["--hook", MLP_IN, "--out-hook", MLP_OUT, "--arch", "topk"], "--out-hook is for transcoders"),
    (["--hook", RESID[0], "--hook", RESID[1], "--arch", "topk"], "several --hook values need"),
    (["--hook", MLP_IN, "--out-hook", "blocks.7.hook_mlp_out", "--arch", "transcoder"], "blocks.7.hook_mlp_out"),
])
def test_bad_hook_combinations_are_one_line_exit_2(store, tmp_path, args, message):
    result = sae("train", "--activations", str(store.root), *args, "--d-sae", "64", "--k", "4", "--steps", "2",
                 "--batch-size", "64", "--out", str(tmp_path / "o"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_crosscoder_sources_of_different_widths_are_refused(tmp_path):
    import numpy as np

    from sae_core.store import Manifest, StoreWriter, make_table

    writer = StoreWriter(tmp_path / "two", Manifest(model="m", hooks={"a": {"d": 4}, "b": {"d": 6}}))
    meta = {k: np.zeros(300) for k in ("token_id", "window_id", "position", "doc_id")}
    writer.write_part(0, make_table(meta, {"a": np.ones((300, 4)), "b": np.ones((300, 6))}, "float32"))
    result = sae("train", "--activations", str(tmp_path / "two"), "--hook", "a", "--hook", "b", "--arch", "crosscoder",
                 "--d-sae", "8", "--steps", "2", "--batch-size", "64", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "sources must have one width" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_real_smollm2_transcoder_recovers_the_mlp(tmp_path, local_ray):
    """Collect ~8k tokens of SmolLM2's blocks.6 MLP in/out, train a TopK skip transcoder briefly,
    splice it in place of the MLP on the next 1k tokens."""
    from workflows.activations import CollectConfig, collect

    hook_in, hook_out = "blocks.6.hook_mlp_in", "blocks.6.hook_mlp_out"
    store = ActivationStore(collect(CollectConfig(hooks=[hook_in, hook_out], n_tokens=8_000,
                                                  out=str(tmp_path / "acts"))).path)
    job = TrainJob(activations=str(store.root), hook=hook_in, out_hook=hook_out, arch="skip_transcoder",
                   sae={"d_sae": 1152, "k": 32, "threshold_momentum": 0.9}, out=str(tmp_path / "tc"),
                   train=TrainConfig(steps=150, batch_size=1024, lr=2e-3, lr_decay_steps=40, log_every=1000))
    held_metrics = train_local(job)
    model = load_model()
    windows = held_out_windows(model.tokenizer, corpus=None, context_size=128, n_tokens=1024,
                               skip_tokens=store.n_tokens)
    result = evaluate_sae(load_sae(tmp_path / "tc"), model.model, hook_in, windows, batch_size=4, out_hook=hook_out)
    print(f"\nSmolLM2 {hook_in} -> {hook_out}, skip transcoder d_sae=1152 k=32, 150 steps on {store.n_tokens} "
          f"tokens (held-out store FVU {held_metrics['fvu']:.3f}), eval on {result.n_ce_tokens} positions: "
          f"{json.dumps(result.metrics())}")
    assert result.ce_loss_zero > result.ce_loss_clean  # removing the MLP's output hurts the model
    assert result.ce_loss_spliced < result.ce_loss_zero and result.ce_loss_recovered > 0.3
    assert result.fvu < 0.8 and 16 < result.l0 < 64  # the inference threshold keeps about k=32 per token


PLUGIN = '''"""A throw-away transcoder-like architecture, written as a user would: one file outside sae_core."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sae_core.architectures.base import SAEConfig, SAEOutput, SparseAutoencoder, Wiring, mse_loss
from sae_core.registry import register


@dataclass(kw_only=True)
class ShrinkTranscoderConfig(SAEConfig):
    d_out: int | None = None
    """Width of the site written; None means d_in."""
    apply_b_dec_to_input: bool = False
    """b_dec lives in the output space."""
    shrink: float = 0.5
    """Soft threshold subtracted from every pre-activation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.d_out = self.d_out or self.d_in


class ShrinkTranscoder(SparseAutoencoder):
    wiring = Wiring.PAIR
    homogeneous = False
    saelens_architecture = "shrink_transcoder"

    def __init__(self, cfg: ShrinkTranscoderConfig):
        super().__init__(cfg)
        self.W_dec = nn.Parameter(nn.functional.normalize(torch.randn(cfg.d_sae, cfg.d_out), dim=1))
        self.W_enc = nn.Parameter(torch.randn(cfg.d_in, cfg.d_sae) / cfg.d_in**0.5)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    def activation(self, h_BF: Tensor) -> Tensor:
        return torch.relu(h_BF - self.cfg.shrink)

    def init_encoder_from_decoder(self) -> None:
        pass

    def forward(self, x_BD: Tensor, *, dead_mask_F: Tensor | None = None, target_BO: Tensor | None = None) -> SAEOutput:
        latents_BF = self.activation(self.pre_acts(x_BD))
        y_hat_BO = self.decode(latents_BF)
        y_BO = y_hat_BO.detach() if target_BO is None else target_BO
        zero = y_hat_BO.new_zeros(())
        return SAEOutput(y_hat_BO, latents_BF, mse_loss(y_hat_BO, y_BO), zero, zero)

    def saelens_cfg_extra(self) -> dict:
        return {"d_out": self.cfg.d_out}


register("shrink_transcoder", ShrinkTranscoderConfig, ShrinkTranscoder, "soft-thresholded transcoder (a test plugin)")
'''


def test_a_transcoder_like_architecture_from_one_file_outside_the_package(store, tmp_path, tiny_llama_dir):
    """The workflows ask the architecture's spec, never its name: one file in a package of its own is
    trained (in process and on Ray Train), saved, reloaded and spliced into the model by the CLI."""
    package = tmp_path / "plugins" / "plugarch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "shrink_transcoder.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")]),
           "SAE_RAY_ARCHITECTURES": "plugarch.shrink_transcoder"}
    out = tmp_path / "shrink"
    train = ["train", "--activations", str(store.root), "--hook", MLP_IN, "--out-hook", MLP_OUT, "--arch",
             "shrink_transcoder", "--d-sae", "96", "--steps", "60", "--batch-size", "256", "--lr", "3e-3"]
    result = sae_env(env, *train, "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] > 0, metrics
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "shrink_transcoder" and cfg["metadata"]["hook_name_out"] == MLP_OUT

    result = sae_env(env, *train, "--steps", "20", "--workers", "1", "--out", str(tmp_path / "shrink-ray"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "shrink-ray" / "metrics.json").read_text())["steps"] == 20

    evaluated = sae_env(env, "eval", str(out), "--model", str(tiny_llama_dir), "--tokens", "256",
                        "--context-size", str(CONTEXT), "--corpus", "builtin:stdlib")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["out_hook"] == MLP_OUT and report["ce_loss_spliced"] != report["ce_loss_clean"]

    # Without the plugin the folder is refused in one line, not misread as something else.
    plain = {k: v for k, v in env.items() if k != "SAE_RAY_ARCHITECTURES"}
    refused = sae_env(plain, "eval", str(out), "--model", str(tiny_llama_dir), "--tokens", "64")
    assert refused.returncode == 2 and "unknown architecture 'shrink_transcoder'" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def sae_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True, env=env)
