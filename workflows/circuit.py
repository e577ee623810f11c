"""Circuit tracing with a transcoder set: the attribution graph of a prompt, and the checks that can fail.

The local replacement model of a prompt (workflows/replacement.py) freezes attention patterns and norm
denominators at their values on the prompt and replaces every covered MLP by its transcoder plus an error
node (true MLP output minus the transcoder's, a constant); an MLP the set does not cover, and every MLP
at BOS (transcoders are not trained there), is one error node. Nodes: token embeddings, active features
(layer, position, feature), error nodes, the chosen output logits. Edges: direct effects
(workflows/attribution.py). Logits are the raw logits of the last position.

Checks: ``completeness`` (the sum of direct effects into each node plus its bias share equals the *real*
model's value: a feature's pre-activation from the true MLP input, a logit from the Hugging Face forward)
and :func:`ablation_check` (zeroing the top features the graph names for a logit, in the model with the
transcoders spliced and live attention, moves the logit by about the sum of their direct effects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from workflows.attribution import Effects, direct_effects, graph_json, prune
from workflows.corpus import special_ids
from workflows.errors import UserError
from workflows.replacement import DecoderRunner, Trace


@dataclass
class Prompt:
    """A tokenized prompt: BOS first; ``keep`` marks the positions transcoders act on (not BOS/specials)."""

    ids_T: Tensor
    keep_T: Tensor
    tokens: list[str]


def tokenize(tokenizer: Any, text: str) -> Prompt:
    bos, _, _ = special_ids(tokenizer)
    ids = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    if len(ids) < 2:
        raise UserError("the prompt is empty: give --prompt some text")
    specials = set(getattr(tokenizer, "all_special_ids", [])) | {bos}
    ids_T = torch.tensor(ids)
    keep_T = torch.tensor([i > 0 and t not in specials for i, t in enumerate(ids)])
    return Prompt(ids_T, keep_T, [tokenizer.decode([t]) for t in ids])


@dataclass
class Features:
    """The active features of a prompt on its true MLP inputs, and each layer's error term."""

    layer_N: Tensor
    pos_N: Tensor
    feature_N: Tensor
    act_N: Tensor
    pre_N: Tensor
    """Pre-activations (from the true MLP input): the targets' true values."""
    error_LTD: Tensor


def transcoder_out(tc: Any, m_BTD: Tensor, acts_BTF: Tensor, keep_T: Tensor) -> Tensor:
    """What a transcoder writes: decoder rows times activations, plus b_dec and the skip path, at kept positions."""
    return (acts_BTF @ tc.W_dec + (tc.b_dec + tc.skip_term(m_BTD))) * keep_T[:, None].to(m_BTD.dtype)


@torch.no_grad()
def active_features(members: dict[int, Any], trace: Trace, keep_T: Tensor) -> Features:
    parts: list[tuple[Tensor, ...]] = []
    error = trace.mlp_out_LTD.clone()  # uncovered layers: the whole MLP output is the error
    for layer in sorted(members):
        tc, m = members[layer], trace.mlp_in_LTD[layer][None]
        pre = tc.pre_acts(m)[0]
        acts = tc.activation(pre) * keep_T[:, None]
        pos, feat = acts.nonzero(as_tuple=True)
        parts.append((torch.full_like(pos, layer), pos, feat, acts[pos, feat], pre[pos, feat]))
        error[layer] = trace.mlp_out_LTD[layer] - transcoder_out(tc, m, acts[None], keep_T)[0]
    cols = (
        [torch.cat(c) for c in zip(*parts, strict=True)] if parts else [torch.zeros(0, dtype=torch.long)] * 5
    )
    return Features(*cols[:3], act_N=cols[3].float(), pre_N=cols[4].float(), error_LTD=error)


def linear_fn(
    runner: DecoderRunner,
    members: dict[int, Any],
    trace: Trace,
    feats: Features,
    keep_T: Tensor,
    logit_ids: Tensor,
):
    """The local replacement model as a function of its sources: (embeddings [T, D], features [N],
    errors [L*T, D]) -> (every feature's pre-activation, the chosen logits at the last position)."""
    L, T, D = trace.mlp_in_LTD.shape

    def fn(src: dict[str, Tensor]) -> Tensor:
        B = src["embed"].shape[0]
        errors = src["error"].view(B, L, T, D)
        pres: list[Tensor] = []

        def mlp(layer: int, m: Tensor) -> Tensor:
            if layer not in members:
                return errors[:, layer]
            tc, sel = members[layer], feats.layer_N == layer
            pres.append(tc.pre_acts(m)[:, feats.pos_N[sel], feats.feature_N[sel]])
            acts = m.new_zeros(B, T, tc.cfg.d_sae)
            acts[:, feats.pos_N[sel], feats.feature_N[sel]] = src["feature"][:, sel]
            return transcoder_out(tc, m, acts, keep_T) + errors[:, layer]

        logits = runner.run(src["embed"], mlp=mlp, frozen=trace, last=True)[:, -1, logit_ids]
        return torch.cat([*pres, logits], dim=1)

    return fn


