"""The dashboard's statistics in Neuronpedia's bulk-import layout, as SAEDashboard's exporter writes it:

    OUT/<model_id>/<source_id>/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl      one row each
        features/batch-<i>.jsonl.gz                                    one row per feature
        activations/batch-<i>.jsonl.gz                                 one row per example context

``source_id`` is ``<layer>-<source set>``. A feature row carries its index (as a string), the hook, the
largest activation seen (``maxActApprox``), the fraction of tokens it fires on (``frac_nonzero``), the
activation histogram (``freq_hist_data_bar_values``: bin centres, ``..._heights``: counts) and the logit
effects (``pos_str``/``pos_values`` promoted tokens, ``neg_str``/``neg_values`` suppressed). An activation row
is one example context: its tokens, the feature's activation on each (``values``), the peak and its index,
and for the sampled quantile examples the band they came from (``binMin``/``binMax``/``binContains``).
Statistics come from the same one-pass Ray Data scan as ``sae dashboard`` (workflows/dashboard.py).
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflows.dashboard import HIST_EDGES, DashboardConfig, FeatureStates
from workflows.dashboard_html import TokenText, logit_weights, make_example
from workflows.hooks import parse_hook

N_LOGITS = 10
CREATOR_ID = "sae-ray"


@dataclass(kw_only=True)
class NeuronpediaNames:
    """How Neuronpedia will name what is exported."""

    model_id: str
    """Neuronpedia's model id (e.g. smollm2-135m)."""
    source_set: str
    """Source set name (e.g. res-topk); the source id is ``<layer>-<source_set>``."""
    creator: str = "sae-ray"
    """Creator name recorded on the release and source set."""
    batch_features: int = 128
    """Features per features/activations batch file."""


def hist_centres() -> list[float]:
    """Bar positions of the dashboard's histogram bins: 0 for [0, 1e-4), geometric centres, then the top edge."""
    mids = np.sqrt(HIST_EDGES[:-1] * HIST_EDGES[1:])
    return [0.0, *map(float, mids), float(HIST_EDGES[-1])]


def feature_row(names: NeuronpediaNames, source_id: str, hook: str, state: FeatureStates, row: int,
                logits: dict[str, list], text: TokenText) -> dict[str, Any]:
    heights = state.hist[row].tolist()
    return {"modelId": names.model_id, "layer": source_id, "index": str(int(state.features[row])),
            "creatorId": CREATOR_ID, "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "maxActApprox": float(max(state.top_act[row].max(), 0.0)), "hasVector": False, "vector": [],
            "hookName": hook, "frac_nonzero": int(state.count[row]) / max(state.n_tokens, 1),
            "freq_hist_data_bar_values": hist_centres(), "freq_hist_data_bar_heights": heights,
            "pos_str": [text(i) for i in logits["top_ids"]], "pos_values": logits["top_vals"],
            "neg_str": [text(i) for i in logits["bottom_ids"]], "neg_values": logits["bottom_vals"],
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
            "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
            "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
            "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
            "topkCosSimIndices": [], "topkCosSimValues": [], "sourceSetName": names.source_set}


def activation_rows(names: NeuronpediaNames, source_id: str, state: FeatureStates, row: int, windows, left: int,
                    text: TokenText, corpus: str) -> list[dict[str, Any]]:
    """The top examples, then the sampled ones with the quantile band of the sample they fall in."""
    feature = str(int(state.features[row]))
    examples: list[tuple[Any, dict[str, Any]]] = []
    for i in np.flatnonzero(state.top_loc[row] >= 0):
        ex = make_example(windows, state.top_loc[row, i], state.top_ctx[row, i], state.top_act[row, i], left, text)
        examples.append((ex, {"binMin": -1.0, "binMax": -1.0, "binContains": -1.0}))  # SAEDashboard's "top" marker
    filled = np.flatnonzero(np.isfinite(state.sample_key[row]))
    if len(filled):
        order = filled[np.argsort(state.sample_act[row, filled], kind="stable")]
        for band in np.array_split(order, min(5, len(order))):
            lo, hi = float(state.sample_act[row, band].min()), float(state.sample_act[row, band].max())
            for j in band:
                ex = make_example(windows, state.sample_loc[row, j], state.sample_ctx[row, j], state.sample_act[row, j],
                                  left, text)
                examples.append((ex, {"binMin": lo, "binMax": hi, "binContains": len(band) / len(filled)}))
    rows = []
    for n, (ex, band) in enumerate(examples):
        rows.append({"id": f"{source_id}-{feature}-{n}", "tokens": ex.tokens, "index": feature, "layer": source_id,
                     "modelId": names.model_id, "maxValue": max(ex.acts), "maxValueTokenIndex": ex.peak,
                     "minValue": min(ex.acts), "values": ex.acts, "creatorId": CREATOR_ID, "dataSource": corpus,
                     "dataIndex": str(ex.window), **band})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]], *, gz: bool = False) -> Path:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=5) if gz else data)
    return path


