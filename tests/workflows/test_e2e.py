"""End-to-end training (`--loss e2e`) on a real local Ray with the tiny random Llama: it must beat an
MSE-trained SAE of the same k on held-out KL, and the CLI must refuse what makes no sense with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import sae_core
from sae_core.io import load_sae, save_sae
from sae_core.trainer import TrainConfig, Trainer
from workflows.cli import main
from workflows.e2e import hook_sample
from workflows.evaluate import evaluate_sae, held_out_windows
from workflows.job import TrainJob
from workflows.models import load_model
from workflows.sources import WindowSource, default_stream
from workflows.train_ray import DistributedOptions, train_distributed

HOOK = "blocks.1.hook_resid_post"
CONTEXT = 32
TOKENS = 8000
STEPS = 300
SAE = {"d_sae": 96, "k": 8}


@pytest.fixture
def one_thread():
    """The driver-side model runs are tiny; two threads contending with a busy neighbour core cost ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_cfg() -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=256, lr=1e-2, lr_decay_steps=100, log_every=50)


def train_mse(job: TrainJob, model) -> Path:
    """The baseline: the same tokens, SAE, initial weights, steps and schedule, trained on MSE in this process."""
    acts_ND = hook_sample(model, HOOK, WindowSource(job).windows, n_tokens=10**9, device=torch.device("cpu"))
    torch.manual_seed(job.train.seed)
    trainer = Trainer(sae_core.build(sae_core.make_config("topk", d_in=acts_ND.shape[1], **SAE)), job.train)
    trainer.initialize(acts_ND[: job.train.init_sample_tokens])  # the sample e2e initialises from
    order = torch.randperm(len(acts_ND), generator=torch.Generator().manual_seed(0))
    batches = (acts_ND[order[(i * 256) % len(order):][:256]] for i in range(STEPS))
    for _ in trainer.fit(batches):
        pass
    assert trainer.step_count == STEPS
    return save_sae(trainer.sae, job.out + "-mse", scaling_factor=trainer.scaling_factor)


def test_e2e_has_lower_kl_than_mse_at_equal_l0(local_ray, tiny_llama_dir, tmp_path, one_thread):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = TrainJob(hook=HOOK, sae=SAE, train=train_cfg(), out=str(tmp_path / "e2e"), loss="e2e",
                   stream=default_stream(str(tiny_llama_dir), TOKENS, CONTEXT), eval_tokens=2000)
    result = train_distributed(job, DistributedOptions(workers=1, mlflow_uri=uri, checkpoint_every=100))
    assert result["steps"] == STEPS and result["train_tokens"] >= TOKENS

    loaded = load_model(str(tiny_llama_dir))
    mse_dir = train_mse(job, loaded.model)
    held_out = held_out_windows(loaded.tokenizer, corpus=None, context_size=CONTEXT, n_tokens=2000,
                                skip_tokens=result["train_tokens"])
    mse = evaluate_sae(load_sae(mse_dir), loaded.model, HOOK, held_out)
    e2e = evaluate_sae(load_sae(job.out), loaded.model, HOOK, held_out)
    print(f"\nheld-out KL over {mse.n_ce_tokens} positions: mse-trained {mse.kl_div:.6f} (L0 {mse.l0:.2f}, "
          f"fvu {mse.fvu:.3f}), e2e-trained {e2e.kl_div:.6f} (L0 {e2e.l0:.2f}, fvu {e2e.fvu:.3f}); "
          f"{STEPS} steps x 256 tokens over {result['train_tokens']} training tokens")
    assert e2e.kl_div < 0.97 * mse.kl_div
    assert e2e.l0 == pytest.approx(mse.l0, abs=0.25) and e2e.l0 <= SAE["k"]
    assert e2e.fvu > mse.fvu  # it buys the KL with reconstruction the model's output does not need

    # metrics.json is the same held-out evaluation; the folder is a SAELens one naming the hook.
    metrics = json.loads((tmp_path / "e2e" / "metrics.json").read_text())
    assert metrics["kl_div"] == pytest.approx(e2e.kl_div, rel=1e-5) and "ce_loss_recovered" in metrics
    assert json.loads((tmp_path / "e2e" / "cfg.json").read_text())["metadata"]["hook_name"] == HOOK
    assert json.loads((tmp_path / "e2e" / "job.json").read_text())["kl_coefficient"] == 1.0

    client = MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["loss"] == "e2e"
    kl_history = client.get_metric_history(run.info.run_id, "kl")
    assert [m.step for m in kl_history] == list(range(50, STEPS + 1, 50))
    assert kl_history[-1].value < kl_history[0].value  # training lowered the KL it minimises
    assert run.data.metrics["final/kl_div"] == pytest.approx(e2e.kl_div, rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--activations", "somewhere"], "drop --activations"),
    (["--downstream-coef", "-1"], "coefficients must be >= 0"),
])
def test_cli_refuses_bad_e2e_input_with_one_line_exit_2(tiny_llama_dir, tmp_path, capsys, extra, message):
    argv = ["train", "--loss", "e2e", "--from-model", str(tiny_llama_dir), "--hook", HOOK, "--d-sae", "64",
            "--k", "4", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # refused before anything was started or written


def test_downstream_coef_without_e2e_is_refused(tmp_path, capsys):
    assert main(["train", "--activations", str(tmp_path), "--hook", HOOK, "--d-sae", "64", "--k", "4",
                 "--downstream-coef", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "add --loss e2e" in capsys.readouterr().err
