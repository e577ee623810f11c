"""Training straight from the live model stream (no store) on Ray Train, with a tiny Llama."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from sae_core.io import load_sae
from sae_core.trainer import TrainConfig
from workflows.job import TrainJob
from workflows.train_ray import DistributedOptions, train_distributed


def test_train_from_the_live_stream(local_ray, tiny_llama_dir, shakespeare, tmp_path):
    stream = {"model": str(tiny_llama_dir), "corpus": str(shakespeare), "n_tokens": 3000, "context_size": 32}
    job = TrainJob(hook="blocks.1.hook_resid_post", arch="topk", sae={"d_sae": 128, "k": 8}, stream=stream,
                   train=TrainConfig(steps=30, batch_size=128, lr=3e-3, log_every=10), out=str(tmp_path / "sae"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    result = train_distributed(job, DistributedOptions(workers=1, cpus_per_worker=0.5, mlflow_uri=uri))
    assert result["steps"] == 30
    assert 0 < result["fvu"] < 1 and 0 < result["l0"] <= 8
    assert result["n_tokens"] > 50  # the held-out windows were run through the model at the end
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.d_in == 48  # the tiny Llama's width, read from the model, not a store
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["model_name"] == str(tiny_llama_dir)
    run = MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.params["stream.n_tokens"] == "3000" and run.data.tags["model"] == str(tiny_llama_dir)
