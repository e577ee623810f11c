"""`sae run` end to end on the tiny recipe and a tiny random Llama: store, Ray Train, eval, dashboard."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from workflows.pipeline import run_pipeline
from workflows.recipes import get_recipe


def test_run_tiny_recipe_end_to_end_and_rerun_reuses(local_ray, tiny_llama_dir, shakespeare, tmp_path):
    recipe = get_recipe("tiny", {"model": str(tiny_llama_dir), "corpus": str(shakespeare)})
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    result = run_pipeline(recipe, out=tmp_path / "run", mlflow_uri=uri, experiment="pipeline")
    m = result.metrics
    assert 0 < m["l0"] <= 8 and 0 < m["fvu"] < 1.5
    assert set(result.timings) == {"collect", "train", "evaluate", "dashboard"}
    assert (result.dashboard / "index.html").is_file()
    assert (result.sae_dir / "sparsity.safetensors").is_file()
    eval_json = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert eval_json["ce_loss_recovered"] == m["ce_loss_recovered"]
    run = MlflowClient(uri).get_run(result.mlflow_run_id)
    assert run.data.metrics["eval/ce_loss_recovered"] == m["ce_loss_recovered"]
    assert "time/collect" in run.data.metrics and run.data.params["arch"] == "topk"

    again = run_pipeline(recipe, out=tmp_path / "run", mlflow_uri=uri, experiment="pipeline")
    assert again.mlflow_run_id == result.mlflow_run_id  # the store and the SAE were reused, not redone
    assert again.timings["train"] < result.timings["train"]
