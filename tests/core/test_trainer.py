"""Training mechanics, each as a piece that could break on its own."""

from __future__ import annotations

import pytest
import torch

import sae_core
from sae_core.io import load_checkpoint, save_checkpoint
from sae_core.trainer import DeadLatentTracker, TrainConfig, Trainer, evaluate, geometric_median, lr_factor


def topk(d_in=16, d_sae=64, k=4):
    torch.manual_seed(0)
    return sae_core.build(sae_core.make_config("topk", d_in=d_in, d_sae=d_sae, k=k))


def test_lr_schedule_warmup_constant_decay():
    cfg = TrainConfig(steps=100, lr_warmup_steps=10, lr_decay_steps=20)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == 1.0
    assert lr_factor(80, cfg) == pytest.approx(1.0)
    assert lr_factor(90, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) == pytest.approx(0.05)


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.zeros(99, 3), torch.full((1, 3), 1000.0)])
    assert geometric_median(points).norm() < 1e-2 < points.mean(0).norm()
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    torch.testing.assert_close(geometric_median(square), torch.tensor([1.0, 1.0]))


def test_scaling_factor_gives_mean_squared_norm_d_in():
    sae = topk()
    trainer = Trainer(sae, TrainConfig(b_dec_init="zeros"))
    sample = 7.0 * torch.randn(4096, 16)
    trainer.initialize(sample)
    scaled = sample * trainer.scaling_factor
    assert scaled.pow(2).sum(1).mean() == pytest.approx(16.0, rel=1e-4)


def test_b_dec_initialised_to_mean_or_median():
    sample = torch.randn(512, 16) + 5.0
    for how, expected in (("mean", sample.mean(0)), ("geometric_median", geometric_median(sample))):
        sae = topk()
        trainer = Trainer(sae, TrainConfig(b_dec_init=how, normalize_activations=False))
        trainer.initialize(sample)
        torch.testing.assert_close(sae.b_dec.detach(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.W_enc.detach(), sae.W_dec.detach().T)


def test_dead_latent_tracker_counts_tokens_since_fired():
    tracker = DeadLatentTracker(4, dead_after_tokens=10)
    tracker.update(torch.tensor([6, 0, 0, 0]), 6, lambda t, op: t)
    assert tracker.tokens_since_fired_F.tolist() == [0, 6, 6, 6]
    tracker.update(torch.tensor([0, 5, 0, 0]), 5, lambda t, op: t)
    assert tracker.tokens_since_fired_F.tolist() == [5, 0, 11, 11]
    assert tracker.dead_mask().tolist() == [False, False, True, True]


@pytest.mark.parametrize("arch", ["topk", "relu"])  # counts from the sparse layout, and from dense latents
def test_fire_counts_match_dense_latents(arch):
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config(arch, d_in=16, d_sae=64, **({"k": 4} if arch == "topk" else {})))
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)  # some rows of the topk select non-positive values: they must not count
    out = sae(torch.randn(50, 16))
    assert (out.active is not None) == (arch == "topk")
    expected_F = (out.latents_BF != 0).sum(dim=0)
    assert torch.equal(out.fire_counts(), expected_F) and 0 < int(expected_F.sum()) < 50 * (4 if arch == "topk" else 64)


def test_logged_rows_average_the_window():
    """Metrics accumulate on the device between logs: a row is the mean over its window's steps, l0 and
    fvu over all of the window's rows (fvu around the window's mean)."""
    data = torch.randn(6, 64, 16) + 3.0
    cfg = TrainConfig(steps=6, batch_size=64, lr=1e-3, log_every=3, b_dec_init="zeros", normalize_activations=False)
    trainer, twin = Trainer(topk(), cfg), Trainer(topk(), cfg)  # the twin measures each step before its update
    rows, losses, sq_errs = [], [], []
    for x in data:
        with torch.no_grad():
            out = twin.sae(x, dead_mask_F=twin.tracker.dead_mask())
            losses.append(float(out.loss()))
            sq_errs.append(float((out.x_hat_BD - x).pow(2).sum()))
        twin.step(x)
        row = trainer.step(x)
        assert (row is None) == (trainer.step_count % 3 != 0)
        rows += [row] if row else []
    assert [r["step"] for r in rows] == [3, 6] and rows[1]["l0"] == pytest.approx(4.0)
    for row, window in zip(rows, (slice(0, 3), slice(3, 6)), strict=True):
        x = data[window].reshape(-1, 16)
        assert row["loss"] == pytest.approx(sum(losses[window]) / 3, rel=1e-5)
        assert row["fvu"] == pytest.approx(sum(sq_errs[window]) / float((x - x.mean(0)).pow(2).sum()), rel=1e-4)


