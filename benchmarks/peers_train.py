"""Train a TopK SAE with a peer library's own training code on activations dumped by benchmarks/peers.py.

Runs in the peers' own venv (benchmarks/peers.py creates it); nothing in this project imports it, and it
imports nothing of this project. Reads ``--acts`` (a float32 .npy of training rows [N, D], in store
order), trains, and writes the peer's own folder format to ``--out``, which sae_core.interop reads:

- ``saelens``: ``TopKTrainingSAE`` trained by ``SAETrainer`` (the trainer SAELens's runners use) on an
  iterator of shuffled batches; saved with ``save_inference_model`` (cfg.json + sae_weights.safetensors).
- ``sparsify``: EleutherAI's ``Trainer.fit`` unchanged. It trains on a hooked module of a model it runs
  itself, so the "model" here is a lookup: its ``input_ids`` are row indices of the dump (shuffled, in
  windows of ``--seq-len``) and its one layer returns those rows. Saved by the trainer itself
  (cfg.json + sae.safetensors).

Prints one JSON line: {"lib", "train_s"}: seconds of the library's trainer (built, fit, saved), imports and
data loading excluded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# This folder's kernels.py would shadow the `kernels` package that transformers probes for.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def shuffled_rows(n: int, count: int, seed: int) -> torch.Tensor:
    """``count`` row indices: successive seeded permutations of range(n) (epochs), concatenated."""
    g = torch.Generator().manual_seed(seed)
    epochs = -(-count // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])[:count]


def train_saelens(acts_ND: torch.Tensor, args: argparse.Namespace) -> float:
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=acts_ND.shape[1], d_sae=args.d_sae, k=args.k, device="cpu", dtype="float32"
        )
    )
    rows = shuffled_rows(len(acts_ND), args.steps * args.batch, args.seed).view(args.steps, args.batch)

    def batches() -> Iterator[torch.Tensor]:
        for idx in rows:
            yield acts_ND[idx]

    cfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr / 10,
        device="cpu",
    )  # lr_end: its runner's default
    start = time.perf_counter()
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches()).fit()
    sae.save_inference_model(args.out)
    return time.perf_counter() - start


class Lookup(nn.Module):
    """The hooked "layer": row indices in, those rows of the activation dump out."""

    def __init__(self, acts_ND: torch.Tensor):
        super().__init__()
        self.acts_ND = acts_ND

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        return self.acts_ND[ids_BS]


class LookupModel(nn.Module):
    """What sparsify's Trainer asks of a model: base_model, device, dummy_inputs and a forward."""

    def __init__(self, acts_ND: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList([Lookup(acts_ND)])

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layers[0](input_ids)


def train_sparsify(acts_ND: torch.Tensor, args: argparse.Namespace) -> float:
    from sparsify import SaeConfig, TrainConfig, Trainer

    if args.batch % args.seq_len:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --seq-len {args.seq_len} for sparsify")
    rows = shuffled_rows(len(acts_ND), args.steps * args.batch, args.seed).view(-1, args.seq_len)
    dataset = [{"input_ids": ids} for ids in rows]
    save_dir = Path(tempfile.mkdtemp(prefix="sparsify-"))
    cfg = TrainConfig(
        SaeConfig(num_latents=args.d_sae, k=args.k),
        batch_size=args.batch // args.seq_len,
        hookpoints=["layers.0"],
        init_seeds=[args.seed],
        log_to_wandb=False,
        save_dir=str(save_dir),
        run_name="run",
        save_every=10**9,
        **({"lr": args.sparsify_lr} if args.sparsify_lr else {}),
    )
    start = time.perf_counter()
    Trainer(cfg, dataset, LookupModel(acts_ND)).fit()
    seconds = time.perf_counter() - start
    shutil.copytree(save_dir / "run" / "layers.0", args.out, dirs_exist_ok=True)
    shutil.rmtree(save_dir)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lib", choices=("saelens", "sparsify"), required=True)
    parser.add_argument("--acts", required=True, help="float32 .npy of training rows [N, D]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--d-sae", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="tokens per step")
    parser.add_argument("--lr", type=float, required=True, help="Adam LR (SAELens)")
    parser.add_argument(
        "--sparsify-lr", type=float, default=None, help="sparsify's LR (default: its own rule)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=128, help="sparsify: tokens per 'sequence' of its batches"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    acts_ND = torch.from_numpy(np.load(args.acts).astype(np.float32, copy=False))
    seconds = (train_saelens if args.lib == "saelens" else train_sparsify)(acts_ND, args)
    print(json.dumps({"lib": args.lib, "train_s": seconds}))


if __name__ == "__main__":
    main()
