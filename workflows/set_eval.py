"""Evaluating a transcoder set (workflows/transcoder_set.py) spliced whole: every covered MLP output replaced
by its transcoder at once, each transcoder reading the MLP input of the already-spliced model."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_core.publish import atomic_write_bytes
from workflows.corpus import Windows
from workflows.errors import UserError
from workflows.evaluate import ce_positions, ce_recovered, next_token_losses
from workflows.hooks import run_with_hooks
from workflows.transcoder_set import HOOK_IN, HOOK_OUT, load_set, read_set


# -- every member spliced at once ------------------------------------------------------------
def splice_set(members: dict[int, Any], keep_BT: Tensor, *, zero: bool = False) -> dict[str, Callable]:
    """Hook replacements putting every member in place of its MLP output at the kept positions: the MLP input
    hook records the (spliced model's) input, the output hook substitutes the transcoder's output for it."""
    seen: dict[int, Tensor] = {}
    replace: dict[str, Callable] = {}
    for layer, tc in members.items():

        def record(x_BTD: Tensor, layer: int = layer) -> Tensor:
            seen[layer] = x_BTD
            return x_BTD

        def substitute(y_BTD: Tensor, layer: int = layer, tc: Any = tc) -> Tensor:
            out = y_BTD.clone()
            out[keep_BT] = 0.0 if zero else tc(seen[layer][keep_BT].float()).x_hat_BD.to(out.dtype)
            return out

        replace[HOOK_IN.format(layer=layer)] = record
        replace[HOOK_OUT.format(layer=layer)] = substitute
    return replace


@torch.no_grad()
def evaluate_set(
    members: dict[int, Any], model: Any, windows: Windows, *, batch_size: int = 8
) -> dict[str, float]:
    """CE loss recovered, KL and top-1 agreement of the full replacement model (every member spliced at once)."""
    device = next(model.parameters()).device
    sums: dict[str, float] = defaultdict(float)  # token counts and float64 sums over the windows
    for start in range(0, len(windows.token_ids), batch_size):
        ids_BT = torch.from_numpy(windows.token_ids[start : start + batch_size].astype(np.int64)).to(device)
        keep_BT = torch.from_numpy(windows.keep[start : start + batch_size]).to(device)
        clean = run_with_hooks(model, ids_BT, stop_at_last=False).logits
        spliced = run_with_hooks(model, ids_BT, replace=splice_set(members, keep_BT)).logits
        zeroed = run_with_hooks(model, ids_BT, replace=splice_set(members, keep_BT, zero=True)).logits
        mask_BT = ce_positions(keep_BT)
        logp_clean, ce_clean = next_token_losses(clean, ids_BT, mask_BT)
        logp_spliced, ce_spliced = next_token_losses(spliced, ids_BT, mask_BT)
        _, ce_zero = next_token_losses(zeroed, ids_BT, mask_BT)
        sums["n"] += len(ce_clean)
        sums["ce_clean"] += float(ce_clean.double().sum())
        sums["ce_spliced"] += float(ce_spliced.double().sum())
        sums["ce_zero"] += float(ce_zero.double().sum())
        sums["kl"] += float((logp_clean.exp() * (logp_clean - logp_spliced)).sum(-1).double().sum())
        sums["agree"] += int((logp_clean.argmax(-1) == logp_spliced.argmax(-1)).sum())
    if sums["n"] == 0:
        raise UserError("no evaluable tokens: the windows hold no kept position followed by a kept target")
    clean, spliced, zero = (v / sums["n"] for v in (sums["ce_clean"], sums["ce_spliced"], sums["ce_zero"]))
    return {
        "ce_loss_clean": clean,
        "ce_loss_spliced": spliced,
        "ce_loss_zero": zero,
        "ce_loss_recovered": ce_recovered(clean, spliced, zero),
        "kl_div": sums["kl"] / sums["n"],
        "top1_agreement": sums["agree"] / sums["n"],
        "n_ce_tokens": int(sums["n"]),
        "n_members": len(members),
    }


def evaluate_set_folder(
    path: str | Path,
    *,
    n_tokens: int = 4096,
    model: str | None = None,
    corpus: str | None = None,
    skip_tokens: int | None = None,
    batch_size: int = 8,
    mlflow_uri: str | None = None,
    out: str | Path | None = None,
) -> dict[str, float]:
    """:func:`evaluate_set` on held-out text after the set's training tokens; writes eval.json into the set
    folder (or ``out``) and, given ``mlflow_uri``, logs ``eval/*`` to the set's MLflow parent run there."""
    from workflows.evaluate import held_out_windows
    from workflows.models import load_model
    from workflows.tracking import MlflowTracker, resolve_tracking_uri

    manifest = read_set(path)
    loaded = load_model(model or manifest["model"])
    corpus = corpus or manifest.get("corpus") or None
    skip = (
        skip_tokens if skip_tokens is not None else (int(manifest.get("train_tokens", 0)) if not model else 0)
    )
    windows = held_out_windows(
        loaded.tokenizer,
        corpus=corpus,
        context_size=int(manifest["context_size"]),
        n_tokens=n_tokens,
        skip_tokens=skip,
    )
    metrics = evaluate_set(load_set(path), loaded.model, windows, batch_size=batch_size)
    metrics.update(
        {
            f"fvu/layer_{m['layer']:02d}": m["metrics"]["fvu"]
            for m in manifest["members"]
            if "fvu" in m["metrics"]
        }
    )
    target = Path(out or path)
    target.mkdir(parents=True, exist_ok=True)
    info = {"set": str(path), "model": manifest["model"], "layers": manifest["layers"], "skip_tokens": skip}
    atomic_write_bytes(target / "eval.json", json.dumps({**metrics, **info}, indent=2).encode())
    if mlflow_uri is not None and manifest.get(
        "mlflow_parent_run_id"
    ):  # only where asked (`sae run`, --mlflow-uri)
        tracker = MlflowTracker(resolve_tracking_uri(mlflow_uri), manifest["mlflow_parent_run_id"])
        try:
            tracker.client.get_run(tracker.run_id)
        except Exception as exc:  # MlflowException for a run of another tracking store
            raise UserError(f"the set's MLflow run {tracker.run_id} is not in {tracker.uri}: {exc}") from exc
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items() if math.isfinite(v)}, step=0)
    return metrics
