"""Fault tolerance on a real multi-node Ray cluster on this machine: the node holding the training
worker dies mid-run; Ray Train restarts the worker elsewhere from the last checkpoint."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from sae_core.io import CHECKPOINT_FILE, load_checkpoint, load_sae
from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from sae_core.trainer import TrainConfig
from workflows.job import TrainJob
from workflows.train_ray import DistributedOptions, train_distributed
from workflows.training import train_local

STEPS = 300


def make_job(store: Path, out: Path) -> TrainJob:
    cfg = TrainConfig(steps=STEPS, batch_size=256, lr=3e-3, log_every=50, dead_after_tokens=10**9)
    return TrainJob(activations=str(store), hook="synthetic", arch="topk", sae={"d_sae": 128, "k": 4}, train=cfg,
                    out=str(out))


def checkpoint_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())


@pytest.fixture
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    # The head holds no CPU, so the training worker must live on a worker node we can kill.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_killing_the_workers_node_resumes_from_checkpoint(cluster, tmp_path):
    store = tmp_path / "store"
    write_synthetic_store(store, SyntheticConfig(d=32, n_features=96, mean_active=4, noise=0.01), 30_000)
    victim = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    cluster.wait_for_nodes()
    job = make_job(store, tmp_path / "run")
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = train_distributed(job, DistributedOptions(
                workers=1, checkpoint_every=20, max_failures=3, mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}"))
        except BaseException as exc:  # surfaced by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    checkpoints = tmp_path / "run" / "ray-train"
    # Wait until Ray Train has registered checkpoints, not only written them: it deletes the oldest of
    # num_to_keep=2 once it registers a third (a small job writes them faster than they are registered).
    deadline, seen = time.time() + 300, set()
    while not seen - set(checkpoint_dirs(checkpoints)) and time.time() < deadline and thread.is_alive():
        seen |= set(checkpoint_dirs(checkpoints))
        time.sleep(0.05)
    assert thread.is_alive(), f"training ended before the node could be killed: {outcome}"
    cluster.add_node(num_cpus=1)  # somewhere for the restarted worker to go
    cluster.remove_node(victim)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"]["steps"] == STEPS

    remaining = checkpoint_dirs(checkpoints)
    assert remaining, "no checkpoints were kept"
    for folder in remaining:
        assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*")), f"half-written files in {folder}"
        assert load_checkpoint(folder / CHECKPOINT_FILE)["step"] % 20 == 0
    assert load_checkpoint(remaining[-1] / CHECKPOINT_FILE)["step"] == STEPS

    # Rank 0 logged where it picked up again: a checkpoint step, not step 0.
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    resumed = client.get_metric_history(outcome["result"]["mlflow_run_id"], "resumed_from_step")
    assert resumed and all(0 < m.value < STEPS and m.value % 20 == 0 for m in resumed)

    # Within float tolerance of an uninterrupted run on the same data order.
    train_local(make_job(store, tmp_path / "ref"))
    reference = load_sae(tmp_path / "ref").state_dict()
    for name, value in load_sae(tmp_path / "run").state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-3, atol=1e-4, msg=name)
