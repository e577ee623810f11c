"""Auto-interp: scoring math, example selection against brute force, the local judge against plain
transformers, the OpenAI-compatible client against a real local HTTP server, and (slow) the control on the
built-in SmolLM2 with likelihood scoring, as benchmarks/autointerp_control.py runs it."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from sae_core.registry import build, make_config
from workflows.autointerp import (
    AutoInterpConfig,
    TokenStrings,
    choose_latents,
    format_report,
    hook_batches,
    run_autointerp,
    scan,
)
from workflows.autointerp_likelihood import token_lifts
from workflows.autointerp_prompts import marked_tokens, render
from workflows.autointerp_stats import auroc, balanced_accuracy, bootstrap_ci, difference_ci
from workflows.corpus import iter_documents, pack_windows
from workflows.errors import UserError
from workflows.hooks import run_with_hooks
from workflows.judges import LocalJudge, OpenAIJudge, option_scores
from workflows.models import load_model

HOOK = "blocks.1.hook_resid_post"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


# -- scoring math ---------------------------------------------------------------------------------
def test_auroc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=15).astype(float)  # many ties
        labels = rng.random(15) < 0.5
        if labels.all() or not labels.any():
            continue
        pos, neg = scores[labels], scores[~labels]
        pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
        assert auroc(scores, labels) == pytest.approx(pairs)
    assert auroc(np.array([3.0, 2, 1, 0]), np.array([1, 1, 0, 0])) == 1.0
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_balanced_accuracy_and_bootstrap_intervals():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    scores = np.array([5, 4, -1, -2, -3, -4, -5, -6, -7, 3.0])
    # TPR 2/3 (the -1 missed), TNR 6/7 (the 3 said yes).
    assert balanced_accuracy(scores, labels, 0.0) == pytest.approx((2 / 3 + 6 / 7) / 2)
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.6, 0.1, 10), rng.normal(0.6, 0.1, 400)
    lo_s, hi_s = bootstrap_ci(small, 1000, 0)
    lo_l, hi_l = bootstrap_ci(large, 1000, 0)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # ~ 1/sqrt(n)
    lo, hi = difference_ci(large + 0.2, large, 1000, 0)
    assert 0.17 < lo < 0.2 < hi < 0.23
    lo, hi = difference_ci(rng.normal(0.5, 0.1, 30), rng.normal(0.5, 0.1, 30), 1000, 0)
    assert lo < 0 < hi


def test_render_marks_runs_and_keeps_spaces_outside():
    tokens = ["The", " New", " York", " times", ",", " again"]
    assert render(tokens, {1, 2}) == "The <<New York>> times, again"
    assert render(tokens, {0, 5}) == "<<The>> New York times, <<again>>"
    assert render(tokens) == "The New York times, again"
    assert render(["a", " ", "b"], {1}) == "a<< >>b"  # a whitespace token stays visible inside its marks
    assert marked_tokens(["<<dog>> and <<cat>>", "a <<cat>>", "<< >>"]) == ["cat", "dog"]


def test_option_scores_floor_for_unlisted_options():
    top = [
        {"token": " Yes", "logprob": -0.5},
        {"token": "No", "logprob": -1.5},
        {"token": "x", "logprob": -4.0},
    ]
    assert option_scores(top, ["Yes", "No", "Maybe"]) == [-0.5, -1.5, -5.0]


# -- a tiny model with a chat template, and a real OpenAI-compatible server on it -------------------
@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("chat_llama")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    loaded = load_model(str(folder))
    loaded.tokenizer.chat_template = TEMPLATE
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(chat_model_dir):
    return load_model(str(chat_model_dir))


class ChatServer(BaseHTTPRequestHandler):
    """POST /v1/chat/completions as OpenAI answers it, on a transformers model (greedy; logprobs of the
    first generated token with ``top_logprobs`` alternatives). Written from the API, not from our client."""

    loaded = None
    seen: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatServer.seen.append((self.path, self.headers.get("Authorization"), body))
        if self.path != "/v1/chat/completions" or body.get("model") != "tiny":
            self.send_error(404, "no such model or route")
            return
        tok, model = self.loaded.tokenizer, self.loaded.model
        text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=body.get("max_tokens", 16),
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id,
            )
        new = out.sequences[0, ids.shape[1] :].tolist()
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)},
        }
        if body.get("logprobs"):
            lp = torch.log_softmax(out.logits[0][0].float(), -1)
            top = lp.topk(int(body.get("top_logprobs", 0)))
            choice["logprobs"] = {
                "content": [
                    {
                        "token": tok.decode([new[0]]),
                        "logprob": float(lp[new[0]]),
                        "top_logprobs": [
                            {"token": tok.decode([i]), "logprob": float(v)}
                            for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                        ],
                    }
                ]
            }
        data = json.dumps({"object": "chat.completion", "model": "tiny", "choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server(loaded):
    ChatServer.loaded = loaded
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


CHATS = [
    [
        {"role": "system", "content": "Answer Yes or No."},
        {"role": "user", "content": f"Feature: animals\nText: {t}"},
    ]
    for t in ["the dog barked", "the meeting at noon", "a cat sat on the mat", "prices went up"]
]


def test_local_judge_equals_plain_forward_and_generate(loaded):
    judge = LocalJudge(loaded.model, loaded.tokenizer, batch_size=3)  # batches of 3 and 1: uneven on purpose
    tok = loaded.tokenizer
    options = [tok.decode([i]) for i in (40, 41, 42)]
    got = judge.option_logprobs(CHATS, options)
    texts = judge.generate(CHATS, 8)
    for chat, row, text in zip(CHATS, got, texts, strict=True):
        ids = torch.tensor(
            [
                tok(
                    tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False,
                ).input_ids
            ]
        )
        with torch.no_grad():
            lp = torch.log_softmax(loaded.model(input_ids=ids).logits[0, -1].float(), -1)
            ref = loaded.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert row == pytest.approx(lp[[40, 41, 42]].numpy(), abs=1e-4)
        assert text == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)


def test_continuation_logprobs_equal_a_plain_forward(loaded):
    judge = LocalJudge(loaded.model, loaded.tokenizer, batch_size=2)  # batches of 2 and 1, uneven lengths
    prefix = [5, 17, 33, 2, 9]
    texts = [[40, 41, 42, 43], [7], [100, 3, 8]]
    got = judge.continuation_logprobs(prefix, texts)
    for text, row in zip(texts, got, strict=True):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([prefix + text])).logits[0].float()
        logp = torch.log_softmax(logits, -1)[len(prefix) - 1 : -1]
        want = logp[torch.arange(len(text)), torch.tensor(text)]
        assert row == pytest.approx(want.numpy(), abs=1e-4)
    with pytest.raises(UserError, match="likelihood scoring"):
        token_lifts(OpenAIJudge("http://127.0.0.1:9/v1", "tiny"), ["x"], [[[1, 2]]])


def test_openai_client_against_a_local_server(loaded, server, monkeypatch):
    local = LocalJudge(loaded.model, loaded.tokenizer)
    remote = OpenAIJudge(server, "tiny", api_key="secret", concurrency=2)
    assert remote.generate(CHATS, 6) == local.generate(CHATS, 6)
    assert ChatServer.seen[-1][:2] == ("/v1/chat/completions", "Bearer secret")
    # Options: the two tokens the model ranks highest for the first chat, and the one it ranks lowest
    # (outside the 20 the server returns), among tokens that encode back to themselves.
    tok = loaded.tokenizer
    ids = torch.tensor([local.encode(CHATS[0])])
    with torch.no_grad():
        order = torch.argsort(loaded.model(input_ids=ids).logits[0, -1], descending=True).tolist()
    clean = [
        i
        for i in order
        if tok(tok.decode([i]), add_special_tokens=False).input_ids == [i]
        and tok.decode([i]).strip()
        and i not in tok.all_special_ids
    ]
    options = [tok.decode([i]) for i in (clean[0], clean[1], clean[-1])]
    want, got = local.option_logprobs(CHATS[:1], options), remote.option_logprobs(CHATS[:1], options)
    assert got[0, :2] == pytest.approx(want[0, :2], abs=1e-4)
    assert (
        got[0, 2] < got[0, :2].min() and want[0, 2] < got[0, :2].min()
    )  # unlisted: the floor, below those listed
    with pytest.raises(UserError, match="HTTP 404"):
        OpenAIJudge(server, "other").generate(CHATS[:1], 2)
    with pytest.raises(UserError, match="cannot reach"):
        OpenAIJudge("http://127.0.0.1:9/v1", "tiny", timeout=2).generate(CHATS[:1], 2)
    with pytest.raises(UserError, match="http"):
        OpenAIJudge("localhost:8000", "tiny")


# -- examples against brute force -----------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(loaded, shakespeare):
    torch.manual_seed(0)
    sae = build(make_config("relu", d_in=48, d_sae=64)).eval()
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
    windows = pack_windows(iter_documents(str(shakespeare)), loaded.tokenizer, context_size=32, n_tokens=3000)
    return sae, windows


def test_examples_are_top_held_out_and_clean_negatives(loaded, setup):
    sae, windows = setup
    cfg = AutoInterpConfig(n_latents=6, n_explain_top=4, n_explain_quantile=2, n_positives=4,
                           n_negatives=4, top_k=8, n_samples=16, left=4, right=1, max_density=0.5)
    features = np.arange(64)
    tracked, proj = scan(
        hook_batches(loaded.model, HOOK, windows, 8), sae.encode, features, cfg, torch.randn(48, 3)
    )
    chosen = choose_latents(tracked, windows, cfg, np.random.default_rng(0), TokenStrings(loaded.tokenizer))
    assert len(chosen) == 6 and proj.shape == (*windows.token_ids.shape, 3)
    with torch.no_grad():
        acts = run_with_hooks(
            loaded.model, torch.from_numpy(windows.token_ids).long(), capture=[HOOK]
        ).activations[HOOK]
        lat_WTF = (sae.encode(acts) * torch.from_numpy(windows.keep)[..., None]).numpy()
    T, span = windows.token_ids.shape[1], cfg.left + cfg.right
    for lx in chosen:
        col = lat_WTF[..., lx.latent]
        assert lx.density == pytest.approx((col > 0).sum() / windows.keep.sum())
        top_acts = np.sort(col.ravel())[::-1][: cfg.n_explain_top]
        assert [e.act for e in lx.explain[: cfg.n_explain_top]] == pytest.approx(top_acts, rel=1e-3)
        for e in lx.explain + lx.positives:  # the shown activations are the brute-force ones
            assert e.acts[e.peak] == pytest.approx(col[e.window, e.position], rel=1e-2, abs=1e-3)
        for p in lx.positives:
            assert col[p.window, p.position] > 0
            assert all(
                not (p.window == e.window and abs(p.position - e.position) <= span) for e in lx.explain
            )
        for n in lx.negatives:
            lo, hi = n.position - n.peak, n.position - n.peak + len(n.tokens)
            assert (col[n.window, lo:hi] == 0).all() and windows.keep[n.window, lo:hi].all()
    again = choose_latents(tracked, windows, cfg, np.random.default_rng(0), TokenStrings(loaded.tokenizer))
    assert [(c.latent, [p.position for p in c.positives]) for c in again] == [
        (c.latent, [p.position for p in c.positives]) for c in chosen
    ]
    assert all(T > n.position for c in chosen for n in c.negatives)


def test_pipeline_through_the_endpoint(loaded, setup, server):
    sae, windows = setup
    judge = OpenAIJudge(server, "tiny", concurrency=2)
    cfg = AutoInterpConfig(n_latents=3, n_explain_top=3, n_explain_quantile=1, n_positives=3, n_negatives=3,
                           top_k=6, n_samples=12, left=4, right=1, max_new_tokens=6, n_bootstrap=200,
                           max_density=0.5, positive_quantile=0.0)  # 12 samples: any firing token is a positive
    report = run_autointerp(
        sae, loaded.model, loaded.tokenizer, HOOK, windows, explainer=judge, scorer=judge, cfg=cfg
    )
    m = report.metrics
    assert m["n_latents"] == 3 and m["control_n_latents"] == 3 and len(report.control) == 3
    for key in ("score", "detection_auroc", "margin_score"):
        assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"]
    row = report.latents[0]
    assert len(row["detection_scores"]) == 6 and sum(row["detection_labels"]) == 3 and row["shown"]
    assert "margin" in format_report(m)
    with pytest.raises(UserError, match="n_positives"):
        AutoInterpConfig(n_samples=4)
    with pytest.raises(UserError, match="scoring must be one of"):
        AutoInterpConfig(scoring="surprise")


def test_bench_metric_and_flags(loaded, setup, server):
    import argparse

    from workflows import bench
    from workflows.autointerp import add_autointerp_flags, autointerp_options

    parser = argparse.ArgumentParser()
    add_autointerp_flags(parser)
    args = parser.parse_args(["--explainer-url", server, "--explainer-model", "tiny", "--n-latents", "2"])
    options = autointerp_options(args)
    assert options == {"explainer_url": server, "explainer_model": "tiny", "n_latents": 2}
    assert autointerp_options(parser.parse_args(["--scoring", "questions"])) == {"scoring": "questions"}
    sae, windows = setup
    small = {
        "n_explain_top": 3,
        "n_explain_quantile": 1,
        "n_positives": 3,
        "n_negatives": 3,
        "top_k": 6,
        "n_samples": 12,
        "left": 4,
        "right": 1,
        "max_new_tokens": 4,
        "n_bootstrap": 100,
        "max_density": 0.5,
        "positive_quantile": 0.0,
        "control": False,
    }
    ctx = bench.BenchContext(
        sae=sae,
        sae_dir=None,
        loaded=loaded,
        hook=HOOK,
        windows=windows,
        seed=3,
        options={"autointerp": {**options, **small}},
    )
    result = bench.get_metric("autointerp")(ctx)
    assert result.metrics["n_latents"] == 2 and "margin_score" not in result.metrics
    assert result.metrics["scoring_likelihood"] == 1.0  # the local scorer: likelihood by default
    assert json.loads(json.dumps(result.details))["config"]["seed"] == 3
    assert any(body["model"] == "tiny" and "logprobs" not in body for _, _, body in ChatServer.seen)
    ctx.options = {"autointerp": {"n_latent": 2}}
    with pytest.raises(UserError, match="unknown autointerp option"):
        bench.get_metric("autointerp")(ctx)

