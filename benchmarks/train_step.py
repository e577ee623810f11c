"""Training cost of every registered architecture, relative to its floor: the encoder GEMM x @ W_enc.

For each architecture two numbers, each with its spread over repeats:

- isolated step / floor: forward (train mode), loss, backward, decoder-gradient projection, gradient
  clipping, Adam, decoder renormalisation on one fixed batch; each repeat times the floor alone and
  then the step, and the ratio is taken per repeat;
- loop step / floor: the real training loop (``Trainer.fit`` over the batches of the job's store source
  (a synthetic activation store), as ``workflows.training.train_local`` runs it, metrics and logging included), its
  steady-state step = (time at step M - time at step N) / (M - N), over the floor timed alone just
  before and after that run.

Each number is printed as median [min-max] over repeats. The floor is also timed alone before and
after all rows: when its own spread or its drift is large the machine is busy (other processes share
the cores) and every ratio is suspect, which the script says.

Variable-L0 architectures (relu, jumprelu, gated, crosscoder, relu/jumprelu transcoders) start with
about half their latents active; a trained SAE has a few dozen. ``--l0`` (default 32) sets their
thresholds/biases from a sample so that about that many fire, as after training (``--l0 0``: leave
them at initialisation, the dense regime).

    python benchmarks/train_step.py                                  # d=576, d_sae=4608, batch 4096
    python benchmarks/train_step.py --d-sae 16384 --archs topk       # the TopK target shape
    python benchmarks/train_step.py --archs relu gated --repeats 3 --loop-steps 4 12
    python benchmarks/train_step.py --threads 1 --clock cpu                # work ratios on a busy machine
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import sae_core
from sae_core import kernels
from sae_core.architectures.base import Wiring
from sae_core.synthetic import SyntheticConfig, write_synthetic_store
from sae_core.trainer import TrainConfig
from workflows.job import TrainJob
from workflows.training import Run, build_trainer

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter
"""What every timing reads (``--clock``): wall time, or this process's CPU time. On a machine shared
with other jobs CPU time stays close to the work done, where wall time includes waiting for a core;
with ``--threads 1`` no thread spins waiting for another, so CPU-time ratios are ratios of work."""
TARGETS = {"topk": 1.3}
"""Issue 17's target for the loop step / floor (median over runs), per architecture."""
DEFAULT_TARGET = 2.0
BUSY_SPREAD = 0.15
"""(max - min) / median of the floor above this, or a drift of the floor's median above it: a busy machine."""