def graph_sources(runner: DecoderRunner, prompt: Prompt, feats: Features) -> dict[str, Tensor]:
    """The source nodes :func:`linear_fn` takes, at their values on the prompt."""
    return {
        "embed": runner.embed(prompt.ids_T)[0].detach(),
        "feature": feats.act_N,
        "error": feats.error_LTD.reshape(-1, feats.error_LTD.shape[-1]),
    }


def choose_logits(
    logits_V: Tensor, target: int | None, top: int, cover: float = 0.95
) -> tuple[Tensor, Tensor]:
    """(token ids, influence weights): the most likely next tokens (at most ``top``, until ``cover`` of the
    probability), weighted by probability; with ``target``, it is added and it alone carries the weight."""
    probs = torch.softmax(logits_V.float(), -1)
    order = torch.argsort(probs, descending=True)[:top]
    n = int(torch.searchsorted(torch.cumsum(probs[order], 0), torch.tensor(cover))) + 1
    ids = order[: min(n, top)]
    if target is not None and target not in ids.tolist():
        ids = torch.cat([ids, torch.tensor([target])])
    weights = probs[ids] / probs[ids].sum() if target is None else (ids == target).float()
    return ids, weights


@dataclass
class Attribution:
    """Everything :func:`attribute` computes; ``graph`` is the pruned JSON graph."""

    prompt: Prompt
    trace: Trace
    feats: Features
    logit_ids: Tensor
    effects: Effects
    nodes: list[dict[str, Any]]
    adj_NN: Tensor
    graph: dict[str, Any]
    completeness_error: float
    """Max |sum of direct effects + bias - the real model's value| over every feature and logit."""


def node_list(
    prompt: Prompt,
    feats: Features,
    trace: Trace,
    logit_ids: Tensor,
    tokenizer: Any,
    dashboards: dict[int, str],
) -> list[dict[str, Any]]:
    """Nodes in the adjacency's order: embeddings, features, errors (layer-major), logits."""
    T, L = len(prompt.ids_T), trace.mlp_in_LTD.shape[0]
    nodes = [
        {"id": f"E_{t}", "kind": "embedding", "layer": -1, "position": t, "token": prompt.tokens[t]}
        for t in range(T)
    ]
    for i in range(len(feats.act_N)):
        layer, t, f = int(feats.layer_N[i]), int(feats.pos_N[i]), int(feats.feature_N[i])
        node = {
            "id": f"F_{layer}_{t}_{f}",
            "kind": "feature",
            "layer": layer,
            "position": t,
            "feature": f,
            "activation": float(feats.act_N[i]),
        }
        if layer in dashboards:
            node["dashboard"] = f"{dashboards[layer]}/feature-{f:05d}.html"
        nodes.append(node)
    norms = feats.error_LTD.norm(dim=-1)
    nodes += [
        {
            "id": f"R_{layer}_{t}",
            "kind": "error",
            "layer": layer,
            "position": t,
            "activation": float(norms[layer, t]),
        }
        for layer in range(L)
        for t in range(T)
    ]
    probs = torch.softmax(trace.logits_TV[-1].float(), -1)
    nodes += [
        {
            "id": f"L_{int(v)}",
            "kind": "logit",
            "layer": L,
            "position": T - 1,
            "token": tokenizer.decode([int(v)]),
            "token_id": int(v),
            "probability": float(probs[v]),
            "activation": float(trace.logits_TV[-1, v]),
        }
        for v in logit_ids
    ]
    return nodes


