"""`sae export --format neuronpedia`: the dashboard statistics in Neuronpedia's bulk-import layout, checked
against a brute-force pass over the same windows."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from sae_core import build, make_config
from sae_core.io import load_sae, save_sae
from workflows.cli import main
from workflows.corpus import iter_documents, pack_windows
from workflows.hooks import run_with_hooks
from workflows.models import load_model

HOOK = "blocks.1.hook_resid_post"
CONTEXT, TOKENS = 32, 300


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_llama_dir):
    torch.manual_seed(0)
    sae = build(make_config("relu", d_in=48, d_sae=24))
    with torch.no_grad():
        sae.b_enc.fill_(-0.02)
    return save_sae(sae, tmp_path_factory.mktemp("sae"),
                    metadata={"hook_name": HOOK, "model_name": str(tiny_llama_dir), "context_size": CONTEXT})


def read_gz(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_neuronpedia_export_layout_and_values(local_ray, sae_dir, tiny_llama_dir, shakespeare, tmp_path):
    out = tmp_path / "np"
    assert main(["export", str(sae_dir), "--format", "neuronpedia", "--out", str(out), "--tokens", str(TOKENS),
                 "--corpus", str(shakespeare), "--features", "0-9", "--batch-features", "4", "--model-id", "tiny",
                 "--source-set", "res-test", "--workers", "2"]) == 0
    root = out / "tiny" / "1-res-test"
    for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"):
        assert len((root / name).read_text().splitlines()) == 1
    assert sorted(p.name for p in (root / "features").iterdir()) == [f"batch-{i}.jsonl.gz" for i in range(3)]
    features = [row for i in range(3) for row in read_gz(root / "features" / f"batch-{i}.jsonl.gz")]
    activations = [row for i in range(3) for row in read_gz(root / "activations" / f"batch-{i}.jsonl.gz")]
    assert [f["index"] for f in features] == [str(i) for i in range(10)]
    assert {f["layer"] for f in features} == {"1-res-test"} and {f["hookName"] for f in features} == {HOOK}

    loaded, sae = load_model(str(tiny_llama_dir)), load_sae(sae_dir)
    windows = pack_windows(iter_documents(str(shakespeare)), loaded.tokenizer, context_size=CONTEXT, n_tokens=TOKENS)
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
