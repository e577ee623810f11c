"""Feature dashboards: the Ray Data pass equals brute force, merging is split-invariant, the site is escaped."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

from sae_core.io import load_sae, save_sae
from sae_core.registry import build, make_config
from workflows.cli import main
from workflows.corpus import iter_documents, pack_windows
from workflows.dashboard import DashboardConfig, batch_states, build_dashboard, merge, parse_features
from workflows.dashboard_html import final_norm, logit_weights
from workflows.hooks import run_with_hooks
from workflows.models import load_model

HOOK = "blocks.1.hook_resid_post"
CONTEXT, TOKENS, K = 24, 500, 5
HTML_TEXT = "Markup <b>bold</b> & <script>alert('x')</script> \"quoted\" text in a <div> here."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare):
    """Shakespeare with HTML-looking paragraphs mixed in, to check escaping."""
    blocks = shakespeare.read_text(encoding="utf-8")[:12000].split("\n\n")
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    path.write_text("\n\n".join(b + ("\n\n" + HTML_TEXT if i % 4 == 0 else "") for i, b in enumerate(blocks)))
    return path


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_llama_dir):
    torch.manual_seed(0)
    sae = build(make_config("relu", d_in=48, d_sae=40))
    with torch.no_grad():
        sae.b_enc.fill_(-0.02)  # random features that fire on a minority of tokens
    return save_sae(sae, tmp_path_factory.mktemp("sae"),
                    metadata={"hook_name": HOOK, "model_name": str(tiny_llama_dir), "context_size": CONTEXT})


def brute_force_latents(model_dir, sae_dir, corpus):
    """Plain loop over the same windows: run_with_hooks + sae.encode, non-stored positions zeroed."""
    loaded = load_model(str(model_dir))
    sae = load_sae(sae_dir)
    windows = pack_windows(iter_documents(str(corpus)), loaded.tokenizer, context_size=CONTEXT, n_tokens=TOKENS)
    rows = []
    with torch.no_grad():
        for w in range(len(windows.token_ids)):
            ids = torch.from_numpy(windows.token_ids[w : w + 1]).long()
            acts = run_with_hooks(loaded.model, ids, capture=[HOOK]).activations[HOOK][0]
            rows.append(sae.encode(acts) * torch.from_numpy(windows.keep[w])[:, None])
    return windows, torch.stack(rows)  # [W, T, F]


@pytest.fixture(scope="module")
def built(tmp_path_factory, local_ray, sae_dir, corpus):
    out = tmp_path_factory.mktemp("site")
    cfg = DashboardConfig(sae=str(sae_dir), corpus=str(corpus), n_tokens=TOKENS, out=str(out), top_k=K,
                          n_samples=8, workers=2, batch_size=4)
    result = build_dashboard(cfg)
    return result, json.loads((out / "features.json").read_text())


def test_top_contexts_are_the_brute_force_maxima(built, tiny_llama_dir, sae_dir, corpus):
    result, data = built
    windows, lat_WTF = brute_force_latents(tiny_llama_dir, sae_dir, corpus)
    W, T, F = lat_WTF.shape
    assert result.features == list(range(F)) and result.n_tokens == int(windows.keep.sum())
    flat = lat_WTF.reshape(W * T, F).numpy()
    checked = 0
    for row in data["features"]:
        f = row["feature"]
        col = flat[:, f]
        assert row["count"] == int((col > 0).sum())
        order = np.lexsort((np.arange(len(col)), -col))[:K]
        want = [(float(col[i]), int(i) // T, int(i) % T) for i in order if col[i] > 0]
        got = [tuple(x) for x in row["top"]]
        assert [(w, p) for _, w, p in got] == [(w, p) for _, w, p in want], f"feature {f}"
        np.testing.assert_allclose([a for a, _, _ in got], [a for a, _, _ in want], rtol=1e-5)
        checked += bool(want)
    assert checked > F // 2  # most features fired, so the comparison had content


def test_merge_of_split_states_equals_one_state(tiny_llama_dir, sae_dir, corpus):
    windows, lat_WTF = brute_force_latents(tiny_llama_dir, sae_dir, corpus)
    features = np.arange(lat_WTF.shape[2])
    ids = np.arange(len(windows.token_ids))

    def state(sel):
        return batch_states(lat_WTF[sel], windows.keep[sel], ids[sel], features, k=K, s=6, left=3, right=2)

    whole = state(ids)
    half = len(ids) // 2
    for parts in ([ids[:half], ids[half:]], [ids[::3], ids[1::3], ids[2::3]]):
        for merged in (merge([state(p) for p in parts]), merge([state(p) for p in parts][::-1])):
            for name in whole.__dataclass_fields__:
                np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name), err_msg=name)
    assert whole.count.sum() > 0 and np.isfinite(whole.sample_key).any()
    # The uniform sample is a sample of firing tokens, with their own activations.
    f, j = np.nonzero(np.isfinite(whole.sample_key))
    T = lat_WTF.shape[1]
    loc = whole.sample_loc[f, j]
    np.testing.assert_array_equal(whole.sample_act[f, j], lat_WTF[loc // T, loc % T, f].numpy())


def test_pages_are_escaped_and_complete(built):
    result, data = built
    out = result.out
    index = open(f"{out}/index.html", encoding="utf-8").read()
    assert index.count("<tr><td data-v=") == len(result.features)
    assert "http://" not in index and "https://" not in index and "<script src" not in index
    pages = [open(f"{out}/{row['page']}", encoding="utf-8").read() for row in data["features"]]
    assert all("<svg class=\"hist\"" in p or "never fired" in p for p in pages)
    # The corpus holds <b>, <script> and <div>: they must only ever appear escaped inside contexts.
    joined = "".join(pages)
    assert "&lt;" in joined
    tokens = [t for page in pages for t in re.findall(r'<span class="t[^"]*" style="[^"]*" title="[^"]*">(.*?)</span>', page)]
    assert len(tokens) == sum(page.count('<span class="t') for page in pages) > 0
    assert not [t for t in tokens if "<" in t or ">" in t or re.search(r"&(?!(lt|gt|amp|quot|#x27);)", t)]
    assert {"&lt;", "&gt;"} & set(tokens) or any("&lt;" in t for t in tokens)
    for page in pages:
        assert page.count("<script>") == 1  # ours; the corpus's <script> came out escaped
        assert 'class="t peak"' in page or "No activation found" in page


def test_logit_effects_follow_the_final_norm(tiny_llama_dir, tiny_gpt2_dir):
    llama = load_model(str(tiny_llama_dir)).model
    torch.manual_seed(1)
    with torch.no_grad():
        llama.model.norm.weight.uniform_(0.5, 2.0)
    d_FD = torch.randn(3, 48)
    # RMSNorm of a lone direction is that direction times weight / rms: the same ranking, a positive scale.
    real = llama.lm_head(llama.model.norm(d_FD))
    ours = logit_weights(llama, d_FD)
    ratio = real / ours
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    assert (ratio > 0).all()
    gpt2 = load_model(str(tiny_gpt2_dir)).model
    assert final_norm(gpt2) is gpt2.transformer.ln_f


def test_feature_specs_and_cli_errors(sae_dir, capsys):
    assert parse_features("0-3,7, 5-5") == [0, 1, 2, 3, 5, 7]
    assert main(["dashboard", str(sae_dir), "--tokens", "10", "--out", "x", "--features", "3-1"]) == 2
    assert main(["dashboard", str(sae_dir), "--tokens", "10", "--out", "x", "--features", "39,40"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["dashboard", str(sae_dir), "--tokens", "10", "--out", "x", "--hook", "blocks.9.hook_resid_post"]) == 2
    with pytest.raises(SystemExit):
        main(["dashboard", str(sae_dir), "--tokens", "10", "--out", "x", "--features", "1", "--top-density", "2"])


@pytest.mark.slow
def test_smollm2_dashboard_for_50_features(tmp_path, local_ray, smollm2_store):
    from sae_core.trainer import TrainConfig, Trainer

    hook = "blocks.6.hook_resid_post"
    acts = smollm2_store.read_hook(hook)
    sae = build(make_config("topk", d_in=576, d_sae=1152, k=32))  # a quick SAE: what matters here is the dashboard
    trainer = Trainer(sae, TrainConfig(steps=120, batch_size=512, lr=1e-3, log_every=60))
    batches = (acts[torch.randint(len(acts), (512,))] for _ in range(120))
    list(trainer.fit(batches))
    sae_dir = save_sae(sae, tmp_path / "sae", scaling_factor=trainer.scaling_factor,
                       metadata={"hook_name": hook, "model_name": "builtin:smollm2-135m-instruct", "context_size": 128})
    start = time.perf_counter()
    result = build_dashboard(DashboardConfig(sae=str(sae_dir), n_tokens=20_000, out=str(tmp_path / "site"),
                                             top_density=50, workers=2))
    seconds = time.perf_counter() - start
    print(f"SmolLM2 dashboard: 50 features over {result.n_tokens} tokens in {seconds:.1f} s")
    assert len(result.features) == 50
    data = json.loads((tmp_path / "site" / "features.json").read_text())
    assert all(row["count"] > 0 and row["top"] for row in data["features"])
