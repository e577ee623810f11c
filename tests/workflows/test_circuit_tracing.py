"""Circuit tracing on the tiny Llama: a transcoder set trained on Ray (one Tune trial per layer, MLflow child runs),
evaluated spliced whole; attribution graphs with their completeness identity and ablation check; the HTML viewer
in headless Chromium; the circuit-tracer export read back by an independent forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_core.io import is_finished_sae, read_cfg
from sae_core.store import read_manifest
from workflows.circuit import ablation_check, attribute, path_effect
from workflows.circuit_check import agrees, check_prompt, logit_row, predicted_change
from workflows.cli import main
from workflows.evaluate import held_out_windows
from workflows.models import load_model
from workflows.pipeline import run_pipeline
from workflows.recipes import get_recipe
from workflows.replacement import DecoderRunner
from workflows.set_eval import evaluate_set
from workflows.transcoder_set import SET_FILE, load_set, parse_layers, read_set

PROMPT = "To be or not to be, that is"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def set_run(tmp_path_factory, tiny_llama_dir, shakespeare, local_ray):
    out = tmp_path_factory.mktemp("tc-set")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    recipe = get_recipe(
        "tiny-transcoders", {"model": str(tiny_llama_dir), "corpus": str(shakespeare), "tokens": 1500}
    )
    result = run_pipeline(recipe, out=out / "run", mlflow_uri=uri, experiment="tc")
    print("set pipeline stage timings:", result.timings)
    return result, uri


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def att(set_run, loaded):
    result, _ = set_run
    runner, members = DecoderRunner(loaded.model), load_set(result.sae_dir)
    return runner, members, attribute(runner, loaded.tokenizer, members, PROMPT)


def test_set_trains_one_transcoder_per_layer_as_concurrent_trials_with_child_runs(set_run):
    from mlflow.tracking import MlflowClient

    result, uri = set_run
    manifest = read_set(result.sae_dir)
    assert manifest["layers"] == [0, 1, 2] and len(manifest["members"]) == 3
    store = read_manifest(
        manifest["activations"]
    )  # one pass of the model collected every layer's MLP in and out
    assert sorted(store.hooks) == sorted(f"blocks.{i}.hook_mlp_{k}" for i in range(3) for k in ("in", "out"))
    for m in manifest["members"]:
        folder = result.sae_dir / m["path"]
        meta = read_cfg(folder)["metadata"]
        assert (
            is_finished_sae(folder)
            and meta["hook_name"] == m["hook_in"]
            and meta["hook_name_out"] == m["hook_out"]
        )
        assert 0 < m["metrics"]["fvu"] < 2 and m["metrics"]["steps"] == 40
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tc").experiment_id])
    parent = [r for r in runs if r.info.run_id == manifest["mlflow_parent_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == manifest["mlflow_parent_run_id"]]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert sorted(r.data.params["hook"] for r in children) == [m["hook_in"] for m in manifest["members"]]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.info.run_id for r in children} == {m["mlflow_run_id"] for m in manifest["members"]}
    assert "eval/ce_loss_recovered" in parent[0].data.metrics
    assert result.metrics["n_members"] == 3 and np.isfinite(result.metrics["ce_loss_spliced"])


def test_eval_on_a_set_splices_every_member_at_once(set_run, loaded, tmp_path):
    result, _ = set_run
    assert main(["eval", str(result.sae_dir), "--tokens", "256", "--out", str(tmp_path)]) == 0
    values = json.loads((tmp_path / "eval.json").read_text())
    assert values["n_members"] == 3 and 0 <= values["top1_agreement"] <= 1 and values["kl_div"] > 0
    members = load_set(result.sae_dir)
    windows = held_out_windows(
        loaded.tokenizer, corpus=read_set(result.sae_dir)["corpus"], context_size=32, n_tokens=128
    )
    whole = evaluate_set(members, loaded.model, windows)
    for layer in members:  # leaving out any one member changes the spliced model: each of them is in it
        fewer = evaluate_set({k: v for k, v in members.items() if k != layer}, loaded.model, windows)
        assert fewer["kl_div"] != whole["kl_div"]
    assert (
        main(["eval", str(result.sae_dir / "layer_00"), "--tokens", "64"]) == 0
    )  # a member alone still evaluates


def test_decoder_runner_reproduces_the_model(loaded):
    runner = DecoderRunner(loaded.model)
    ids = torch.tensor([0, 40, 41, 42, 43, 44])
    trace = runner.trace(ids)
    want = loaded.model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(trace.logits_TV, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(runner.run(runner.embed(ids), frozen=trace)[0], want, atol=1e-5, rtol=1e-5)


def test_completeness_direct_effects_sum_to_the_real_models_values(att):
    _, _, a = att
    n_feat = len(a.feats.act_N)
    assert n_feat > 10 and a.effects.A.shape == (n_feat + len(a.logit_ids), a.effects.A.shape[1])
    # Compared with the real model's values: feature pre-activations from the true MLP inputs, HF logits.
    assert a.completeness_error < 1e-4
    assert float(a.effects.A.abs().sum(1).min()) > 10 * a.completeness_error  # the identity is not 0 = 0


def test_ablating_the_top_features_moves_the_logit_as_the_graph_predicts(att):
    runner, members, a = att
    result = ablation_check(runner, members, a, k=3)
    assert len(result.features) >= 1 and result.predicted < 0
    # In the local replacement model the graph's paths predict the change exactly (no threshold crossed).
    assert result.measured_frozen == pytest.approx(result.predicted_paths, rel=1e-3, abs=1e-6)
    # In the model with live attention and norms: the same direction, roughly the amount.
    assert np.sign(result.measured) == np.sign(result.predicted)
    assert 0.2 < result.measured / result.predicted_paths < 5


def test_causal_check_reads_the_graphs_logit_row_and_predicts_along_all_its_paths(att, loaded):
    runner, members, a = att
    row = logit_row(runner, loaded.tokenizer, members, PROMPT)
    T, F = len(a.prompt.ids_T), len(a.feats.act_N)
    assert row.logit_id == int(a.logit_ids[0])
    torch.testing.assert_close(row.effects_F, a.effects.A[F, T : T + F], atol=1e-6, rtol=1e-5)
    top = torch.argsort(row.effects_F, descending=True)[:3]
    # One forward pass of the linear model = the sum over the whole graph's paths.
    assert predicted_change(runner, members, row, top) == pytest.approx(path_effect(a, top, 0), rel=1e-4)
    check = check_prompt(runner, loaded.tokenizer, members, PROMPT, k=3)
    assert check.covered == "3/3" and check.base_error < 1e-4 and check.completeness_error < 1e-4
    assert check.predicted < 0 and check.measured_frozen == pytest.approx(check.predicted, rel=1e-3)
    assert check.passes == agrees(check.predicted, check.measured)
    early = check_prompt(runner, loaded.tokenizer, members, PROMPT, k=3, below=1)
    assert early.ablated and all(name.startswith("F_0_") for name in early.ablated)


def test_causal_check_passes_only_the_predicted_direction_and_roughly_the_amount():
    assert agrees(-0.10, -0.12) and agrees(-0.10, -0.05) and agrees(0.3, 0.59)
    assert not agrees(-0.10, +0.085) and not agrees(-0.10, -0.01) and not agrees(-0.10, -0.25)
    assert not agrees(0.0, 0.0)


def test_graph_is_pruned_to_the_influence_fraction_and_consistent(att):
    _, _, a = att
    g = a.graph
    ids = [n["id"] for n in g["nodes"]]
    assert len(ids) == len(set(ids)) and all(e["source"] in ids and e["target"] in ids for e in g["links"])
    assert g["checks"]["kept_feature_influence"] >= 0.8
    kept = [n for n in g["nodes"] if n["kind"] == "feature"]
    assert 0 < len(kept) < len(a.feats.act_N)
    assert sum(n["kind"] == "logit" for n in g["nodes"]) == len(a.logit_ids)


def test_cli_attribute_writes_the_graph_and_refuses_bad_input(set_run, tmp_path, capsys):
    result, _ = set_run
    out = tmp_path / "g" / "graph.json"
    assert (
        main(["attribute", "--transcoders", str(result.sae_dir), "--prompt", PROMPT, "--out", str(out)]) == 0
    )
    graph = json.loads(out.read_text())
    assert graph["checks"]["completeness_max_abs_error"] < 1e-4 and "ablation" in graph["checks"]
    assert out.with_suffix(".html").is_file()
    assert (
        main(
            [
                "attribute",
                "--transcoders",
                str(result.sae_dir),
                "--prompt",
                PROMPT,
                "--target-token",
                "xyzzy",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert main(["attribute", "--transcoders", str(tmp_path), "--prompt", PROMPT, "--out", str(out)]) == 2
    assert "not a transcoder set" in capsys.readouterr().err
    with pytest.raises(Exception, match="range"):
        parse_layers("0-x")


def test_export_circuit_tracer_layout_read_back_independently(set_run, tmp_path):
    result, _ = set_run
    assert (
        main(["export", "--format", "circuit-tracer", str(result.sae_dir), "--out", str(tmp_path / "ct")])
        == 0
    )
    import yaml

    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["feature_input_hook"] == "mlp.hook_in"
    assert config["feature_output_hook"] == "mlp.hook_out" and len(config["transcoders"]) == 3
    members = load_set(result.sae_dir)
    x = torch.randn(64, 48) * 0.3
    for layer, path in enumerate(config["transcoders"]):
        t = load_file(path)
        assert t["W_enc"].shape == (96, 48) and t["W_dec"].shape == (96, 48) and t["W_skip"].shape == (48, 48)
        # circuit-tracer's per-layer transcoder, written from its documented math: F.linear encoder, JumpReLU.
        pre = x @ t["W_enc"].T + t["b_enc"]
        acts = pre * (pre > t["activation_function.threshold"])
        y = acts @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T
        with torch.no_grad():
            torch.testing.assert_close(y, members[layer](x).x_hat_BD, atol=1e-5, rtol=1e-4)
    partial = tmp_path / "partial"
    shutil.copytree(result.sae_dir, partial, ignore=shutil.ignore_patterns("tune"))
    manifest = json.loads((partial / SET_FILE).read_text())
    manifest["layers"], manifest["members"] = [1, 2], manifest["members"][1:]
    (partial / SET_FILE).write_text(json.dumps(manifest))
    assert main(["export", "--format", "circuit-tracer", str(partial), "--out", str(tmp_path / "ct2")]) == 2


@pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="needs headless Chromium at /usr/bin/chromium (.ci/run installs it)"
)
def test_viewer_opens_from_disk_and_links_features_to_their_dashboard(set_run, loaded, tmp_path):
    from tests.workflows.test_dashboard_browser import chromium
    from workflows.corpus import iter_documents, pack_windows
    from workflows.dashboard import DashboardConfig, batch_states, select_rows
    from workflows.dashboard_html import write_site
    from workflows.hooks import run_with_hooks

    result, _ = set_run
    set_dir = tmp_path / "set"  # a copy: the dashboard written into it stays out of the other tests' set
    shutil.copytree(result.sae_dir, set_dir, ignore=shutil.ignore_patterns("tune"))
    member = load_set(set_dir)[1]
    hook = "blocks.1.hook_mlp_in"
    windows = pack_windows(
        iter_documents(read_set(result.sae_dir)["corpus"]), loaded.tokenizer, context_size=32, n_tokens=300
    )
    with torch.no_grad():
        acts = run_with_hooks(
            loaded.model, torch.from_numpy(windows.token_ids).long(), capture=[hook]
        ).activations[hook]
        lat = member.encode(acts.reshape(-1, 48)).reshape(*acts.shape[:2], -1)
    features = np.arange(lat.shape[-1])
    state = batch_states(lat, windows.keep, np.arange(len(lat)), features, k=8, s=16, left=12, right=4)
    dash = set_dir / "layer_01" / "dashboard"
    cfg = DashboardConfig(
        sae=str(set_dir / "layer_01"),
        model="tiny",
        hook=hook,
        corpus="tiny",
        n_tokens=300,
        out=str(dash),
        context_size=32,
    )
    write_site(dash, cfg, state, select_rows(state, None), windows, loaded, member)
    out = tmp_path / "graphs" / "graph.json"
    assert main(["attribute", "--transcoders", str(set_dir), "--prompt", PROMPT, "--out", str(out)]) == 0
    graph = json.loads(out.read_text())
    linked = [n for n in graph["nodes"] if "dashboard" in n]
    assert linked and all(n["layer"] == 1 for n in linked)
    assert all((out.parent / n["dashboard"]).is_file() for n in linked)  # relative links to pages that exist
    dom, console = chromium(out.with_suffix(".html").as_uri(), tmp_path, "--dump-dom")
    assert console == "" and 'data-ready="1"' in dom
    assert dom.count("<circle") == len(graph["nodes"]) and dom.count("<line") == len(graph["links"])
    for n in linked:
        assert f'href="{n["dashboard"]}"' in dom
