"""The static dashboard site: what each feature page shows, and its HTML.

Every page is self-contained (CSS and JS from ``workflows/dashboard_assets/`` inlined, the histogram
as inline SVG, no network), so the folder opens from disk. All token text goes through ``html.escape``.

Logit effects follow SAELens / Neuronpedia: the decoder row times the final norm's weight (Gemma's
RMSNorm: ``1 + weight``), then the unembedding. No centering and no input-dependent scale: the norm's
division by the residual's RMS depends on the input, so the numbers rank tokens, their scale is arbitrary.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sae_core.lock import locked
from sae_core.publish import publish_folder
from workflows.corpus import Windows
from workflows.dashboard import HIST_EDGES, DashboardConfig, FeatureStates
from workflows.errors import UserError
from workflows.hooks import _get_path

_FINAL_NORMS = ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                "model.decoder.final_layer_norm")
N_LOGITS = 10
N_BANDS, PER_BAND = 4, 3


@dataclass(kw_only=True)
class Example:
    tokens: list[str]
    acts: list[float]
    peak: int
    """Index of the example's own token in ``tokens``."""
    act: float
    window: int
    position: int


def final_norm(model: nn.Module) -> nn.Module:
    for path in _FINAL_NORMS:
        module = _get_path(model, path)
        if isinstance(module, nn.Module) and getattr(module, "weight", None) is not None:
            return module
    raise UserError(f"{type(model).__name__} has no final norm at any of {_FINAL_NORMS}")


@torch.no_grad()
def logit_weights(model: nn.Module, W_dec_FD: Tensor) -> Tensor:
    """[F, vocab]: each decoder row through the final norm's weight and the unembedding."""
    norm = final_norm(model)
    weight_D = norm.weight.float()
    if "Gemma" in type(norm).__name__:  # Gemma's RMSNorm scales by (1 + weight)
        weight_D = 1.0 + weight_D
    W_U_VD = model.get_output_embeddings().weight.float()
    return (W_dec_FD.float() * weight_D) @ W_U_VD.T


