"""target_l0 for every architecture: the config mapping, the jumprelu target loss, the relu/gated
coefficient controller (held-out L0 within 10% on planted data, no ringing, resume), in seconds."""

from __future__ import annotations

import math

import pytest
import torch

import sae_core
from sae_core.l0 import NullController, SparsityController, sparsity_controller
from sae_core.synthetic import SyntheticConfig, SyntheticData
from sae_core.trainer import TrainConfig, Trainer, evaluate

TARGET = 12.0
BATCH = 256


def planted(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = SyntheticData(SyntheticConfig(d=32, n_features=128, mean_active=6, seed=0))
    return data.sample(steps * BATCH)[0], data.sample(4096)[0]


def train(arch: str, steps: int, **fields) -> tuple[Trainer, list[dict[str, float]], torch.Tensor]:
    train_ND, held_ND = planted(steps)
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config(arch, d_in=32, d_sae=128, target_l0=TARGET, **fields))
    trainer = Trainer(sae, TrainConfig(steps=steps, batch_size=BATCH, lr=3e-3, log_every=10))
    rows = list(trainer.fit(iter(train_ND.split(BATCH))))
    return trainer, rows, held_ND


# jumprelu's thresholds start at the target (quantiles of the init sample) and train at 10x the lr.
@pytest.mark.parametrize(("arch", "steps", "fields"), [("jumprelu", 400, {}), ("relu", 400, {}), ("gated", 400, {})])
def test_held_out_l0_lands_within_10_percent_of_the_target(arch, steps, fields):
    trainer, _, held_ND = train(arch, steps, **fields)
    l0 = evaluate(trainer.sae, held_ND, scaling_factor=trainer.scaling_factor)["l0"]
    print(f"{arch}: target {TARGET}, held-out L0 {l0:.2f}, multiplier {trainer.l0_control.multiplier:.3g}")
    assert abs(l0 / TARGET - 1) < 0.10


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_controller_settles_without_ringing(arch):
    trainer, rows, _ = train(arch, 500)
    late = [r for r in rows if r["step"] >= 300]
    assert all(abs(r["l0"] / TARGET - 1) < 0.2 for r in late), [round(r["l0"], 1) for r in late]
    multipliers = [r["sparsity_multiplier"] for r in late]
    assert max(multipliers) / min(multipliers) < 1.15  # the coefficient has stopped moving
    assert trainer.l0_control.multiplier != 1.0  # and it did have to move to get there