def attribute(
    runner: DecoderRunner,
    tokenizer: Any,
    members: dict[int, Any],
    text: str,
    *,
    target: str | None = None,
    top_logits: int = 10,
    node_fraction: float = 0.8,
    edge_fraction: float = 0.98,
    batch: int = 32,
    dashboards: dict[int, str] | None = None,
) -> Attribution:
    """The attribution graph of ``text`` (see the module docstring); ``target`` is a next token to explain."""
    if not 0 < node_fraction <= 1 or not 0 < edge_fraction <= 1:
        raise UserError(f"node and edge fractions must be in (0, 1], got {node_fraction} and {edge_fraction}")
    prompt = tokenize(tokenizer, text)
    trace = runner.trace(prompt.ids_T)
    target_id = target_token(tokenizer, target) if target is not None else None
    logit_ids, weights = choose_logits(trace.logits_TV[-1], target_id, top_logits)
    feats = active_features(members, trace, prompt.keep_T)
    fn = linear_fn(runner, members, trace, feats, prompt.keep_T, logit_ids)
    effects = direct_effects(fn, graph_sources(runner, prompt, feats), batch=batch)
    real = torch.cat([feats.pre_N, trace.logits_TV[-1, logit_ids]])
    completeness = float((effects.A.sum(1) + effects.bias - real).abs().max()) if len(real) else 0.0
    adj, kinds = assemble(effects.A, prompt, feats, len(logit_ids), trace.mlp_in_LTD.shape[0])
    n = len(adj)
    w = torch.zeros(n)
    w[n - len(logit_ids) :] = weights
    pruned = prune(adj, w, kinds == 1, node_fraction=node_fraction, edge_fraction=edge_fraction)
    nodes = node_list(prompt, feats, trace, logit_ids, tokenizer, dashboards or {})
    for i, node in enumerate(nodes):
        if kinds[i] in (1, 3):  # targets: the biases' share of their value
            node["bias"] = float(
                effects.bias[target_row(i, len(prompt.ids_T), len(feats.act_N), n, len(logit_ids))]
            )
    graph = graph_json(
        nodes,
        adj,
        pruned,
        prompt=text,
        tokens=prompt.tokens,
        node_fraction=node_fraction,
        edge_fraction=edge_fraction,
        target=target,
        checks={
            "completeness_max_abs_error": completeness,
            "kept_feature_influence": pruned.kept_feature_influence,
        },
        counts={
            "features_active": len(feats.act_N),
            "nodes": int(pruned.node_mask.sum()),
            "links_before_pruning": int((adj != 0).sum()),
        },
    )
    return Attribution(prompt, trace, feats, logit_ids, effects, nodes, adj, graph, completeness)


def target_row(i: int, T: int, n_feat: int, n: int, n_logits: int) -> int:
    """The row of effects.A (features, then logits) of node ``i`` (a feature or a logit)."""
    return i - T if i < T + n_feat else n_feat + (i - (n - n_logits))


def assemble(
    A: Tensor, prompt: Prompt, feats: Features, n_logits: int, n_layers: int
) -> tuple[Tensor, Tensor]:
    """The square adjacency over all nodes (rows: targets, columns: sources; ``adj[i, j]`` is j -> i) and each
    node's kind: 0 embedding, 1 feature, 2 error, 3 logit. Sources and nodes share the order E, F, R."""
    T, F = len(prompt.ids_T), len(feats.act_N)
    n_src = T + F + n_layers * T
    n = n_src + n_logits
    adj = torch.zeros(n, n)
    adj[T : T + F, :n_src] = A[:F]
    adj[n_src:, :n_src] = A[F:]
    kinds = torch.tensor([0] * T + [1] * F + [2] * (n_layers * T) + [3] * n_logits)
    return adj, kinds


