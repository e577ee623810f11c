"""Attribution graphs over any linear (affine) model: direct effects, influence, pruning. Model-agnostic:
it sees a function of named source tensors, never a transformer (workflows/replacement.py supplies one).

A *source* is a node writing into the model: a vector node (a token embedding, an error term: a row of
width D written as is) or a scalar node (a feature's activation, written times its decoder row). A
*target* is a node the model computes: a feature's pre-activation, a logit. Given
``fn(sources) -> targets``, affine in the sources once everything else (attention patterns, norm
denominators, inactive features) is frozen, the direct effect of source j on target i is

    A[i, j] = (d target_i / d source_j) . source_j        (a dot product for vector nodes)

and, by affinity, ``target_i = sum_j A[i, j] + bias_i`` with ``bias_i = fn(0)_i`` (the biases' share): the
completeness identity the tests check against the real model's values. Gradients come from backward
passes through ``fn`` on a batch of copies of the sources, one target per copy.

Pruning follows the influence of the chosen logits: with ``W = |A|`` normalised to unit row sums, a
node's influence is ``w (W + W^2 + ...)`` (``w``: the logits' weights), i.e. the share of the logits'
inputs that flows through it along all paths. The features carrying ``node_fraction`` of the total
influence are kept, then the edges carrying ``edge_fraction`` of the edge influence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

SourceFn = Callable[[dict[str, Tensor]], Tensor]
"""Batched sources (name -> [B, n, w] vector or [B, n] scalar nodes) -> targets [B, n_targets]."""


class Effects(NamedTuple):
    """What :func:`direct_effects` returns."""

    A: Tensor
    """[n_targets, n_sources] direct effects; sources ordered as the ``sources`` dict, nodes in row order."""
    bias: Tensor
    """[n_targets] the targets' values with every source zero (the biases' share)."""
    values: Tensor
    """[n_targets] the targets' values at the given sources (``A.sum(1) + bias`` when ``fn`` is affine)."""


def _contribution(grad: Tensor, value: Tensor) -> Tensor:
    """Per-node effect [B, n]: the gradient dotted with the node's value (vector nodes) or times it (scalars)."""
    return (grad * value).sum(-1) if value.dim() == grad.dim() and grad.dim() == 3 else grad * value


def direct_effects(fn: SourceFn, sources: dict[str, Tensor], *, batch: int = 32) -> Effects:
    """Direct effect of every source node on every target of ``fn`` (see the module docstring)."""
    with torch.no_grad():
        values = fn({k: v[None] for k, v in sources.items()})[0]
        bias = fn({k: torch.zeros_like(v)[None] for k, v in sources.items()})[0]
    n_targets = len(values)
    rows: list[Tensor] = []
    for start in range(0, n_targets, batch):
        idx = torch.arange(start, min(start + batch, n_targets))
        leaves = {
            k: v[None].repeat(len(idx), *([1] * v.dim())).requires_grad_(True) for k, v in sources.items()
        }
        out = fn(leaves)
        out[torch.arange(len(idx)), idx].sum().backward()
        rows.append(
            torch.cat(
                [_contribution(leaves[k].grad, sources[k][None]).reshape(len(idx), -1) for k in sources],
                dim=1,
            )
        )
    A = torch.cat(rows) if rows else values.new_zeros(0, sum(v.shape[0] for v in sources.values()))
    return Effects(A=A.detach(), bias=bias, values=values)


# -- influence and pruning ------------------------------------------------------------------------------
def normalized_abs(adj_NN: Tensor) -> Tensor:
    """|adj| with every non-zero row scaled to sum 1."""
    W = adj_NN.abs()
    return W / W.sum(1, keepdim=True).clamp_min(1e-30)


def influence(adj_NN: Tensor, weights_N: Tensor, max_depth: int | None = None) -> Tensor:
    """Total influence of every node on the weighted targets: ``weights (W + W^2 + ...)``. ``adj[i, j]`` is the
    edge j -> i; the graph must be acyclic (then the series ends after at most N terms)."""
    W = normalized_abs(adj_NN)
    x, total = weights_N.clone(), torch.zeros_like(weights_N)
    for _ in range(max_depth or len(weights_N)):
        x = x @ W
        if not bool(x.abs().sum() > 0):
            break
        total += x
    return total


def keep_fraction(scores: Tensor, fraction: float) -> Tensor:
    """Boolean mask of the fewest highest-scoring entries whose scores sum to ``fraction`` of the total."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    total = float(scores.sum())
    if total <= 0:
        return mask
    order = torch.argsort(scores, descending=True)
    cum = torch.cumsum(scores[order], 0)
    n = int(torch.searchsorted(cum, torch.tensor(fraction * total, dtype=cum.dtype) * (1 - 1e-9))) + 1
    mask[order[: min(n, len(scores))]] = True
    return mask


@dataclass
class Pruned:
    """A pruned graph: the nodes and edges kept, with the influence each carries."""

    node_mask: Tensor
    """[N] nodes kept."""
    edge_mask: Tensor
    """[N, N] edges kept (``[i, j]``: j -> i)."""
    node_influence: Tensor
    """[N] influence on the chosen logits (for logits: their weight)."""
    kept_feature_influence: float
    """Fraction of the features' total influence the kept features carry."""


def prune(
    adj_NN: Tensor,
    weights_N: Tensor,
    prunable_N: Tensor,
    *,
    node_fraction: float = 0.8,
    edge_fraction: float = 0.98,
) -> Pruned:
    """Keep the prunable nodes (features) carrying ``node_fraction`` of their influence and every other node,
    then the edges among them carrying ``edge_fraction`` of the edge influence; nodes left without an edge
    (other than the weighted targets) are dropped."""
    node_inf = influence(adj_NN, weights_N)
    scores = torch.where(weights_N > 0, weights_N, node_inf)
    kept = ~prunable_N
    feature_scores = torch.where(prunable_N, node_inf, 0.0)
    kept |= keep_fraction(feature_scores, node_fraction) & prunable_N
    W = normalized_abs(adj_NN) * kept[:, None] * kept[None, :]
    edge_scores = scores[:, None] * W
    flat = keep_fraction(edge_scores.flatten(), edge_fraction).view_as(W) & (W > 0)
    connected = flat.any(0) | flat.any(1) | (weights_N > 0)
    total = float(feature_scores.sum())
    carried = float(feature_scores[kept & prunable_N].sum()) / total if total > 0 else 0.0
    return Pruned(
        node_mask=kept & connected, edge_mask=flat, node_influence=scores, kept_feature_influence=carried
    )


def graph_json(nodes: list[dict[str, Any]], adj_NN: Tensor, pruned: Pruned, **meta: Any) -> dict[str, Any]:
    """The graph as JSON data: the kept nodes (with their influence) and edges (with their direct effect)."""
    keep = pruned.node_mask.nonzero().flatten().tolist()
    out_nodes = [{**nodes[i], "influence": float(pruned.node_influence[i])} for i in keep]
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [
        {"source": nodes[j]["id"], "target": nodes[i]["id"], "weight": float(adj_NN[i, j])}
        for i, j in zip(targets.tolist(), sources.tolist(), strict=True)
        if pruned.node_mask[i] and pruned.node_mask[j]
    ]
    return {"format": "sae-ray-attribution-graph", "version": 1, **meta, "nodes": out_nodes, "links": links}