def fires(latents_BF: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What the trainer hands the controller: each latent's fire count over the batch and the batch's rows."""
    return (latents_BF != 0).sum(dim=0), latents_BF.shape[0]


def test_controller_moves_the_multiplier_towards_the_target_and_resumes():
    control = SparsityController(10.0, gain=0.1)
    dense, sparse = torch.ones(8, 40), torch.zeros(8, 40)
    sparse[:, :2] = 1.0
    for _ in range(5):
        control.update(*fires(dense), lambda t, op: t)  # L0 40 > 10: penalise harder
    assert control.multiplier > 1.0
    high = control.multiplier
    for _ in range(50):
        control.update(*fires(sparse), lambda t, op: t)  # L0 2 < 10: ease off
    assert control.multiplier < high
    again = SparsityController(10.0, gain=0.1)
    again.load_state_dict(control.state_dict())
    assert again.multiplier == control.multiplier and again.smoothed == control.smoothed


def test_the_multiplier_is_part_of_the_trainer_state():
    train_ND, _ = planted(40)
    sae = sae_core.build(sae_core.make_config("relu", d_in=32, d_sae=128, target_l0=TARGET))
    trainer = Trainer(sae, TrainConfig(steps=40, batch_size=BATCH, lr=3e-3))
    list(trainer.fit(iter(train_ND.split(BATCH))))
    resumed = Trainer(sae_core.build(sae.cfg), TrainConfig(steps=40, batch_size=BATCH, lr=3e-3))
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.l0_control.multiplier == trainer.l0_control.multiplier != 1.0
    assert resumed.sparsity_scale() == pytest.approx(trainer.sparsity_scale())


def make_cfg(arch: str, **fields):
    return sae_core.make_config(arch, d_in=8, d_sae=64, **fields)


@pytest.mark.parametrize(("arch", "fields", "controlled"), [
    ("relu", {}, True), ("gated", {}, True), ("jumprelu", {}, False), ("kl_sparse", {}, False),
    ("transcoder", {"activation": "relu"}, True), ("transcoder", {"activation": "jumprelu"}, False),
    ("transcoder", {"activation": "topk"}, False), ("skip_transcoder", {"activation": "relu"}, True),
    ("crosscoder", {}, True), ("crosscoder", {"activation": "topk"}, False)])
def test_each_architecture_declares_how_it_meets_the_target(arch, fields, controlled):
    cfg = make_cfg(arch, target_l0=6.4, **fields)
    control = sparsity_controller(cfg)
    assert isinstance(control, SparsityController) == controlled
    assert type(sparsity_controller(make_cfg(arch, **fields))) is NullController  # no target, no control


def test_k_and_rho_come_from_the_target():
    assert make_cfg("transcoder", activation="batchtopk", target_l0=6.4).k == 6
    assert make_cfg("crosscoder", activation="topk", target_l0=9.6).k == 10
    cfg = make_cfg("kl_sparse", target_l0=8)
    assert cfg.rho == pytest.approx(8 / 64)
    assert sae_core.make_config("kl_sparse", **{k: v for k, v in cfg.to_dict().items() if k != "arch"}).rho == cfg.rho


def test_jumprelu_target_loss_is_quadratic_in_the_relative_l0_error():
    torch.manual_seed(0)
    sae = sae_core.build(make_cfg("jumprelu", target_l0=4.0, target_l0_coefficient=2.0))
    x = torch.randn(32, 8)
    out = sae(x)
    l0 = float((out.latents_BF != 0).float().sum(-1).mean())
    assert float(out.sparsity.detach()) == pytest.approx(2.0 * (l0 / 4.0 - 1) ** 2, rel=1e-5)
    out.sparsity.backward()
    grad = sae.log_threshold.grad
    # Above target the loss raises thresholds (negative gradient on log-threshold means descent raises them).
    assert l0 > 4.0 and float(grad.sum()) < 0


@pytest.mark.parametrize("bad", [0, -1, 65, math.nan])
def test_bad_targets_are_refused(bad):
    with pytest.raises(sae_core.ConfigError, match="target_l0"):
        make_cfg("relu", target_l0=bad)


def test_data_parallel_ranks_hold_the_same_multiplier_as_one_process():
    """Two ranks (threads with a summing all-reduce) each see half of every batch; their controllers must
    agree with each other and with one controller that sees the whole batch."""
    import threading

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.rand(64, 32, generator=gen) < p).float() for p in torch.linspace(0.6, 0.1, 30)]
    single = SparsityController(TARGET, gain=0.05)
    for latents in batches:
        single.update(*fires(latents), lambda t, op: t)
    barrier, slots = threading.Barrier(2), [None, None]

    def all_reduce_sum(rank: int):
        def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before the next call overwrites the slots
            return total
        return reduce

    ranks = [SparsityController(TARGET, gain=0.05) for _ in range(2)]

    def run(rank: int) -> None:
        for latents in batches:
            ranks[rank].update(*fires(latents[rank * 32 : (rank + 1) * 32]), all_reduce_sum(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert ranks[0].log_multiplier == ranks[1].log_multiplier == pytest.approx(single.log_multiplier, abs=1e-12)
    assert single.multiplier != 1.0


def test_jumprelu_thresholds_start_at_the_target_and_train_faster():
    train_ND, held_ND = planted(40)
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config("jumprelu", d_in=32, d_sae=128, target_l0=TARGET))
    trainer = Trainer(sae, TrainConfig(steps=40, batch_size=BATCH, lr=3e-3))
    trainer.initialize(train_ND[:4096])
    assert evaluate(sae, train_ND[:4096], scaling_factor=trainer.scaling_factor)["l0"] == pytest.approx(TARGET, rel=0.02)
    assert evaluate(sae, held_ND, scaling_factor=trainer.scaling_factor)["l0"] == pytest.approx(TARGET, rel=0.1)
    groups = {id(p): g["lr_scale"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert groups[id(sae.log_threshold)] == 10.0 and groups[id(sae.W_enc)] == 1.0
    trainer.step(train_ND[:BATCH])
    lrs = {g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {1.0: pytest.approx(3e-3), 10.0: pytest.approx(3e-2)}
    untargeted = sae_core.build(sae_core.make_config("jumprelu", d_in=32, d_sae=128))
    Trainer(untargeted, TrainConfig(steps=1)).initialize(train_ND[:4096])
    assert torch.allclose(untargeted.threshold(), torch.full((128,), 0.1))  # no target: init_threshold as set