def target_token(tokenizer: Any, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(
            f"--target-token {token!r} is {len(ids)} tokens for this tokenizer; give one token "
            "(often with its leading space, e.g. ' Paris')"
        )
    return int(ids[0])


# -- checks on the model with the transcoders spliced ----------------------------------------------------
@torch.no_grad()
def spliced_logits(
    runner: DecoderRunner,
    members: dict[int, Any],
    att: Attribution,
    *,
    ablate: Tensor | None = None,
    with_errors: bool = True,
    frozen: bool = False,
) -> Tensor:
    """Last-position logits of the real model (live attention and norms) with every member spliced in at the
    kept positions, each feature recomputed from its (possibly changed) input; ``ablate`` (indices into the
    active features) are zeroed where they fired; ``with_errors`` adds each layer's error term back
    (so without ablation the logits are the real ones); ``frozen`` runs the local replacement model instead
    (the prompt's attention patterns and norm denominators, uncovered MLPs as their constant outputs).

    With errors, a member writes the true MLP output plus its own output's change from the prompt's
    (``mlp_out + tc(m) - tc(m_clean)``, equal to ``tc(m) + error``): on the clean prompt that is the true
    output bit for bit, so no feature whose pre-activation sits within rounding of its threshold flips (a
    JumpReLU flip writes threshold x decoder row, and 30 layers amplify it)."""
    feats, keep, trace = att.feats, att.prompt.keep_T, att.trace
    drop = torch.zeros(len(feats.act_N), dtype=torch.bool)
    if ablate is not None:
        drop[ablate] = True

    def write(tc: Any, m: Tensor, sel: Tensor) -> Tensor:
        acts = tc.activation(tc.pre_acts(m)) * keep[:, None]
        acts[:, feats.pos_N[sel], feats.feature_N[sel]] = 0.0
        return transcoder_out(tc, m, acts, keep)

    def mlp(layer: int, m: Tensor) -> Tensor:
        if layer not in members:
            return feats.error_LTD[layer] if frozen else runner.layers[layer].mlp(m)
        tc, sel = members[layer], drop & (feats.layer_N == layer)
        if not with_errors:
            return write(tc, m, sel) + runner.layers[layer].mlp(m) * ~keep[:, None]
        clean = write(tc, trace.mlp_in_LTD[layer][None], torch.zeros_like(sel))
        return trace.mlp_out_LTD[layer] + (write(tc, m, sel) - clean)

    return runner.run(runner.embed(att.prompt.ids_T), mlp=mlp, frozen=trace if frozen else None, last=True)[
        0, -1
    ]


@dataclass
class AblationResult:
    token: str
    features: list[str]
    predicted: float
    """Minus the sum of the ablated features' direct effects on the logit (the graph's one-step prediction)."""
    predicted_paths: float
    """The change along every path of the graph (downstream features respond linearly, attention and norms
    frozen): the linear replacement model's prediction."""
    measured: float
    """The logit's change in the spliced model with live attention, norms and downstream features."""
    measured_frozen: float
    """The logit's change in the local replacement model (attention and norms frozen, downstream features
    live through their activation function): equals ``predicted_paths`` unless a feature crosses its threshold."""


def ablation_check(
    runner: DecoderRunner, members: dict[int, Any], att: Attribution, *, k: int = 3, logit: int = 0
) -> AblationResult:
    """Zero the ``k`` features with the largest positive direct effect on the ``logit``-th chosen logit."""
    T, F = len(att.prompt.ids_T), len(att.feats.act_N)
    row = att.effects.A[F + logit, T : T + F]
    top = torch.argsort(row, descending=True)[:k]
    top = top[row[top] > 0]
    if len(top) == 0:
        raise UserError("no feature has a positive direct effect on that logit; nothing to ablate")
    token_id = int(att.logit_ids[logit])
    base = spliced_logits(runner, members, att)[token_id]
    ablated = spliced_logits(runner, members, att, ablate=top)[token_id]
    frozen_base = spliced_logits(runner, members, att, frozen=True)[token_id]
    frozen_ablated = spliced_logits(runner, members, att, ablate=top, frozen=True)[token_id]
    return AblationResult(
        token=att.nodes[len(att.nodes) - len(att.logit_ids) + logit]["token"],
        features=[att.nodes[T + int(i)]["id"] for i in top],
        predicted=-float(row[top].sum()),
        predicted_paths=path_effect(att, top, logit),
        measured=float(ablated - base),
        measured_frozen=float(frozen_ablated - frozen_base),
    )


def path_effect(att: Attribution, ablate: Tensor, logit: int) -> float:
    """The logit's change when the ``ablate`` features go to zero and every other active feature responds with
    slope 1 (it stays above its threshold): ``d = d0 + M d`` over features (``M``: feature -> feature
    Jacobian, the edges divided by the source's activation), then the logit row."""
    T, F = len(att.prompt.ids_T), len(att.feats.act_N)
    act = att.feats.act_N.double()
    J = att.effects.A[:, T : T + F].double() / act.clamp_min(1e-30)[None]
    M = J[:F].clone()
    M[ablate] = 0.0
    d0 = torch.zeros(F, dtype=torch.float64)
    d0[ablate] = -act[ablate]
    d = torch.linalg.solve(torch.eye(F, dtype=torch.float64) - M, d0)
    return float(J[F + logit] @ d)


@torch.no_grad()
def replacement_agreement(runner: DecoderRunner, members: dict[int, Any], att: Attribution) -> dict[str, Any]:
    """Does the replacement model (members spliced, no error terms) predict the real model's next token?"""
    real = att.trace.logits_TV[-1]
    repl = spliced_logits(runner, members, att, with_errors=False)
    return {
        "real_top": int(real.argmax()),
        "replacement_top": int(repl.argmax()),
        "agree": bool(real.argmax() == repl.argmax()),
    }
