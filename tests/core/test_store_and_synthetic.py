from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from sae_core.store import ActivationStore, Manifest, StoreError, StoreWriter, make_table
from sae_core.synthetic import GROUND_TRUTH_FILE, SyntheticConfig, SyntheticData, write_synthetic_store


def test_synthetic_sparsity_and_ground_truth(tmp_path):
    data = SyntheticData(SyntheticConfig(d=32, n_features=128, mean_active=6, seed=3))
    acts, coeffs = data.sample(20_000)
    assert (coeffs > 0).sum(1).float().mean() == pytest.approx(6, rel=0.05)
    torch.testing.assert_close(acts, coeffs @ data.dictionary_ND)
    torch.testing.assert_close(data.dictionary_ND.norm(dim=1), torch.ones(128))
    write_synthetic_store(tmp_path, data.cfg, 1000)
    truth = load_file(str(tmp_path / GROUND_TRUTH_FILE))
    torch.testing.assert_close(truth["dictionary"], data.dictionary_ND)


def test_correlation_raises_co_firing():
    base = SyntheticConfig(d=16, n_features=64, mean_active=4)
    def co_firing(corr):
        _, c = SyntheticData(SyntheticConfig(**{**base.to_dict(), "correlation": corr})).sample(20_000)
        return float((c > 0).sum(1).float().var())
    assert co_firing(0.6) > 1.5 * co_firing(0.0)


def test_store_round_trip_batches_and_verify(tmp_path):
    write_synthetic_store(tmp_path, SyntheticConfig(d=8, n_features=16, mean_active=2, noise=0.1), 1000, rows_per_file=300)
    store = ActivationStore(tmp_path)
    assert [f["rows"] for f in store.manifest.files] == [300, 300, 300, 100]
    everything = store.read_hook("synthetic")
    assert everything.shape == (1000, 8) and store.verify() == []
    torch.testing.assert_close(store.read_hook("synthetic", 250, 650), everything[250:650])
    seen = torch.cat([b for b in store.iter_batches("synthetic", 100, seed=1, stop=900, shuffle_buffer=256, loop=False)])
    assert len(seen) <= 900
    # every yielded row comes from the first 900 rows, each at most once per epoch
    matches = (seen[:, None, :] == everything[None, :900, :]).all(-1)
    assert (matches.sum(1) >= 1).all() and (matches.sum(0) <= 1).all()
    # flip a byte in one file: verify names it
    part = tmp_path / "part-00001.parquet"
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    part.write_bytes(bytes(raw))
    problems = store.verify()
    assert [p.path for p in problems] == ["part-00001.parquet"]


def test_store_written_by_hand_is_readable(tmp_path):
    """Any writer following the schema works: here plain pyarrow, float16, no sha256."""
    values = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float16)
    table = pa.table({
        "token_id": pa.array(np.arange(10), pa.int32()), "window_id": pa.array(np.zeros(10), pa.int64()),
        "position": pa.array(np.arange(10), pa.int32()), "doc_id": pa.array(np.zeros(10), pa.int64()),
        "blocks.0.hook_resid_post": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 4),
    })
    pq.write_table(table, tmp_path / "a.parquet")
    manifest = {"format": "sae-activations/1", "model": "m", "hooks": {"blocks.0.hook_resid_post": {"d": 4}},
                "dtype": "float16", "context_size": 10, "n_tokens": 10, "corpus": "hand",
                "files": [{"path": "a.parquet", "rows": 10, "sha256": ""}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    store = ActivationStore(tmp_path)
    torch.testing.assert_close(store.read_hook("blocks.0.hook_resid_post"), torch.from_numpy(values.astype(np.float32)))


def test_store_errors_name_the_problem(tmp_path):
    with pytest.raises(StoreError, match="no manifest.json"):
        ActivationStore(tmp_path)
    write_synthetic_store(tmp_path, SyntheticConfig(d=8, n_features=16, mean_active=2), 100)
    store = ActivationStore(tmp_path)
    with pytest.raises(StoreError, match="hook 'resid' is not in store"):
        store.check_hook("resid")
    with pytest.raises(StoreError, match="d=8, but d=4"):
        store.check_hook("synthetic", d=4)
    with pytest.raises(StoreError, match="already holds a store"):
        StoreWriter(tmp_path, Manifest(model="other", hooks={"synthetic": {"d": 8}}))


def test_nan_activations_are_refused(tmp_path):
    manifest = Manifest(model="m", hooks={"h": {"d": 2}})
    writer = StoreWriter(tmp_path, manifest)
    meta = {k: np.zeros(3) for k in ("token_id", "window_id", "position", "doc_id")}
    writer.write_part(0, make_table(meta, {"h": np.array([[0, 1], [np.nan, 0], [1, 1]])}, "float32"))
    with pytest.raises(StoreError, match="1 row\\(s\\) with NaN/Inf"):
        ActivationStore(tmp_path).read_hook("h")
