"""`sae train` beside the peers: SAELens and EleutherAI's sparsify train the same TopK SAE on the same
activations, each with its own training code, and all three are evaluated by the same code.

1. A venv of its own for the peers (default ~/.cache/sae-ray/peers-venv, reused once set up) with the
   same torch wheel as the project's (``$TORCH_SPEC``, as in the Makefile, installed first so pip pulls
   no CUDA build), then ``sae-lens`` and ``eai-sparsify`` at the versions below. The project and its
   tests never import them: the peers run as benchmarks/peers_train.py in that venv.
2. ``sae collect`` once: SmolLM2-135M, ``--hook`` (default the residual stream after block 8), ``--tokens``
   of ``--corpus``. Its last 5% of rows are what `sae train` holds out; the rest are dumped as a float32
   .npy for the peers (reused when the store is).
3. Training, timed as whole commands from outside (Python start, imports, data loading, training,
   saving): `sae train` on the store (its held-out evaluation included), each peer on the dump; the
   peers also report the seconds of their trainer alone. Same d_sae, k, tokens per step and steps; the
   same Adam LR for SAELens; sparsify keeps its own optimizer (signum, LR by its own rule) unless
   ``--sparsify-lr``. ``--repeats`` runs all three in turns and reports median [min-max]; the wall-time
   ratio to sparsify is taken per repeat (runs next to each other share the machine's load).
   A reference that does not depend on any tool is timed in this process around every run: the encoder
   GEMM of this size (``x @ W_enc``, [batch, d] x [d, d_sae], median of 5), with the load average, so a
   loaded machine shows in the table ("floor ms") and ``wall / floor`` compares runs made under
   different loads.
4. Evaluation, the same for all three (sae_core.interop reads each library's folder): held-out FVU
   and L0 on the store's held-out rows, and CE loss recovered / KL on ``--eval-tokens`` tokens of the
   corpus after the collected ones, the SAE spliced into the model.

    .venv/bin/python benchmarks/peers.py                                   # the full size (see README)
    .venv/bin/python benchmarks/peers.py --tokens 40960 --steps 100 --batch-size 1024 --d-sae 1152
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sae_core.store import ActivationStore
from sae_core.trainer import evaluate
from workflows.evaluate import evaluate_sae, held_out_windows, load_any_sae
from workflows.job import TrainJob
from workflows.models import load_model

PEERS = ("sae-lens==6.54.12", "eai-sparsify==1.3.3")
"""The versions this benchmark was written against (their trainers' APIs move between releases)."""
TOOLS = ("sae train", "sparsify", "saelens")
LR = 2e-3
"""Adam LR of `sae train` and SAELens, in the range of the project's short recipes (1e-3 to 3e-3; sae train's
default, 4e-4, is for runs of 10k+ steps and leaves 1000 steps LR-limited). Held-out FVU at the full size:
4e-4 -> 0.155, 1e-3 -> 0.136, 2e-3 -> 0.133 (README, "Beside the peers")."""
HERE = Path(__file__).resolve().parent
COLLECT_ATTEMPTS = 3


def peer_venv(path: Path) -> Path:
    """The peers' venv, created and filled on first use: torch from $TORCH_SPEC first, then the peers."""
    python = path / "bin" / "python"
    stamp = path / ".peers-done"
    spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    wanted = json.dumps({"torch": spec, "peers": PEERS})
    if stamp.is_file() and stamp.read_text() == wanted:
        return python
    print(f"setting up {path} ({spec}, {', '.join(PEERS)}) ...", flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--no-compile"]
    subprocess.run([*pip, *spec.split()], check=True)
    subprocess.run([*pip, *PEERS], check=True)
    stamp.write_text(wanted)
    return python


def sae_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "workflows.cli", *args], env)


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{result.stderr[-4000:]}")
    return result