def test_decoder_rows_stay_unit_norm_and_gradient_is_projected():
    sae = topk()
    trainer = Trainer(sae, TrainConfig(steps=5, batch_size=64, lr=1e-2))
    for _ in range(5):
        trainer.step(torch.randn(64, 16))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    # The projected gradient has no component along each decoder row.
    out = sae(torch.randn(64, 16))
    out.loss().backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    radial = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert radial.abs().max() < 1e-6


def test_sparsity_warmup_and_grad_clip():
    sae = topk()
    trainer = Trainer(sae, TrainConfig(sparsity_warmup_steps=4, grad_clip=1e-3, lr=1.0))
    assert trainer.sparsity_scale() == pytest.approx(0.25)
    before = sae.W_dec.detach().clone()
    trainer.step(100 * torch.randn(32, 16))
    # Adam's first step moves each weight by ~lr regardless of gradient scale; the clip must not blow up.
    assert torch.isfinite(sae.W_dec).all() and not torch.equal(before, sae.W_dec)


def test_clipping_inside_adam_equals_clip_grad_norm_then_adam():
    cfg = TrainConfig(steps=4, grad_clip=0.05, lr=1e-2, b_dec_init="zeros", normalize_activations=False)
    trainer, manual = Trainer(topk(), cfg), topk()
    optimizer = torch.optim.Adam(manual.parameters(), lr=1e-2, fused=True)
    for _ in range(4):
        x = 10 * torch.randn(32, 16)
        trainer.step(x)
        optimizer.zero_grad()
        manual(x, dead_mask_F=torch.zeros(64, dtype=torch.bool)).loss().backward()
        manual.remove_gradient_parallel_to_decoder_directions()
        assert float(torch.nn.utils.clip_grad_norm_(manual.parameters(), 0.05)) > 0.05  # the clip is active
        optimizer.step()
        manual.set_decoder_norm_to_unit_norm()
    for name, value in manual.state_dict().items():
        torch.testing.assert_close(trainer.sae.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_nan_loss_is_a_clear_error_at_the_next_logged_row():
    trainer = Trainer(topk(), TrainConfig(log_every=3))
    trainer.initialize(torch.randn(32, 16))
    assert trainer.step(torch.full((32, 16), float("nan"))) is None  # nothing waits for the device between logs
    trainer.step(torch.randn(32, 16))
    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        trainer.step(torch.randn(32, 16))


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    data = torch.randn(20, 64, 16)
    cfg = TrainConfig(steps=20, batch_size=64, lr=1e-2, lr_warmup_steps=3, lr_decay_steps=5)
    straight = Trainer(topk(), cfg)
    for x in data:
        straight.step(x)
    first = Trainer(topk(), cfg)
    for x in data[:8]:
        first.step(x)
    save_checkpoint(tmp_path, first.state_dict())
    resumed = Trainer(topk(), cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path))  # weights_only=True inside
    for x in data[8:]:
        resumed.step(x)
    assert resumed.step_count == 20
    for name, param in straight.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], param, msg=name)


def test_bf16_autocast_trains():
    sae = topk()
    trainer = Trainer(sae, TrainConfig(autocast_bf16=True, lr=1e-2, log_every=1))
    metrics = trainer.step(torch.randn(64, 16))
    assert metrics["loss"] > 0 and torch.isfinite(sae.W_dec).all()


def test_evaluate_matches_hand_computation():
    sae = topk().eval()
    acts = torch.randn(100, 16)
    result = evaluate(sae, acts, scaling_factor=2.0, batch_size=33)
    with torch.no_grad():
        latents = sae.encode(acts * 2.0)
        x_hat = sae.decode(latents) / 2.0
    assert result["l0"] == pytest.approx(4.0)
    assert result["mse"] == pytest.approx(float((x_hat - acts).pow(2).mean()), rel=1e-5)
    total = float((acts - acts.mean(0)).pow(2).sum())
    assert result["fvu"] == pytest.approx(float((x_hat - acts).pow(2).sum()) / total, rel=1e-5)
    assert result["dead_fraction"] == pytest.approx(float(((latents != 0).sum(0) == 0).float().mean()))
