"""Evaluate an SAE against the model it was trained on: sparsity, reconstruction, and downstream loss.

Held-out text is packed into windows (workflows/corpus.py) and run through the model three times:
clean, with the hook's value replaced by the SAE's reconstruction ("spliced"), and with it zeroed.

Which positions count:

- *Intervention positions* are the kept positions of the windows (``Windows.keep``: not BOS, not a
  separator/special token, not padding), the positions the SAE was trained on. Only they are spliced
  or zeroed; BOS and separators keep their original activations (an SAE never trained on BOS's
  outlier residual would otherwise wreck every later position).
- Activation metrics (L0, MSE, FVU, firing frequencies) use the kept positions.
- Next-token metrics (CE, KL) use position t iff t and t + 1 are both kept: the token read there was
  spliced, and the target is a real token (not a separator, not padding, not the next window).

Metrics: ``ce_loss_clean`` / ``ce_loss_spliced`` / ``ce_loss_zero`` are mean next-token cross-entropies
(nats); ``ce_loss_recovered = (zero - spliced) / (zero - clean)`` (1: as good as the model, 0: as bad
as zero-ablating the hook); ``kl_div`` is the mean KL(clean || spliced) of the next-token distributions.
``mse`` is the mean over elements of (x_hat - x)^2, ``fvu`` the squared error over the variance around
the mean of all evaluated tokens; a latent is dead if it never fired, dense if it fired on > 10% of tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sae_core import metrics
from sae_core.interop import AnySAE, import_sae
from sae_core.io import NATIVE_FILE, SPARSITY_FILE
from workflows.corpus import DEFAULT_CORPUS, Windows, iter_documents, pack_windows
from workflows.errors import UserError
from workflows.hooks import run_with_hooks
from workflows.models import LoadedModel, load_model
from workflows.options import DEFAULT_CONTEXT_SIZE

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvalResult:
    """Everything :func:`evaluate_sae` measures; ``metrics()`` is the flat dict for eval.json / MLflow."""

    l0: float
    mse: float
    fvu: float
    dead_fraction: float
    dense_fraction: float
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_zero: float
    ce_loss_recovered: float
    kl_div: float
    n_tokens: int
    """Kept positions the activation metrics were computed on."""
    n_ce_tokens: int
    """Positions the CE/KL metrics were computed on."""
    frequency_F: Tensor = field(repr=False)
    """Firing frequency of each latent over the kept positions."""

    def metrics(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "frequency_F"}

    def log_sparsity(self) -> Tensor:
        """SAELens's ``sparsity`` tensor: log10(frequency + 1e-10)."""
        return metrics.log_density(self.frequency_F)


class _Sums:
    """Running sums over batches (float64, so 10^6 tokens do not lose precision)."""

    def __init__(self, d_sae: int):
        self.counts_F = torch.zeros(d_sae, dtype=torch.long)
        self.n = self.n_ce = 0
        self.sq_err = self.l0 = self.ce_clean = self.ce_spliced = self.ce_zero = self.kl = 0.0
        self.sum_D: Tensor | None = None
        self.sum_sq = 0.0

    def add_acts(self, x_ND: Tensor, x_hat_ND: Tensor, latents_NF: Tensor) -> None:
        x = x_ND.double()
        self.sq_err += float((x_hat_ND.double() - x).pow(2).sum())
        fired_NF = latents_NF != 0
        self.l0 += float(fired_NF.sum())
        self.counts_F += fired_NF.sum(dim=0).cpu()
        self.sum_D = x.sum(dim=0) if self.sum_D is None else self.sum_D + x.sum(dim=0)
        self.sum_sq += float(x.pow(2).sum())
        self.n += len(x)


