"""The auto-interp control on a real model: a TopK SAE trained briefly on the first tokens of the default
corpus (a collected --store, or collected here), explained and scored on the next tokens, against as many
density-matched random directions on the same windows, and against its own examples scored with shuffled
explanations. Prints the scores, the margins and their 95% bootstrap intervals (README, auto-interpretation).

Defaults: 64 latents against 64 random directions, 15 held-out positives and 15 negatives per latent (more
latents and more examples per latent both narrow the margin's interval: with 10 + 10 examples a latent's
detection AUROC was mostly sampling noise). With the built-in SmolLM2-135M as its own judge, likelihood scoring
(the default for a local scorer) puts the trained latents above the random directions (README) and Yes/No
questions (--scoring questions) are at chance; point the judges at a stronger model with
--scorer-url/--explainer-url (any OpenAI-compatible server returning logprobs; scored by questions).
--details F writes every latent's explanation and scores as json.

    .venv/bin/python benchmarks/autointerp_control.py [--store S] [--scorer-url http://127.0.0.1:8000/v1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from sae_core import metrics
from sae_core.io import load_sae, save_sae
from sae_core.registry import build, make_config
from sae_core.store import ActivationStore
from sae_core.trainer import TrainConfig, Trainer
from workflows.autointerp import (
    AutoInterpConfig,
    first_windows,
    format_report,
    hook_batches,
    judges_from_options,
    run_autointerp,
)
from workflows.evaluate import held_out_windows
from workflows.models import load_model


def train_topk(acts: torch.Tensor, *, d_sae: int, k: int, steps: int, batch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    sae = build(make_config("topk", d_in=acts.shape[1], d_sae=d_sae, k=k))
    trainer = Trainer(
        sae, TrainConfig(steps=steps, batch_size=batch, lr=1e-3, lr_decay_steps=steps // 4, log_every=10**6)
    )
    order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))
    list(trainer.fit(acts[order[(i * batch) % (len(acts) - batch) :][:batch]] for i in range(steps)))
    folder = Path(tempfile.mkdtemp()) / "sae"
    return load_sae(save_sae(sae, folder, scaling_factor=trainer.scaling_factor)).eval()


def collect(model, hook: str, windows, n_tokens: int) -> torch.Tensor:
    """[N, D] activations at ``hook`` of the first ``n_tokens`` kept tokens of ``windows`` (what ``sae
    collect`` stores, without Ray)."""
    batches = hook_batches(model.model, hook, first_windows(windows, n_tokens), 8)
    return torch.cat([acts[torch.from_numpy(keep)] for acts, keep, _ in batches])[:n_tokens]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", help="a collected store of the default model (default: collect here)")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--train-tokens", type=int, default=16384, help="tokens collected when no --store")
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--latents", type=int, default=64)
    parser.add_argument(
        "--examples", type=int, default=15, help="held-out positives and as many negatives per latent"
    )
    parser.add_argument("--tokens", type=int, default=6000, help="held-out tokens scanned after the SAE's")
    parser.add_argument("--scoring", default="auto", help="auto, likelihood or questions (AutoInterpConfig)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--details", help="write every latent's and random direction's rows here (json)")
    for who in ("explainer", "scorer"):
        parser.add_argument(
            f"--{who}-url", help=f"OpenAI-compatible endpoint of the {who} (default: local model)"
        )
        parser.add_argument(f"--{who}-model", help="the server's model id (key in $OPENAI_API_KEY)")
    args = parser.parse_args()

    start = begin = time.perf_counter()
    model = load_model()
    if args.store:
        store = ActivationStore(args.store)
        acts, n_train = store.read_hook(args.hook), store.n_tokens
    else:
        train_windows = held_out_windows(
            model.tokenizer, corpus=None, context_size=128, n_tokens=args.train_tokens
        )
        acts = collect(model, args.hook, train_windows, args.train_tokens)
        n_train = len(acts)
    sae = train_topk(acts, d_sae=args.d_sae, k=32, steps=args.steps, batch=1024)
    windows = held_out_windows(
        model.tokenizer, corpus=None, context_size=128, n_tokens=args.tokens, skip_tokens=n_train
    )
    with torch.no_grad():
        held_out = collect(model, args.hook, windows, 2048)
        fvu = float(metrics.fvu(sae.decode(sae.encode(held_out)), held_out))
    print(
        f"SAE: topk d_sae {args.d_sae}, {args.steps} steps on {n_train} tokens, FVU {fvu:.3f} on 2048 "
        f"held-out tokens ({time.perf_counter() - start:.0f} s with the activations)"
    )
    explainer, scorer = judges_from_options(vars(args), model)  # one local judge for both when no URL
    cfg = AutoInterpConfig(
        n_latents=args.latents,
        n_positives=args.examples,
        n_negatives=args.examples,
        n_samples=max(80, 10 * args.examples),  # positives come from the top 20% of these samples
        seed=args.seed,
        scoring=args.scoring,
    )
    start = time.perf_counter()
    report = run_autointerp(
        sae, model.model, model.tokenizer, args.hook, windows, explainer=explainer, scorer=scorer, cfg=cfg
    )
    print(format_report(report.metrics))
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"({time.perf_counter() - start:.0f} s for the auto-interp pass, {time.perf_counter() - begin:.0f} s "
        f"in all; load average {load})"
    )
    if args.details:
        Path(args.details).write_text(
            json.dumps({"metrics": report.metrics, **report.details()}, default=str)
        )
    for row in report.latents[:5]:
        print(f"  latent {row['latent']}: {row['explanation']!r} detection {row['detection_auroc']:.2f}")


if __name__ == "__main__":
    main()