def collect(args: argparse.Namespace, store: Path, env: dict[str, str]) -> ActivationStore:
    """The store, collected unless one of at least --tokens tokens of this hook is there already."""
    try:
        found = ActivationStore(store)
        if args.hook in found.hooks and found.n_tokens >= args.tokens:
            print(f"reusing {store} ({found.n_tokens} tokens)")
            return found
    except Exception:  # absent or unfinished: (re)collect, which resumes an unfinished store
        pass
    start = time.perf_counter()
    for attempt in range(COLLECT_ATTEMPTS):  # a loaded machine can miss Ray's 30 s startup; a rerun resumes
        try:
            sae_cli(
                "collect",
                "--hook",
                args.hook,
                "--tokens",
                str(args.tokens),
                "--corpus",
                args.corpus,
                "--out",
                str(store),
                env=env,
            )
            break
        except SystemExit as failure:
            if attempt == COLLECT_ATTEMPTS - 1:
                raise
            print(f"sae collect failed (attempt {attempt + 1}), retrying: {str(failure)[-300:]}", flush=True)
    print(f"collected {store} in {time.perf_counter() - start:.0f} s")
    return ActivationStore(store)


def split(store: ActivationStore, args: argparse.Namespace, dump: Path) -> tuple[int, torch.Tensor]:
    """Training rows (as `sae train` takes them: all but its held-out tail) dumped to ``dump`` for the
    peers; returns their count and the held-out rows."""
    total = store.n_tokens
    train_rows = total - max(int(total * TrainJob.__dataclass_fields__["eval_fraction"].default), 1)
    if not dump.is_file() or np.load(dump, mmap_mode="r").shape[0] != train_rows:
        np.save(dump, store.read_hook(args.hook, 0, train_rows).numpy().astype(np.float32, copy=False))
    return train_rows, store.read_hook(args.hook, train_rows, total)