def next_token_losses(logits_BTV: Tensor, targets_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probs [M, V], CE per counted position [M]) for the positions of ``mask_BT``."""
    logp_MV = F.log_softmax(logits_BTV[:, :-1][mask_BT].float(), dim=-1)
    ce_M = -logp_MV.gather(-1, targets_BT[:, 1:][mask_BT].unsqueeze(-1)).squeeze(-1)
    return logp_MV, ce_M


def ce_positions(keep_BT: Tensor) -> Tensor:
    """[B, T-1]: position t predicts t + 1 and counts iff both are kept (see the module docstring)."""
    return keep_BT[:, :-1] & keep_BT[:, 1:]


def replace_kept(keep_BT: Tensor, values_ND: Tensor | None) -> Callable[[Tensor], Tensor]:
    """A hook replacement writing ``values_ND`` (zeros when None) at the kept positions only."""
    def fn(x_BTD: Tensor) -> Tensor:
        out = x_BTD.clone()
        out[keep_BT] = 0.0 if values_ND is None else values_ND.to(out.dtype)
        return out
    return fn


@torch.no_grad()
def _eval_batch(sae: AnySAE, model: Any, hook: str, ids_BT: Tensor, keep_BT: Tensor, sums: _Sums,
                out_hook: str | None = None) -> None:
    target_hook = out_hook or hook  # a PAIR wiring reads ``hook`` and stands in for ``out_hook``
    clean = run_with_hooks(model, ids_BT, capture=dict.fromkeys([hook, target_hook]), stop_at_last=False)
    x_ND = clean.activations[hook][keep_BT].float()
    out = sae(x_ND)
    sums.add_acts(clean.activations[target_hook][keep_BT].float(), out.x_hat_BD, out.latents_BF)
    spliced = run_with_hooks(model, ids_BT, replace={target_hook: replace_kept(keep_BT, out.x_hat_BD)}).logits
    zeroed = run_with_hooks(model, ids_BT, replace={target_hook: replace_kept(keep_BT, None)}).logits
    mask_BT = ce_positions(keep_BT)
    logp_clean, ce_clean = next_token_losses(clean.logits, ids_BT, mask_BT)
    logp_spliced, ce_spliced = next_token_losses(spliced, ids_BT, mask_BT)
    _, ce_zero = next_token_losses(zeroed, ids_BT, mask_BT)
    kl_M = (logp_clean.exp() * (logp_clean - logp_spliced)).sum(dim=-1)
    sums.n_ce += len(ce_clean)
    sums.ce_clean += float(ce_clean.double().sum())
    sums.ce_spliced += float(ce_spliced.double().sum())
    sums.ce_zero += float(ce_zero.double().sum())
    sums.kl += float(kl_M.double().sum())


def _result(sums: _Sums, width: int) -> EvalResult:
    if sums.n == 0 or sums.n_ce == 0:
        raise UserError("no evaluable tokens: the windows hold no kept position followed by a kept target")
    total_var = sums.sum_sq - float(sums.sum_D.pow(2).sum()) / sums.n
    freq_F = metrics.firing_frequency(sums.counts_F, sums.n)
    clean, spliced, zero = (v / sums.n_ce for v in (sums.ce_clean, sums.ce_spliced, sums.ce_zero))
    return EvalResult(
        l0=sums.l0 / sums.n, mse=sums.sq_err / (sums.n * width), fvu=sums.sq_err / max(total_var, 1e-12),
        dead_fraction=float(metrics.dead_fraction(sums.counts_F)), dense_fraction=float(metrics.dense_fraction(freq_F)),
        ce_loss_clean=clean, ce_loss_spliced=spliced, ce_loss_zero=zero,
        ce_loss_recovered=ce_recovered(clean, spliced, zero), kl_div=sums.kl / sums.n_ce,
        n_tokens=sums.n, n_ce_tokens=sums.n_ce, frequency_F=freq_F.float(),
    )


def ce_recovered(clean: float, spliced: float, zero: float) -> float:
    """(zero - spliced) / (zero - clean); NaN when zero-ablation does not change the loss."""
    gap = zero - clean
    return (zero - spliced) / gap if abs(gap) > 1e-12 else float("nan")


def evaluate_sae(sae: AnySAE, model: Any, hook: str, windows: Windows, *, batch_size: int = 8,
                 progress: Callable[[int], None] = lambda n: None, out_hook: str | None = None) -> EvalResult:
    """Evaluate ``sae`` spliced at ``hook`` of ``model`` (a ``*ForCausalLM`` or LoadedModel) on ``windows``.

    An SAE of PAIR wiring reads ``hook`` and its output replaces ``out_hook`` (e.g. MLP in -> MLP out): MSE/FVU
    are measured against ``out_hook``'s activations, and ``out_hook`` is what is spliced and zeroed.
    ``progress(n)`` is called with the kept tokens of each batch.
    """
    model = model.model if isinstance(model, LoadedModel) else model
    device = next(model.parameters()).device
    was_training = sae.training
    sae.eval().to(device)
    sums = _Sums(sae.cfg.d_sae)
    try:
        for start in range(0, len(windows.token_ids), batch_size):
            ids_BT = torch.from_numpy(windows.token_ids[start : start + batch_size].astype(np.int64)).to(device)
            keep_BT = torch.from_numpy(windows.keep[start : start + batch_size]).to(device)
            _eval_batch(sae, model, hook, ids_BT, keep_BT, sums, out_hook)
            progress(int(keep_BT.sum()))
    finally:
        sae.train(was_training)
    return _result(sums, sae.d_out)


@torch.no_grad()
def evaluate_per_site(sae: AnySAE, model: Any, hooks: list[str], windows: Windows, *, batch_size: int = 8,
                      progress: Callable[[int], None] = lambda n: None) -> dict[str, float]:
    """L0, dead/dense fractions, overall FVU and per-site FVU (``fvu/<hook>``) of an SAE reading several sites
    stacked (a STACKED wiring) on the kept positions of ``windows``; ``hooks`` in the order it was trained on."""
    from sae_core.trainer import evaluate

    model = model.model if isinstance(model, LoadedModel) else model
    device = next(model.parameters()).device
    chunks: list[Tensor] = []
    for start in range(0, len(windows.token_ids), batch_size):
        ids_BT = torch.from_numpy(windows.token_ids[start : start + batch_size].astype(np.int64)).to(device)
        keep_BT = torch.from_numpy(windows.keep[start : start + batch_size]).to(device)
        acts = run_with_hooks(model, ids_BT, capture=hooks).activations
        chunks.append(torch.stack([acts[h][keep_BT].float() for h in hooks], dim=1).cpu())
        progress(int(keep_BT.sum()))
    if not chunks or not sum(len(c) for c in chunks):
        raise UserError("no evaluable tokens: the windows hold no kept position")
    result = evaluate(sae, torch.cat(chunks))
    for s, hook in enumerate(hooks):
        result[f"fvu/{hook}"] = result.pop(f"fvu_source_{s}")
    return result


# -- data -----------------------------------------------------------------------------------------
def held_out_windows(tokenizer: Any, *, corpus: str | None, context_size: int, n_tokens: int,
                     skip_tokens: int = 0, text_field: str = "text") -> Windows:
    """Windows holding at least ``n_tokens`` kept tokens after the first ``skip_tokens`` kept tokens.

    Packing is deterministic, so with the training run's context size the skipped windows are exactly
    the ones its activations came from.
    """
    docs = iter_documents(corpus or DEFAULT_CORPUS, text_field=text_field)
    windows = pack_windows(docs, tokenizer, context_size=context_size, n_tokens=skip_tokens + n_tokens)
    first = int(np.searchsorted(np.cumsum(windows.keep.sum(axis=1)), skip_tokens, side="right")) if skip_tokens else 0
    if first >= len(windows.token_ids):
        raise UserError(f"the corpus {corpus or DEFAULT_CORPUS!r} has no tokens left after skipping {skip_tokens}")
    return Windows(*(a[first:] for a in windows))


def load_any_sae(sae: AnySAE | str | Path, fmt: str | None = None) -> tuple[AnySAE, dict[str, Any], bool]:
    """(module, source metadata, is_our_folder) for a module, a SAELens folder or any import format."""
    if not isinstance(sae, (str, Path)):
        return sae, {}, False
    imported = import_sae(sae, fmt)
    ours = imported.format == "saelens" and (Path(sae) / NATIVE_FILE).is_file()
    return imported.sae, imported.metadata, ours


def ce_loss_recovered(sae: AnySAE | str | Path, model: str | LoadedModel | None = None, hook: str | None = None, *,
                      corpus: str | None = None, n_tokens: int = 4096, context_size: int = DEFAULT_CONTEXT_SIZE,
                      skip_tokens: int = 0, batch_size: int = 8) -> float:
    """CE loss recovered of ``sae`` (a module, or a folder in any import format) spliced at ``hook`` of
    ``model`` (a spec for :func:`load_model`, a LoadedModel, or None for the SAE's own metadata / the
    default), on ``n_tokens`` tokens of ``corpus`` after ``skip_tokens``: (zero - spliced) / (zero - clean).
    """
    module, meta, _ = load_any_sae(sae)
    hook = hook or meta.get("hook_name")
    if not hook:
        raise UserError("name the hook: the SAE's metadata does not say which hook it reads")
    loaded = model if isinstance(model, LoadedModel) else load_model(model or meta.get("model_name"))
    windows = held_out_windows(loaded.tokenizer, corpus=corpus, context_size=context_size, n_tokens=n_tokens,
                               skip_tokens=skip_tokens)
    return evaluate_sae(module, loaded.model, hook, windows, batch_size=batch_size).ce_loss_recovered


# -- outputs --------------------------------------------------------------------------------------
EVAL_FILE = "eval.json"
HISTOGRAM_FILE = "feature_density.png"


def training_tokens(sae_dir: str | Path, corpus: str | None) -> int:
    """Tokens of ``corpus`` our training run consumed (from job.json and its store's manifest), so
    evaluation can skip them; 0 when unknown (a foreign SAE, a moved store, another corpus)."""
    import json

    from sae_core.store import read_manifest

    job_path = Path(sae_dir) / "job.json"
    try:
        manifest = read_manifest(json.loads(job_path.read_text())["activations"])
    except Exception:  # no job.json, store gone, unreadable: nothing to skip we can know of
        logger.warning("cannot tell which tokens trained %s; held-out tokens may overlap them (use --skip-tokens)",
                       sae_dir)
        return 0
    if (manifest.corpus or DEFAULT_CORPUS) != (corpus or DEFAULT_CORPUS):
        return 0
    return int(manifest.n_tokens)


def plot_density(result: EvalResult, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 firing frequency (dead latents sit in the leftmost bin, at -10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, edges = metrics.density_histogram(result.frequency_F)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(edges[:-1].numpy(), counts.numpy(), width=float(edges[1] - edges[0]), align="edge")
    ax.set_xlabel("log10(firing frequency + 1e-10)")
    ax.set_ylabel("latents")
    ax.set_title(title or f"feature density ({result.n_tokens} tokens, dead {result.dead_fraction:.1%})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_outputs(result: EvalResult, out: str | Path, *, sparsity_dir: str | Path | None = None,
                  info: dict[str, Any] | None = None) -> dict[str, Path]:
    """eval.json and the density PNG into ``out``; sparsity.safetensors into ``sparsity_dir`` (default ``out``)."""
    import json

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_FILE).write_text(json.dumps({**result.metrics(), **(info or {})}, indent=2))
    sparsity_path = Path(sparsity_dir or out) / SPARSITY_FILE
    save_file({"sparsity": result.log_sparsity().contiguous()}, str(sparsity_path))
    return {"eval": out / EVAL_FILE, "histogram": plot_density(result, out / HISTOGRAM_FILE),
            "sparsity": sparsity_path}