def export(cfg: DashboardConfig, names: NeuronpediaNames) -> Path:
    """Scan the corpus as ``sae dashboard`` does and write the Neuronpedia layout under ``cfg.out``."""
    from sae_core.io import load_sae
    from workflows.dashboard import scan_features

    cfg, loaded, windows, state, chosen = scan_features(cfg)
    layer = parse_hook(cfg.hook, 10**6).layer
    source_id = f"{layer}-{names.source_set}"
    root = Path(cfg.out) / names.model_id / source_id
    write_metadata(root, names, cfg, source_id, windows)
    text = TokenText(loaded.tokenizer)
    logit_FV = logit_weights(loaded.model, load_sae(cfg.sae).W_dec.detach()[torch.as_tensor(state.features[chosen])])
    top_v, top_i = logit_FV.topk(N_LOGITS, dim=1)
    bot_v, bot_i = logit_FV.topk(N_LOGITS, dim=1, largest=False)
    for b, start in enumerate(range(0, len(chosen), names.batch_features)):
        features, activations = [], []
        for j in range(start, min(start + names.batch_features, len(chosen))):
            logits = {"top_ids": top_i[j].tolist(), "top_vals": top_v[j].tolist(),
                      "bottom_ids": bot_i[j].tolist(), "bottom_vals": bot_v[j].tolist()}
            features.append(feature_row(names, source_id, cfg.hook, state, chosen[j], logits, text))
            activations += activation_rows(names, source_id, state, chosen[j], windows, cfg.left, text, cfg.corpus)
        write_jsonl(root / "features" / f"batch-{b}.jsonl.gz", features, gz=True)
        write_jsonl(root / "activations" / f"batch-{b}.jsonl.gz", activations, gz=True)
    return root


def write_metadata(root: Path, names: NeuronpediaNames, cfg: DashboardConfig, source_id: str, windows) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_jsonl(root / "release.jsonl", [{"name": names.source_set, "description": f"{cfg.sae} ({cfg.hook})",
                                          "creatorName": names.creator, "creatorId": CREATOR_ID, "visibility": "PUBLIC",
                                          "urls": [], "createdAt": now}])
    write_jsonl(root / "model.jsonl", [{"id": names.model_id, "instruct": "instruct" in cfg.model.lower(),
                                        "creatorId": CREATOR_ID, "displayName": cfg.model,
                                        "displayNameShort": names.model_id, "createdAt": now, "updatedAt": now}])
    write_jsonl(root / "sourceset.jsonl", [{"modelId": names.model_id, "name": names.source_set,
                                            "creatorId": CREATOR_ID, "creatorName": names.creator,
                                            "releaseName": names.source_set, "hasDashboards": True,
                                            "visibility": "PUBLIC", "description": cfg.hook, "createdAt": now}])
    write_jsonl(root / "source.jsonl", [{"id": source_id, "modelId": names.model_id, "setName": names.source_set,
                                         "creatorId": CREATOR_ID, "hasDashboards": True, "visibility": "PUBLIC",
                                         "dataset": cfg.corpus, "num_prompts": int(len(windows.token_ids)),
                                         "num_tokens_in_prompt": int(cfg.context_size), "createdAt": now}])