class TokenText:
    """Readable, cached text of single token ids (newlines and tabs made visible)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            text = self.tokenizer.decode([int(token_id)])
            self.cache[token_id] = text.replace("\n", "↵").replace("\t", "⇥") or "∅"
        return self.cache[token_id]


def make_example(windows: Windows, loc: int, ctx: np.ndarray, act: float, left: int, text: TokenText) -> Example:
    T = windows.token_ids.shape[1]
    w, t = divmod(int(loc), T)
    offsets = [o for o in range(-left, len(ctx) - left) if 0 <= t + o < T]
    return Example(tokens=[text(windows.token_ids[w, t + o]) for o in offsets],
                   acts=[float(np.nan_to_num(ctx[o + left])) for o in offsets],
                   peak=offsets.index(0), act=float(act), window=w, position=t)


def quantile_bands(state: FeatureStates, row: int, windows: Windows, left: int, text: TokenText):
    """[(label, examples)] from the uniform sample, highest band first, lowest-key examples in each band."""
    filled = np.flatnonzero(np.isfinite(state.sample_key[row]))
    if len(filled) == 0:
        return []
    acts = state.sample_act[row, filled]
    order = filled[np.argsort(acts, kind="stable")]
    bands = []
    for i, chunk in enumerate(np.array_split(order, N_BANDS)):
        if len(chunk) == 0:
            continue
        lo, hi = float(state.sample_act[row, chunk].min()), float(state.sample_act[row, chunk].max())
        label = f"Sampled quantile {100 * i // N_BANDS}–{100 * (i + 1) // N_BANDS}% (activation {lo:.3g}–{hi:.3g})"
        pick = sorted(chunk)[:PER_BAND]  # sample slots are in key order: an unbiased pick within the band
        bands.append((label, [make_example(windows, state.sample_loc[row, j], state.sample_ctx[row, j],
                                           state.sample_act[row, j], left, text) for j in pick]))
    return bands[::-1]


# -- HTML -----------------------------------------------------------------------------------------
def _asset(name: str) -> str:
    return resources.files("workflows").joinpath("dashboard_assets", name).read_text(encoding="utf-8")


def page(title: str, body: str) -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{html.escape(title)}</title>"
            f"<style>{_asset('style.css')}</style></head>\n<body>\n{body}\n"
            f"<script>{_asset('dashboard.js')}</script>\n</body></html>\n")


def _tok(text: str) -> str:
    return f"<code class=\"tok\">{html.escape(text)}</code>"


def render_example(ex: Example, scale: float) -> str:
    spans = []
    for i, (token, act) in enumerate(zip(ex.tokens, ex.acts, strict=True)):
        alpha = min(1.0, max(0.0, act / scale)) if scale > 0 else 0.0
        cls = "t peak" if i == ex.peak else "t"
        spans.append(f"<span class=\"{cls}\" style=\"background:rgba(255,112,0,{alpha:.3f})\" "
                     f"title=\"{act:.4g}\">{html.escape(token)}</span>")
    return (f"<div class=\"ex\"><span class=\"act\">{ex.act:.4g}</span>"
            f"<span class=\"ctx\">{''.join(spans)}</span></div>")


def histogram_svg(hist: np.ndarray, width: int = 640, height: int = 140) -> str:
    nonzero = np.flatnonzero(hist)
    if len(nonzero) == 0:
        return "<p class=\"muted\">The feature never fired.</p>"
    lo, hi = int(nonzero[0]), int(nonzero[-1])
    counts = hist[lo:hi + 1]
    edges = np.r_[0.0, HIST_EDGES, np.inf]
    bar_w = width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 20) * c / counts.max()
        a, b = edges[lo + i], edges[lo + i + 1]
        bars.append(f"<rect x=\"{i * bar_w:.1f}\" y=\"{height - 20 - h:.1f}\" width=\"{max(bar_w - 1, 1):.1f}\" "
                    f"height=\"{h:.1f}\"><title>{a:.3g} to {b:.3g}: {int(c)}</title></rect>")
    return (f"<svg class=\"hist\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" "
            f"role=\"img\" aria-label=\"activation histogram\">{''.join(bars)}"
            f"<text x=\"0\" y=\"{height - 4}\">{edges[lo]:.3g}</text>"
            f"<text x=\"{width}\" y=\"{height - 4}\" text-anchor=\"end\">{edges[hi + 1]:.3g}</text></svg>"
            "<p class=\"muted\">Firing activations, log-spaced bins (10 per decade).</p>")


def logit_table(title: str, ids: list[int], vals: list[float], text: TokenText) -> str:
    rows = "".join(f"<tr><td>{_tok(text(i))}</td><td class=\"num\">{v:+.3f}</td></tr>" for i, v in zip(ids, vals, strict=True))
    return f"<table class=\"logits\"><caption>{html.escape(title)}</caption>{rows}</table>"


def top_summary(examples: list[Example], n: int = 3) -> str:
    counts = Counter(ex.tokens[ex.peak] for ex in examples)
    return " · ".join(f"{tok!r} ×{c}" for tok, c in counts.most_common(n))


def feature_page(feature: int, info: dict[str, Any], top: list[Example], bands, logits: dict[str, Any],
                 hist: np.ndarray, text: TokenText, meta: str) -> str:
    scale = top[0].act if top else 1.0
    tops = "".join(render_example(ex, scale) for ex in top) or "<p class=\"muted\">No activation found.</p>"
    band_html = "".join(f"<h3>{html.escape(label)}</h3>" + "".join(render_example(ex, scale) for ex in exs)
                        for label, exs in bands)
    body = (f"<header><a href=\"index.html\">← all features</a><h1 id=\"feature\" data-feature=\"{feature}\">"
            f"Feature {feature}</h1><p class=\"muted\">{html.escape(meta)}</p></header><main>"
            f"<section class=\"stats\"><div><b>Density</b> {info['density']:.4%} ({info['count']} of "
            f"{info['n_tokens']} tokens)</div><div><b>Max activation</b> {info['max']:.4g}</div></section>"
            f"<section><h2>Activation histogram</h2>{histogram_svg(hist)}</section>"
            "<section class=\"logit-effects\"><h2>Logit effects</h2>"
            "<p class=\"muted\">Decoder row through the final norm weight and the unembedding.</p>"
            f"{logit_table('Promoted', logits['top_ids'], logits['top_vals'], text)}"
            f"{logit_table('Suppressed', logits['bottom_ids'], logits['bottom_vals'], text)}</section>"
            f"<section><h2>Top activations</h2>{tops}</section>"
            f"<section><h2>Examples across the activation range</h2>{band_html}</section></main>")
    return page(f"Feature {feature}", body)


def index_page(rows: list[dict[str, Any]], meta: str) -> str:
    trs = "".join(
        f"<tr><td data-v=\"{r['feature']}\"><a href=\"{r['page']}\">{r['feature']}</a></td>"
        f"<td class=\"num\" data-v=\"{r['density']:.6g}\">{r['density']:.4%}</td>"
        f"<td class=\"num\" data-v=\"{r['max']:.6g}\">{r['max']:.4g}</td>"
        f"<td>{html.escape(r['summary'])}</td></tr>" for r in rows)
    body = (f"<header><h1>SAE features</h1><p class=\"muted\">{html.escape(meta)}</p>"
            "<input id=\"filter\" type=\"search\" placeholder=\"Filter by id or token…\" aria-label=\"filter\">"
            f" <span class=\"muted\"><span id=\"shown\">{len(rows)}</span> of {len(rows)} shown</span></header>"
            "<main><table id=\"features\"><thead><tr><th data-type=\"num\">Feature</th>"
            "<th data-type=\"num\">Density</th><th data-type=\"num\">Max act</th>"
            f"<th data-type=\"text\">Top tokens</th></tr></thead><tbody>{trs}</tbody></table></main>")
    return page("SAE features", body)


def write_site(out: Path, cfg: DashboardConfig, state: FeatureStates, chosen: list[int], windows: Windows,
               loaded: Any, sae: nn.Module) -> list[dict[str, Any]]:
    """Write index.html, one feature-NNNNN.html per chosen row and features.json; returns the index rows.
    The site is published as a whole (sae_core.publish): a reader sees the previous site or this one,
    never pages of both; a previous site's pages that this one lacks are removed, other files kept."""
    files: dict[str, bytes] = {}
    text = TokenText(loaded.tokenizer)
    ids = torch.as_tensor(state.features[chosen])
    logit_FV = logit_weights(loaded.model, sae.W_dec.detach()[ids])
    top_v, top_i = logit_FV.topk(N_LOGITS, dim=1)
    bot_v, bot_i = logit_FV.topk(N_LOGITS, dim=1, largest=False)
    meta = f"SAE {cfg.sae} · {cfg.model} · {cfg.hook} · {state.n_tokens} tokens of {cfg.corpus}"
    rows = []
    for j, row in enumerate(chosen):
        feature = int(state.features[row])
        filled = np.flatnonzero(state.top_loc[row] >= 0)
        top = [make_example(windows, state.top_loc[row, i], state.top_ctx[row, i], state.top_act[row, i],
                            cfg.left, text) for i in filled]
        info = {"feature": feature, "count": int(state.count[row]), "n_tokens": state.n_tokens,
                "density": int(state.count[row]) / max(state.n_tokens, 1), "max": top[0].act if top else 0.0,
                "summary": top_summary(top), "page": f"feature-{feature:05d}.html"}
        logits = {"top_ids": top_i[j].tolist(), "top_vals": top_v[j].tolist(),
                  "bottom_ids": bot_i[j].tolist(), "bottom_vals": bot_v[j].tolist()}
        bands = quantile_bands(state, row, windows, cfg.left, text)
        files[info["page"]] = feature_page(feature, info, top, bands, logits, state.hist[row], text, meta).encode()
        rows.append({**info, "top": [[ex.act, ex.window, ex.position] for ex in top],
                     "promoted": [text(i) for i in logits["top_ids"]], "suppressed": [text(i) for i in logits["bottom_ids"]]})
    files["index.html"] = index_page(rows, meta).encode()
    files["features.json"] = json.dumps({"meta": meta, "features": rows}, indent=1).encode()
    with locked(out, purpose="writing a dashboard"):
        old_pages = [p.name for p in out.glob("feature-*.html")] if out.is_dir() else []
        publish_folder(out, files, replaced=[*old_pages, "index.html", "features.json"], commit="index.html")
    return rows