def timings(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def show(times: list[float]) -> str:
    """median ms [min-max]."""
    return f"{statistics.median(times) * 1e3:7.0f} [{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}]"


def spread(times: list[float]) -> float:
    return (max(times) - min(times)) / statistics.median(times)


SECOND_SITE = "synthetic_2"
"""The store's second site: a PAIR wiring's output, a STACKED wiring's second source."""
STACKED_SOURCES = 2
"""Sources a STACKED wiring (crosscoder) reads: its encoder GEMM, and so its floor, is that many times wider."""


def arch_fields(arch: str, args: argparse.Namespace) -> dict[str, object]:
    fields: dict[str, object] = {"d_sae": args.d_sae}
    if "k" in sae_core.get(arch).fields:
        fields["k"] = args.k
    return fields


def job_sites(arch: str) -> dict[str, object]:
    """The TrainJob fields naming the sites the architecture's wiring reads and writes."""
    if sae_core.get(arch).wiring is Wiring.PAIR:
        return {"out_hook": SECOND_SITE}
    if sae_core.get(arch).wiring is Wiring.STACKED:
        return {"sources": ["synthetic", SECOND_SITE][:STACKED_SOURCES]}
    return {}


@torch.no_grad()
def set_trained_l0(sae: sae_core.SparseAutoencoder, x_BD: torch.Tensor, l0: int) -> None:
    """Move a variable-L0 SAE's threshold (or bias) so that about ``l0`` latents fire per row of x."""
    if (
        l0 <= 0
        or sae.max_active is not None
        or getattr(sae.cfg, "activation", "relu") not in ("relu", "jumprelu")
    ):
        return
    h_BF = sae.pre_acts(x_BD[:512])
    q = torch.quantile(h_BF.flatten()[: 1 << 24], 1 - l0 / h_BF.shape[1])
    if getattr(sae, "log_threshold", None) is not None:
        sae.log_threshold.fill_(float(q.clamp_min(1e-3).log()))
    elif getattr(sae, "b_gate", None) is not None:
        sae.b_gate -= q
    elif sae.b_enc is not None and sae.arch != "kl_sparse":
        sae.b_enc -= q


def isolated_step(arch: str, x_BD: torch.Tensor, args: argparse.Namespace) -> Callable[[], None]:
    torch.manual_seed(0)
    fields = arch_fields(arch, args)
    if sae_core.get(arch).wiring is Wiring.STACKED:
        fields["n_sources"] = STACKED_SOURCES
    sae = sae_core.build(sae_core.make_config(arch, d_in=args.d_in, **fields))
    set_trained_l0(sae, x_BD, args.l0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    no_dead_F = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    sae.train()

    def step() -> None:
        loss = sae(x_BD, dead_mask_F=no_dead_F).loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def loop_step(arch: str, store: Path, args: argparse.Namespace) -> float:
    """Steady-state seconds per step of the training loop on the synthetic store."""
    first, last = args.loop_steps
    job = TrainJob(
        activations=str(store),
        hook="synthetic",
        **job_sites(arch),
        arch=arch,
        sae=arch_fields(arch, args),
        out=str(store.parent / arch),
        train=TrainConfig(steps=last, batch_size=args.batch, log_every=args.log_every),
    )
    run = Run(job)
    trainer = build_trainer(job, run.widths)
    sample = run.source.init_sample(job.train.init_sample_tokens)
    trainer.initialize(sample)
    set_trained_l0(
        trainer.sae, (sample[0] if isinstance(sample, tuple) else sample) * trainer.scaling_factor, args.l0
    )
    stamps: dict[int, float] = {}
    for _ in trainer.fit(run.source.batches(0, 1, 0), on_step=lambda s: stamps.setdefault(s, clock())):
        pass
    return (stamps[last] - stamps[first]) / (last - first)


def paired(
    step: Callable[[], object], floor: Callable[[], object], warmup: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Step times, and step / floor ratios with the floor timed alone right before each step: on a shared
    machine whose load changes, each ratio compares two runs under the same load."""
    for _ in range(warmup):
        step()
    seconds, ratios = [], []
    for _ in range(repeats):
        floor_s = timings(floor, 0, 1)[0]
        step_s = timings(step, 0, 1)[0]
        seconds.append(step_s)
        ratios.append(step_s / floor_s)
    return seconds, ratios


def loop_ratios(
    arch: str, store: Path, floor: Callable[[], object], args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """Loop step times, and their ratios to the mean of the floor timed (3 times each) just before and after."""
    seconds, ratios = [], []
    for _ in range(args.loop_repeats):
        before = statistics.median(timings(floor, 0, 3))
        step_s = loop_step(arch, store, args)
        after = statistics.median(timings(floor, 0, 3))
        seconds.append(step_s)
        ratios.append(2 * step_s / (before + after))
    return seconds, ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="isolated steps timed, and floor repeats")
    parser.add_argument("--loop-repeats", type=int, default=2, help="training loops run per architecture")
    parser.add_argument(
        "--loop-steps",
        type=int,
        nargs=2,
        default=(4, 12),
        metavar=("N", "M"),
        help="time the loop from step N to step M (M steps run)",
    )
    parser.add_argument("--log-every", type=int, default=4, help="the loop's log_every (a metrics row each)")
    parser.add_argument(
        "--l0", type=int, default=32, help="set variable-L0 SAEs to about this L0; 0: as initialised"
    )
    parser.add_argument("--archs", nargs="*", default=None, help="default: every registered architecture")
    parser.add_argument(
        "--clock", choices=CLOCKS, default="wall", help="cpu: this process's CPU time (see CLOCKS)"
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_BD = torch.randn(args.batch, args.d_in)
    W_DF = torch.randn(args.d_in, args.d_sae) / args.d_in**0.5
    floor = lambda: x_BD @ W_DF  # noqa: E731
    print(
        f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} threads={args.threads} "
        f"kernels={kernels.backend_name('cpu')} torch={torch.__version__} l0={args.l0} clock={args.clock}; "
        f"loop: steps {args.loop_steps[0]}..{args.loop_steps[1]}, log_every {args.log_every}, "
        f"{args.loop_repeats} runs; median [min-max]"
    )
    before = timings(floor, args.warmup, args.repeats)
    print(f"floor (x @ W_enc) before: {show(before)} ms")
    root = Path(tempfile.mkdtemp(prefix="bench-step-"))
    store = write_synthetic_store(
        root / "store",
        SyntheticConfig(d=args.d_in, n_features=4 * args.d_in, mean_active=16),
        args.batch * 8,
        more_hooks=(SECOND_SITE,),
    )
    print()
    print(
        f"| {'architecture (d_sae)':<28} | {'isolated step ms':>18} | {'step / floor':>17} | {'loop step ms':>18} "
        f"| {'loop / floor':>17} | {'target':>14} |"
    )
    print(f"|{'-' * 30}|{'-' * 19}:|{'-' * 18}:|{'-' * 19}:|{'-' * 18}:|{'-' * 15}:|")
    for arch in args.archs or sae_core.names():
        label, x_arch, floor_arch = f"{arch} ({args.d_sae})", x_BD, floor
        if sae_core.get(arch).wiring is Wiring.STACKED:
            # S sources read as one input of width S x d_in: the floor is that wider GEMM.
            label = f"{arch} ({args.d_sae}, {STACKED_SOURCES} sources)"
            x_arch = torch.randn(args.batch, STACKED_SOURCES, args.d_in)
            W_NF = torch.randn(STACKED_SOURCES * args.d_in, args.d_sae) / args.d_in**0.5
            floor_arch = lambda x=x_arch, W=W_NF: x.flatten(1) @ W  # noqa: E731
        step_s, step_r = paired(isolated_step(arch, x_arch, args), floor_arch, args.warmup, args.repeats)
        loop_s, loop_r = loop_ratios(arch, store, floor_arch, args)
        ratio = lambda rs: f"{statistics.median(rs):.2f} [{min(rs):.2f}-{max(rs):.2f}]"  # noqa: E731
        target = TARGETS.get(arch, DEFAULT_TARGET)
        verdict = f"<= {target}: {'met' if statistics.median(loop_r) <= target else 'not met'}"
        print(
            f"| {label:<28} | {show(step_s):>18} | {ratio(step_r):>17} | {show(loop_s):>18} | {ratio(loop_r):>17} "
            f"| {verdict:>14} |",
            flush=True,
        )
    after = timings(floor, args.warmup, args.repeats)
    print(f"\nfloor (x @ W_enc) after: {show(after)} ms")
    drift = abs(statistics.median(after) - statistics.median(before)) / statistics.median(before)
    if max(spread(before), spread(after), drift) > BUSY_SPREAD:
        print(
            f"WARNING: the floor's spread ({spread(before):.0%} before, {spread(after):.0%} after) or drift "
            f"({drift:.0%}) exceeds {BUSY_SPREAD:.0%}: the machine is busy, read the ratios with their spreads"
        )


if __name__ == "__main__":
    main()
