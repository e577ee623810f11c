"""The model-agnostic part of attribution graphs (workflows/attribution.py) on affine maps with known answers."""

from __future__ import annotations

import pytest
import torch

from workflows.attribution import direct_effects, influence, keep_fraction, prune


def test_direct_effects_of_an_affine_map_are_its_weights_times_the_sources():
    torch.manual_seed(0)
    n_vec, D, n_sc, n_t = 3, 5, 4, 7
    M_vec = torch.randn(n_t, n_vec, D, dtype=torch.float64)
    M_sc = torch.randn(n_t, n_sc, dtype=torch.float64)
    c = torch.randn(n_t, dtype=torch.float64)

    def fn(src):
        return torch.einsum("tnd,bnd->bt", M_vec, src["vec"]) + src["sc"] @ M_sc.T + c

    sources = {
        "vec": torch.randn(n_vec, D, dtype=torch.float64),
        "sc": torch.randn(n_sc, dtype=torch.float64),
    }
    eff = direct_effects(fn, sources, batch=3)  # several batches, the last one short
    want = torch.cat([(M_vec * sources["vec"]).sum(-1), M_sc * sources["sc"]], dim=1)
    torch.testing.assert_close(eff.A, want)
    torch.testing.assert_close(eff.bias, c)
    torch.testing.assert_close(eff.A.sum(1) + eff.bias, eff.values)


def test_direct_effects_see_a_non_linearity():
    """Completeness is a real check: a map that is not affine in its sources breaks it."""
    sources = {"x": torch.tensor([1.0, 2.0])}
    eff = direct_effects(lambda s: (s["x"] ** 2).sum(-1, keepdim=True), sources)
    assert abs(float(eff.A.sum(1) + eff.bias - eff.values)) > 1.0


def chain_graph():
    """Nodes: 0 embedding, 1 and 2 features, 3 feature, 4 logit. Edges: 0->1 (1), 1->2 (2), 2->4 (3), 3->4 (1),
    0->3 (0.1). adj[i, j] is j -> i."""
    adj = torch.zeros(5, 5)
    adj[1, 0], adj[2, 1], adj[4, 2], adj[4, 3], adj[3, 0] = 1.0, 2.0, 3.0, -1.0, 0.1
    return adj


def test_influence_follows_every_path_with_normalised_weights():
    adj = chain_graph()
    w = torch.tensor([0, 0, 0, 0, 1.0])
    inf = influence(adj, w)
    # The logit's inputs: node 2 carries 3/4, node 3 1/4; node 2's input is all node 1; node 0 feeds both.
    torch.testing.assert_close(inf, torch.tensor([1.0, 0.75, 0.75, 0.25, 0.0]))


def test_prune_keeps_the_features_carrying_the_fraction():
    adj = chain_graph()
    w = torch.tensor([0, 0, 0, 0, 1.0])
    prunable = torch.tensor([False, True, True, True, False])
    pruned = prune(adj, w, prunable, node_fraction=0.6, edge_fraction=1.0)
    # Features 1 and 2 carry 0.75 each of 1.75 in all: the first alone is 43% < 60%, both 86%.
    assert pruned.node_mask.tolist() == [True, True, True, False, True]
    assert pruned.edge_mask[4, 2] and pruned.edge_mask[2, 1] and not pruned.edge_mask[4, 3]
    assert pruned.kept_feature_influence == pytest.approx(1.5 / 1.75)
    everything = prune(adj, w, prunable, node_fraction=1.0, edge_fraction=1.0)
    assert everything.node_mask.all() and int(everything.edge_mask.sum()) == 5


def test_keep_fraction():
    s = torch.tensor([0.1, 0.5, 0.4, 0.0])
    assert keep_fraction(s, 0.5).tolist() == [False, True, False, False]
    assert keep_fraction(s, 0.51).tolist() == [False, True, True, False]
    assert keep_fraction(s, 1.0).tolist() == [True, True, True, False]
    assert not keep_fraction(torch.zeros(3), 0.8).any()


def test_graph_modules_load_without_ray_or_mlflow():
    """The graph math and the replacement model are usable without the distributed stack."""
    import subprocess
    import sys

    code = (
        "import sys, workflows.attribution, workflows.replacement, workflows.circuit, workflows.circuit_check, "
        "workflows.graph_html; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
