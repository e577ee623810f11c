"""Training-step cost of every registered architecture, relative to the encoder GEMM alone.

A step is what the trainer does per batch: forward (train mode, no dead latents), loss(), backward,
decoder-gradient projection, Adam step, decoder renormalisation. The reference is the encoder forward
GEMM x @ W_enc ([B, D] x [D, F]); a dense SAE step is a few of those (forward, and two backward GEMMs
per matrix), so the ratio shows what each architecture adds on top.

    python benchmarks/train_step.py                      # d=576, d_sae=4608, batch 4096, 2 CPU threads
    python benchmarks/train_step.py --archs topk relu --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import sae_core
from sae_core import kernels


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_step(sae: sae_core.SparseAutoencoder, x_BD: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, foreach=True)
    no_dead_F = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    sae.train()

    def step() -> None:
        out = sae(x_BD, dead_mask_F=no_dead_F)
        loss = out.loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--archs", nargs="*", default=None, help="default: every registered architecture")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_BD = torch.randn(args.batch, args.d_in)
    W_DF = torch.randn(args.d_in, args.d_sae) / args.d_in**0.5
    gemm = lambda: x_BD @ W_DF  # noqa: E731

    print(f"d_in={args.d_in} d_sae={args.d_sae} batch={args.batch} threads={args.threads} "
          f"kernels={kernels.backend_name('cpu')} torch={torch.__version__}")
    print("The GEMM is re-timed beside each architecture, so the ratio survives a machine whose load changes.")
    print()
    print(f"| {'architecture':<12} | {'step ms':>8} | {'tokens/s':>9} | {'GEMM ms':>8} | {'step / GEMM':>11} |")
    print(f"|{'-' * 14}|{'-' * 9}:|{'-' * 10}:|{'-' * 9}:|{'-' * 12}:|")
    for arch in args.archs or sae_core.names():
        sae = sae_core.build(sae_core.make_config(arch, d_in=args.d_in, d_sae=args.d_sae))
        step_s = median_seconds(make_step(sae, x_BD), args.warmup, args.repeats)
        gemm_s = median_seconds(gemm, args.warmup, args.repeats)
        print(f"| {arch:<12} | {step_s * 1e3:8.0f} | {args.batch / step_s:9.0f} | {gemm_s * 1e3:8.0f} "
              f"| {step_s / gemm_s:11.1f} |", flush=True)


if __name__ == "__main__":
    main()
