"""JumpReLU at ``target_l0=32`` on real SmolLM2 activations (blocks.6 residual stream): the held-out L0 lands
within 10% of the target after a CI-sized run (the thresholds start at the target from the init sample and
train at ``target_l0_threshold_lr`` times the learning rate; sae_core/l0.py).

The held-out rows must come from the distribution the SAE trained on. The shared store is in document
order, and its L0 drifts with the text (a SAE holding 32 over the training rows measured 46 on the store's
first 800 rows and 26-30 on its tail), so the test trains on a row-shuffled copy of it: the held-out tail is
then a random 5% of the same tokens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_core.store import ActivationStore, StoreWriter
from sae_core.trainer import TrainConfig
from workflows.job import TrainJob
from workflows.training import train_local

HOOK = "blocks.6.hook_resid_post"
TARGET = 32


def row_shuffled_copy(store: ActivationStore, hook: str, out: Path) -> Path:
    """The store's rows of ``hook`` in a seeded random order, as a store of their own."""
    fs, paths = store.part_paths()
    columns = ["token_id", "window_id", "position", "doc_id", hook]
    table = pa.concat_tables(pq.read_table(path, filesystem=fs, columns=columns) for path in paths)
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    manifest = dataclasses.replace(store.manifest, hooks={hook: store.manifest.hooks[hook]}, files=[], n_tokens=0)
    StoreWriter(out, manifest).write_part(0, table)
    return out


@pytest.mark.slow
def test_jumprelu_lands_its_target_l0_on_smollm2(smollm2_store, tmp_path):
    store = row_shuffled_copy(smollm2_store, HOOK, tmp_path / "shuffled")
    job = TrainJob(activations=str(store), hook=HOOK, arch="jumprelu", sae={"d_sae": 1152, "target_l0": TARGET},
                   train=TrainConfig(steps=200, batch_size=256, lr=2e-3, log_every=50), out=str(tmp_path / "sae"))
    rows: list[dict[str, float]] = []
    metrics = train_local(job, on_metrics=rows.append)
    print("training L0 by step:", [(r["step"], round(r["l0"], 1)) for r in rows])
    print(f"held-out L0 {metrics['l0']:.2f} (target {TARGET}), FVU {metrics['fvu']:.3f}")
    assert abs(metrics["l0"] / TARGET - 1) < 0.10
    assert metrics["fvu"] < 0.2  # a working SAE, not thresholds that only count
    assert json.loads((tmp_path / "sae" / "metrics.json").read_text())["l0"] == metrics["l0"]
