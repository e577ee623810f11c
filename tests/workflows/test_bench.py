"""`sae bench --experiment E` on a real 4-trial sweep of tiny SAEs on a tiny model: a real local Ray, a real
sqlite MLflow, real Parquet store; every child run gets its bench/* metrics and artifact. And `sae export
--format neuronpedia` (the same Ray), checked against a brute-force pass over the same windows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sae_core import build, make_config
from sae_core.io import load_sae, save_sae
from workflows.cli import main
from workflows.corpus import iter_documents, pack_windows
from workflows.hooks import run_with_hooks
from workflows.models import load_model

HOOK = "blocks.1.hook_resid_post"
EXPERIMENT = "bench-test"
OPTIONS = ["--option", "absorption.max_words=100", "--option", "absorption.n_icl=2",
           "--option", "sparse_probing.max_per_class=20", "--option", "sparse_probing.max_tokens=24",
           "--option", "sparse_probing.tasks=builtin:stdlib-packages", "--option", "sparse_probing.ks=[1,2]"]


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def write_store(path: Path, model_dir: Path, n_tokens: int = 2000, context: int = 64) -> Path:
    """The tiny model's activations at HOOK on the default corpus, written as a store in process (what
    `sae collect` writes, without starting a Ray Data pool for 2000 tokens)."""
    import numpy as np
    import torch

    from sae_core.store import Manifest, StoreWriter, make_table
    from workflows.corpus import DEFAULT_CORPUS, EXCLUDED, iter_documents, pack_windows
    from workflows.hooks import run_with_hooks
    from workflows.models import load_model

    loaded = load_model(str(model_dir))
    windows = pack_windows(iter_documents(DEFAULT_CORPUS), loaded.tokenizer, context_size=context, n_tokens=n_tokens)
    with torch.no_grad():
        acts = run_with_hooks(loaded.model, torch.from_numpy(windows.token_ids).long(), capture=[HOOK]).activations[HOOK]
    keep = windows.keep
    w, t = np.nonzero(keep)
    meta = {"token_id": windows.token_ids[keep], "window_id": w, "position": t, "doc_id": windows.doc_ids[keep]}
    manifest = Manifest(model=str(model_dir), hooks={HOOK: {"d": acts.shape[-1]}}, context_size=context,
                        corpus=DEFAULT_CORPUS, excluded=list(EXCLUDED), bos_token_id=loaded.tokenizer.bos_token_id)
    StoreWriter(path, manifest).write_part(0, make_table(meta, {HOOK: acts[torch.from_numpy(keep)].numpy()}, "float32"))
    return path


@pytest.fixture(scope="module")
def sweep(local_ray, tiny_llama_dir, uri, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    store = write_store(root / "acts", tiny_llama_dir)
    assert main(["sweep", "--activations", str(store), "--hook", HOOK, "--arch", "topk", "--grid", "d_sae=48,96",
                 "--grid", "k=4,8", "--steps", "10", "--batch-size", "64", "--cpus-per-trial", "0.5",
                 "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--out", str(root / "sweep")]) == 0
    return root


def test_bench_experiment_fills_every_child_run_concurrently(sweep, uri, capsys):
    capsys.readouterr()
    rc = main(["bench", "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--workers", "2", "--tokens", "256",
               "--json", *OPTIONS])
    out = capsys.readouterr().out
    assert rc == 0, out
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    kids = [r for r in client.search_runs([experiment.experiment_id], "tags.sweep_trial = 'true'")]
    assert len(kids) == 4
    for run in kids:
        metrics = run.data.metrics
        assert 0 < metrics["bench/core/l0"] <= 8 and "bench/core/ce_loss_recovered" in metrics
        assert "bench/absorption/letters_evaluated" in metrics
        assert 0.0 <= metrics["bench/sparse_probing/top_1_accuracy"] <= 1.0
        assert [a.path for a in client.list_artifacts(run.info.run_id, "bench")] == ["bench/bench.json"]
        folder = Path(run.data.tags["sae_dir"])
        saved = json.loads((folder / "bench.json").read_text())
        assert set(saved["results"]) == {"core", "absorption", "sparse_probing"}
        assert saved["results"]["core"]["metrics"]["l0"] == pytest.approx(metrics["bench/core/l0"])
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 4 and "SAEs/hour" in out and "ETA" in out
    # Two actors, and their work overlapped in time: the SAEs were evaluated concurrently.
    assert len({line["worker"] for line in lines}) == 2
    overlaps = [a for a in lines for b in lines
                if a["worker"] != b["worker"] and a["started"] < b["finished"] and b["started"] < a["finished"]]
    assert overlaps


def test_bench_metrics_are_frontier_axes(sweep, uri, capsys):
    capsys.readouterr()
    rc = main(["frontier", "--experiment", EXPERIMENT, "--mlflow-uri", uri, "--x", "l0",
               "--y", "bench/sparse_probing/top_1_accuracy:max", "--no-log", "--out", str(sweep / "front")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "bench/sparse_probing/top_1_accuracy (max)" in out
    assert (sweep / "front" / "frontier_l0_bench-sparse_probing-top_1_accuracy.csv").is_file()


def test_runs_without_a_folder_tag_are_found_through_their_sae_artifact(sweep, uri, tmp_path):
    from workflows.bench_run import experiment_targets

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([experiment.experiment_id], "tags.sweep_trial = 'true'")[0]
    client.delete_tag(run.info.run_id, "sae_dir")  # e.g. trained on another machine
    try:
        targets = {t.run_id: t for t in experiment_targets(EXPERIMENT, uri=uri, download_dir=tmp_path)}
    finally:
        client.set_tag(run.info.run_id, "sae_dir", run.data.tags["sae_dir"])
    assert len(targets) == 4
    fetched = Path(targets[run.info.run_id].sae_dir)
    assert fetched.is_relative_to(tmp_path) and (fetched / "sae_weights.safetensors").is_file()
    assert sum(Path(t.sae_dir).is_relative_to(tmp_path) for t in targets.values()) == 1


def test_bench_refuses_bad_input(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--metrics", "core,nope"]) == 2
    assert "unknown bench metric" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--option", "absorption=3"]) == 2
    assert "METRIC.KEY=VALUE" in capsys.readouterr().err


# -- sae export --format neuronpedia ----------------------------------------------------------------
EXPORT_CONTEXT, EXPORT_TOKENS = 32, 300


@pytest.fixture(scope="module")
def export_sae_dir(tmp_path_factory, tiny_llama_dir):
    torch.manual_seed(0)
    sae = build(make_config("relu", d_in=48, d_sae=24))
    with torch.no_grad():
        sae.b_enc.fill_(-0.02)
    return save_sae(sae, tmp_path_factory.mktemp("sae"),
                    metadata={"hook_name": HOOK, "model_name": str(tiny_llama_dir), "context_size": EXPORT_CONTEXT})


def read_gz(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_neuronpedia_export_layout_and_values(local_ray, export_sae_dir, tiny_llama_dir, shakespeare, tmp_path):
    out = tmp_path / "np"
    assert main(["export", str(export_sae_dir), "--format", "neuronpedia", "--out", str(out), "--tokens", str(EXPORT_TOKENS),
                 "--corpus", str(shakespeare), "--features", "0-9", "--batch-features", "4", "--model-id", "tiny",
                 "--source-set", "res-test", "--workers", "1"]) == 0
    root = out / "tiny" / "1-res-test"
    for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"):
        assert len((root / name).read_text().splitlines()) == 1
    assert sorted(p.name for p in (root / "features").iterdir()) == [f"batch-{i}.jsonl.gz" for i in range(3)]
    features = [row for i in range(3) for row in read_gz(root / "features" / f"batch-{i}.jsonl.gz")]
    activations = [row for i in range(3) for row in read_gz(root / "activations" / f"batch-{i}.jsonl.gz")]
    assert [f["index"] for f in features] == [str(i) for i in range(10)]
    assert {f["layer"] for f in features} == {"1-res-test"} and {f["hookName"] for f in features} == {HOOK}

    loaded, sae = load_model(str(tiny_llama_dir)), load_sae(export_sae_dir)
    windows = pack_windows(iter_documents(str(shakespeare)), loaded.tokenizer, context_size=EXPORT_CONTEXT, n_tokens=EXPORT_TOKENS)
    with torch.no_grad():
        ids = torch.from_numpy(windows.token_ids).long()
        acts = run_with_hooks(loaded.model, ids, capture=[HOOK]).activations[HOOK]
        lat = sae.encode(acts) * torch.from_numpy(windows.keep)[..., None]
    n_tokens = int(windows.keep.sum())
    for f in features:
        col = lat[..., int(f["index"])]
        assert f["frac_nonzero"] == pytest.approx(float((col > 0).sum()) / n_tokens)
        assert f["maxActApprox"] == pytest.approx(float(col.max()), rel=1e-4)
        assert sum(f["freq_hist_data_bar_heights"]) == int((col > 0).sum())
        assert len(f["pos_str"]) == len(f["pos_values"]) == 10 and f["pos_values"][0] >= f["neg_values"][0]
        rows = [a for a in activations if a["index"] == f["index"]]
        top = [a for a in rows if a["binMin"] == -1.0]
        if float(col.max()) > 0:
            assert top[0]["maxValue"] == pytest.approx(float(col.max()), rel=1e-2)  # contexts are float16
            assert top[0]["values"][top[0]["maxValueTokenIndex"]] == top[0]["maxValue"]
        for a in rows:
            assert len(a["tokens"]) == len(a["values"]) and all(isinstance(t, str) for t in a["tokens"])
