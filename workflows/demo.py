"""`make demo` (for now): synthetic ground truth -> train a TopK SAE -> held-out metrics and MMCS.

The end-to-end recipe on the real model replaces this once the pipeline lands.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from safetensors.torch import load_file

from sae_core.io import load_sae
from sae_core.metrics import mmcs
from sae_core.synthetic import GROUND_TRUTH_FILE, SyntheticConfig, write_synthetic_store
from sae_core.trainer import TrainConfig
from workflows.training import TrainJob, train_local


def main(root: str = "runs/demo") -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("demo")
    root_path = Path(root)
    store = root_path / "synthetic-store"
    started = time.perf_counter()
    write_synthetic_store(store, SyntheticConfig(d=64, n_features=256, mean_active=5, seed=0), 100_000)
    log.info("synthetic store: %s (%.1f s)", store, time.perf_counter() - started)
    job = TrainJob(activations=str(store), hook="synthetic", arch="topk", sae={"d_sae": 512, "k": 5},
                   train=TrainConfig(steps=600, batch_size=512, lr=1e-2, log_every=100, dead_after_tokens=20_000),
                   out=str(root_path / "topk-sae"))
    started = time.perf_counter()
    result = train_local(job, on_metrics=lambda row: log.info("step %(step)d  loss %(loss).4f  l0 %(l0).2f  fvu %(fvu).3f", row))
    truth = load_file(str(store / GROUND_TRUTH_FILE))["dictionary"]
    result["mmcs"] = float(mmcs(load_sae(job.out).W_dec.detach(), truth))
    log.info("trained in %.1f s; held-out metrics:\n%s", time.perf_counter() - started, json.dumps(result, indent=2))
    log.info("SAE (SAELens format): %s", job.out)


if __name__ == "__main__":
    main()