def train_ours(args: argparse.Namespace, store: Path, out: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    sae_cli("train", "--activations", str(store), "--hook", args.hook, "--arch", "topk", "--d-sae", str(args.d_sae),
            "--k", str(args.k), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--seed", str(args.seed), "--out", str(out), "--overwrite", env=env)
    return time.perf_counter() - start


def train_peer(
    lib: str, python: Path, args: argparse.Namespace, dump: Path, out: Path, env: dict[str, str]
) -> tuple[float, float]:
    """(whole command seconds, the peer's trainer seconds)."""
    cmd = [str(python), str(HERE / "peers_train.py"), "--lib", lib, "--acts", str(dump), "--out", str(out),
           "--d-sae", str(args.d_sae), "--k", str(args.k), "--steps", str(args.steps), "--batch", str(args.batch_size),
           "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads)]
    if args.sparsify_lr:
        cmd += ["--sparsify-lr", str(args.sparsify_lr)]
    start = time.perf_counter()
    result = run(cmd, {k: v for k, v in env.items() if k != "PYTHONPATH"})
    wall = time.perf_counter() - start
    return wall, json.loads(result.stdout.strip().splitlines()[-1])["train_s"]


def show(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f}" + (
        f" [{min(values):.{digits}f}-{max(values):.{digits}f}]" if len(values) > 1 else ""
    )


class Reference:
    """The encoder GEMM of the benchmark's size, timed alone in this process: the machine's speed now."""

    def __init__(self, batch_size: int, d_in: int, d_sae: int):
        g = torch.Generator().manual_seed(0)
        self.x_BD = torch.randn(batch_size, d_in, generator=g)
        self.W_DF = torch.randn(d_in, d_sae, generator=g)

    def seconds(self, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats + 1):  # the first warms the allocator and threads
            start = time.perf_counter()
            self.x_BD @ self.W_DF
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hook", default="blocks.8.hook_resid_post")
    parser.add_argument("--corpus", default="builtin:stdlib", help="text to collect from (see `sae collect`)")
    parser.add_argument("--tokens", type=int, default=333_000, help="tokens collected (5%% held out)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2048, help="tokens per step")
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument(
        "--lr",
        type=float,
        default=LR,
        help="Adam LR of ours and SAELens (sae train's default, 4e-4, is for long runs)",
    )
    parser.add_argument("--sparsify-lr", type=float, default=None, help="default: sparsify's own rule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every tool")
    parser.add_argument("--repeats", type=int, default=1, help="training runs of each tool, in turns")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens for CE loss recovered")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "sae-ray" / "peers-work")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "sae-ray" / "peers-venv")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "RAY_ADDRESS": "",
        "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}",
    }
    python = peer_venv(args.venv) if set(args.tools) - {"sae train"} else None
    store_dir = args.work / f"store-{args.hook}-{args.tokens}"
    store = collect(args, store_dir, env)
    dump = store_dir.with_suffix(".train.npy")
    train_rows, held_out_ND = split(store, args, dump)
    print(
        f"{train_rows} training rows, {len(held_out_ND)} held out; d_sae={args.d_sae} k={args.k} "
        f"steps={args.steps} batch={args.batch_size} threads={args.threads}",
        flush=True,
    )

    outs = {tool: args.work / tool.replace(" ", "-") for tool in args.tools}
    walls: dict[str, list[float]] = {tool: [] for tool in args.tools}
    inner: dict[str, list[float]] = {tool: [] for tool in args.tools}
    floors: dict[str, list[float]] = {tool: [] for tool in args.tools}
    loads: dict[str, list[float]] = {tool: [] for tool in args.tools}
    torch.set_num_threads(args.threads)
    reference = Reference(args.batch_size, held_out_ND.shape[1], args.d_sae)
    for r in range(args.repeats):
        for tool in args.tools:
            before, load = reference.seconds(), os.getloadavg()[0]
            if tool == "sae train":
                walls[tool].append(train_ours(args, store_dir, outs[tool], env))
            else:
                wall, train_s = train_peer(tool, python, args, dump, outs[tool], env)
                walls[tool].append(wall)
                inner[tool].append(train_s)
            floors[tool].append((before + reference.seconds()) / 2)
            loads[tool].append((load + os.getloadavg()[0]) / 2)
            print(
                f"repeat {r}: {tool} {walls[tool][-1]:.1f} s (floor {1000 * floors[tool][-1]:.0f} ms, "
                f"load average {loads[tool][-1]:.1f})",
                flush=True,
            )

    loaded = load_model(store.manifest.model)
    windows = held_out_windows(
        loaded.tokenizer,
        corpus=store.manifest.corpus or args.corpus,
        context_size=store.manifest.context_size,
        n_tokens=args.eval_tokens,
        skip_tokens=store.manifest.n_tokens,
    )
    rows = {}
    for tool in args.tools:
        sae, _, _ = load_any_sae(outs[tool])
        held = evaluate(sae, held_out_ND)
        spliced = evaluate_sae(sae, loaded.model, args.hook, windows)
        rows[tool] = {
            "wall_s": walls[tool],
            "trainer_s": inner[tool],
            "floor_s": floors[tool],
            "load_average": loads[tool],
            "held_out_fvu": held["fvu"],
            "l0": held["l0"],
            "dead_fraction": held["dead_fraction"],
            "ce_loss_recovered": spliced.ce_loss_recovered,
            "kl_div": spliced.kl_div,
        }
    (args.work / "peers.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2)
    )
    print_table(rows)


def print_table(rows: dict[str, dict]) -> None:
    print(
        "\n| tool | wall s (whole command) | peer's trainer s | wall / floor | floor ms | load avg | held-out FVU "
        "| L0 | dead | CE loss recovered | KL |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tool, row in rows.items():
        per_floor = [w / f for w, f in zip(row["wall_s"], row["floor_s"], strict=True)]
        print(
            f"| {tool} | {show(row['wall_s'])} | {show(row['trainer_s']) if row['trainer_s'] else '-'} | "
            f"{show(per_floor, 0)} | {show([1000 * f for f in row['floor_s']], 0)} | {show(row['load_average'])} | "
            f"{row['held_out_fvu']:.4f} | {row['l0']:.1f} | {row['dead_fraction']:.3f} | "
            f"{row['ce_loss_recovered']:.4f} | {row['kl_div']:.4f} |"
        )
    if "sae train" in rows and "sparsify" in rows:
        ours, theirs = rows["sae train"], rows["sparsify"]
        ratios = [a / b for a, b in zip(ours["wall_s"], theirs["wall_s"], strict=True)]
        print(
            f"\nsae train / sparsify wall time, per repeat: {show(ratios, 2)} (target <= 0.7); "
            f"FVU {ours['held_out_fvu']:.4f} vs "
            f"{theirs['held_out_fvu']:.4f} (target <= +2%); CE loss recovered {ours['ce_loss_recovered']:.4f} vs "
            f"{theirs['ce_loss_recovered']:.4f} (target: no lower)"
        )


if __name__ == "__main__":
    main()
