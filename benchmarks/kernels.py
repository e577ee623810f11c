"""Sparse kernels vs dense on this CPU: prints ratios measured in one run.

    .venv/bin/python benchmarks/kernels.py [--repeats 5]

Shapes are a real TopK SAE on SmolLM2-135M's residual stream: B=4096, d=576, d_sae=16384, k=32, fp32.
The timings of each comparison are interleaved (a, b, a, b, ...) and their medians taken, so a noisy,
shared machine slows both sides alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import sae_core
from sae_core import kernels

B, D, F, K = 4096, 576, 16384, 32


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def decode_fns() -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    idx_BK = torch.rand(B, F, generator=gen).topk(K, dim=1).indices
    vals_BK = torch.rand(B, K, generator=gen).requires_grad_()
    latents_BF = torch.zeros(B, F).scatter_(1, idx_BK, vals_BK.detach()).requires_grad_()
    W_dec_FD = (torch.randn(F, D, generator=gen) / D**0.5).requires_grad_()
    b_dec_D = torch.zeros(D, requires_grad=True)
    grad_BD = torch.randn(B, D, generator=gen)
    return {
        "sparse": lambda: kernels.sparse_decode(idx_BK, vals_BK, W_dec_FD, b_dec_D).backward(grad_BD),
        "dense": lambda: (latents_BF @ W_dec_FD + b_dec_D).backward(grad_BD),
    }


def step_fn(x_BD: torch.Tensor, mode: str) -> Callable[[], object]:
    """One TopK training step (encode, top-k, decode, loss, backward, Adam) under SAE_KERNELS=mode."""
    torch.manual_seed(0)
    sae = sae_core.build(sae_core.make_config("topk", d_in=D, d_sae=F, k=K))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # the Trainer's choice

    def step() -> None:
        os.environ["SAE_KERNELS"] = mode
        opt.zero_grad(set_to_none=True)
        sae(x_BD).loss().backward()
        opt.step()

    return step


def breakdown(x_BD: torch.Tensor, repeats: int) -> dict[str, float]:
    """Where the sparse step's time goes, piece by piece."""
    os.environ["SAE_KERNELS"] = "auto"
    sae = sae_core.build(sae_core.make_config("topk", d_in=D, d_sae=F, k=K))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, foreach=True)
    fused = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    h_BF = x_BD @ sae.W_enc
    vals_BK, idx_BK = h_BF.topk(K, dim=1, sorted=False)
    buffer_BF = torch.zeros_like(h_BF)  # already faulted in, as the pre-activations are when reused
    backend = kernels.backend_for(x_BD.device)
    for p in sae.parameters():
        p.grad = torch.randn_like(p)

    def forward_backward() -> None:
        sae.zero_grad(set_to_none=True)
        sae(x_BD).loss().backward()

    return interleaved({
        "encoder GEMM x @ W_enc": lambda: x_BD @ sae.W_enc,
        f"top-k ({backend.name})": lambda: backend.topk(h_BF, K),
        "top-k (torch.topk)": lambda: h_BF.topk(K, dim=1, sorted=False),
        "top-k threshold (torch.kthvalue)": lambda: h_BF.kthvalue(F - K + 1, dim=1),
        "fresh dense [B, F] (zeros + scatter_)": lambda: torch.zeros(B, F).scatter_(1, idx_BK, vals_BK),
        "reused dense [B, F] (zero_ + scatter_)": lambda: buffer_BF.zero_().scatter_(1, idx_BK, vals_BK),
        "forward + backward": forward_backward,
        "Adam step (foreach)": opt.step,
        "Adam step (fused, the Trainer's)": fused.step,
    }, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {kernels.backend_name()}, "
          f"B={B} d={D} d_sae={F} k={K} fp32, median of {args.repeats}")

    dec = interleaved(decode_fns(), args.repeats)
    print(f"sparse decode fwd+bwd {dec['sparse'] * 1e3:8.1f} ms | dense decoder fwd+bwd {dec['dense'] * 1e3:8.1f} ms"
          f" | sparse is {dec['dense'] / dec['sparse']:.1f}x faster (target >= 8x)")

    x_BD = torch.randn(B, D, generator=torch.Generator().manual_seed(1))
    W_enc_DF = torch.randn(D, F) / D**0.5
    sparse_step = step_fn(x_BD, "auto")
    # Two separate pairs: the reference step's multi-GB allocations would otherwise disturb the GEMM pair.
    steps = interleaved({"gemm": lambda: x_BD @ W_enc_DF, "sparse": sparse_step}, args.repeats)
    print(f"encoder GEMM {steps['gemm'] * 1e3:8.1f} ms | TopK step {steps['sparse'] * 1e3:8.1f} ms"
          f" | step / GEMM = {steps['sparse'] / steps['gemm']:.2f} (target <= 1.6)")
    ref = interleaved({"sparse": sparse_step, "reference": step_fn(x_BD, "reference")}, args.repeats)
    print(f"TopK step {ref['sparse'] * 1e3:8.1f} ms | with SAE_KERNELS=reference {ref['reference'] * 1e3:8.1f} ms"
          f" | reference / sparse = {ref['reference'] / ref['sparse']:.2f}x")

    print("where the sparse step's time goes (each piece timed alone):")
    for name, seconds in breakdown(x_BD, args.repeats).items():
        print(f"  {name:38s} {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
