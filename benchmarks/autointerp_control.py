"""The auto-interp control on a real model: a TopK SAE trained briefly on a collected store, explained and
scored on the next tokens of the corpus, against as many density-matched random directions on the same
windows. Prints the scores, the margin and its 95% bootstrap interval (README, auto-interpretation).

With the built-in SmolLM2-135M as its own judge the margin is at chance (README table); point the judges at
a stronger model with --scorer-url/--explainer-url (any OpenAI-compatible server returning logprobs).

    sae collect --hook blocks.6.hook_resid_post --tokens 16384 --out /tmp/store
    .venv/bin/python benchmarks/autointerp_control.py --store /tmp/store [--scorer-url http://127.0.0.1:8000/v1 ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sae_core.io import load_sae, save_sae
from sae_core.registry import build, make_config
from sae_core.store import ActivationStore
from sae_core.trainer import TrainConfig, Trainer
from workflows.autointerp import AutoInterpConfig, format_report, judges_from_options, run_autointerp
from workflows.evaluate import held_out_windows
from workflows.models import load_model


def train_topk(acts: torch.Tensor, *, d_sae: int, k: int, steps: int, batch: int) -> torch.nn.Module:
    torch.manual_seed(0)
    sae = build(make_config("topk", d_in=acts.shape[1], d_sae=d_sae, k=k))
    trainer = Trainer(sae, TrainConfig(steps=steps, batch_size=batch, lr=1e-3, lr_decay_steps=steps // 4,
                                       log_every=10**6))
    order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))
    list(trainer.fit(acts[order[(i * batch) % (len(acts) - batch):][:batch]] for i in range(steps)))
    folder = Path(tempfile.mkdtemp()) / "sae"
    return load_sae(save_sae(sae, folder, scaling_factor=trainer.scaling_factor)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a collected store of the default model")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--latents", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=6000, help="held-out tokens scanned after the store's")
    parser.add_argument("--seed", type=int, default=0)
    for who in ("explainer", "scorer"):
        parser.add_argument(f"--{who}-url", help=f"OpenAI-compatible endpoint of the {who} (default: local model)")
        parser.add_argument(f"--{who}-model", help="the server's model id (key in $OPENAI_API_KEY)")
    args = parser.parse_args()

    store = ActivationStore(args.store)
    sae = train_topk(store.read_hook(args.hook), d_sae=2304, k=32, steps=250, batch=1024)
    model = load_model()
    windows = held_out_windows(model.tokenizer, corpus=None, context_size=128, n_tokens=args.tokens,
                               skip_tokens=store.n_tokens)
    explainer, scorer = judges_from_options(vars(args), model)  # one local judge for both when no URL
    start = time.perf_counter()
    report = run_autointerp(sae, model.model, model.tokenizer, args.hook, windows, explainer=explainer,
                            scorer=scorer, cfg=AutoInterpConfig(n_latents=args.latents, seed=args.seed))
    print(format_report(report.metrics))
    print(f"({time.perf_counter() - start:.0f} s for the auto-interp pass)")
    for row in report.latents[:5]:
        print(f"  latent {row['latent']}: {row['explanation']!r} detection {row['detection_auroc']:.2f}")


if __name__ == "__main__":
    main()
