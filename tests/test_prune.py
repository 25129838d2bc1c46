"""Section 7 pruning on the published intervention graph and the published pruned graphs."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import pytest

from attncomm.core.node_ids import edge_table, root_of
from attncomm.core.pruning import ROOT_ABS_AVG_LOGIT_DIFF, prune, prune_thresholds
from attncomm.io.graphml import read_graph

PRUNED = "combined_graphs_intervention/gpt2-small_gp_n100_combined_{}.graphml"


@pytest.fixture(scope="module")
def intervention_graph(published_gp_dir: Path) -> nx.MultiDiGraph:
    return read_graph(published_gp_dir / "interventions_graph_gpt2-small_gp_n100_0_combined_0.01.graphml")


def test_prune_thresholds() -> None:
    ths = prune_thresholds(0.05)
    assert len(ths) == 21 and ths[0] == 0.0 and ths[-1] == 1.0
    assert ths[3] == 0.15 and ths[7] == 0.35 and ths[19] == 0.95
    assert prune_thresholds(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        prune_thresholds(0.3)


def test_prune_intervention_graph_at_02(intervention_graph: nx.MultiDiGraph) -> None:
    G = prune(intervention_graph, 0.2, 15)
    assert G.number_of_nodes() == 66 and G.number_of_edges() == 70
    root = root_of(G)
    assert nx.is_weakly_connected(G)
    for _, v, data in G.edges(data=True):
        if v == root:
            assert data["abs_avg_logit_diff"] == ROOT_ABS_AVG_LOGIT_DIFF
        else:
            mean = sum(data["logit_diff"]) / len(data["logit_diff"])
            assert len(data["prompts_appeared"]) >= 15 and abs(mean) >= 0.2
            assert math.isclose(data["abs_avg_logit_diff"], abs(mean), rel_tol=1e-12)
    # every edge into the root of the intervention graph survives
    assert G.in_degree(root) == intervention_graph.in_degree(root)
    # the input graph is untouched
    assert intervention_graph.number_of_edges() == 1737


def test_norm_weight_sums_to_one(intervention_graph: nx.MultiDiGraph) -> None:
    G = prune(intervention_graph, 0.1, 15)
    sums: dict[tuple, float] = {}
    for _, v, data in G.edges(data=True):
        sums[(v, data["type"])] = sums.get((v, data["type"]), 0.0) + data["norm_weight"]
    assert all(math.isclose(s, 1.0, rel_tol=1e-12) for s in sums.values())


@pytest.mark.slow
def test_prune_intervention_graph_vs_published(
    intervention_graph: nx.MultiDiGraph, published_gp_dir: Path
) -> None:
    """The published pruned graphs came from a slightly different intervention run: their edge sets
    equal ours at 0.0 and from 0.25 on; weight and prompt sets always agree where edges agree."""
    for th in prune_thresholds(0.05):
        ours = edge_table(prune(intervention_graph, th, 15))
        pub = edge_table(read_graph(published_gp_dir / PRUNED.format(th)))
        if th == 0.0 or th >= 0.25:
            assert ours.keys() == pub.keys(), th
        for key in ours.keys() & pub.keys():
            assert ours[key]["weight"] == pub[key]["weight"]
            assert ours[key]["prompts_appeared"] == pub[key]["prompts_appeared"]


def test_prune_reproduces_published_pruned_graphs(published_gp_dir: Path) -> None:
    """Pruning the published 0.0 graph (which carries that run's logit_diff) gives every published
    pruned graph exactly: nodes, edges, norm_weight and abs_avg_logit_diff."""
    base = read_graph(published_gp_dir / PRUNED.format(0.0))
    for th in prune_thresholds(0.05):
        ours = prune(base, th, 15)
        pub = read_graph(published_gp_dir / PRUNED.format(th))
        assert set(ours.nodes) == set(pub.nodes), th
        ea, eb = edge_table(ours), edge_table(pub)
        assert ea.keys() == eb.keys(), th
        for key, data in eb.items():
            for name in ("weight", "prompts_appeared", "norm_weight", "abs_avg_logit_diff"):
                expected, got = data[name], ea[key][name]
                if isinstance(expected, float):
                    assert math.isclose(got, expected, rel_tol=1e-12), (th, key, name)
                else:
                    assert got == expected, (th, key, name)


def test_prune_small_example() -> None:
    root = ("IO-S direction", "end")
    a, b, c, d = (9, 9, "end", "IO"), (5, 5, "S2", "S1+1"), (2, 2, "S1+1", "S1"), (1, "MLP", "x", "x")
    G = nx.MultiDiGraph()
    G.add_edge(a, root, weight=1.0, type="d", prompts_appeared=[0])
    G.add_edge(b, a, weight=1.0, type="d", prompts_appeared=[0, 1, 2], logit_diff=[-0.5, -0.3, -0.4])
    G.add_edge(c, a, weight=3.0, type="d", prompts_appeared=[0, 1, 2], logit_diff=[0.5, -0.5, 0.1])
    G.add_edge(d, c, weight=1.0, type="s", prompts_appeared=[0, 1, 2], logit_diff=[1.0, 1.0, 1.0])
    G.add_edge(d, b, weight=1.0, type="s", prompts_appeared=[0, 1], logit_diff=[1.0, 1.0])
    P = prune(G, 0.3, 3)
    # c -> a fails |mean| (0.033); d -> c survives the rule but its component loses the root;
    # d -> b fails n_min
    assert set(P.nodes) == {a, b, root}
    assert P.edges[b, a, 0]["norm_weight"] == 1.0
    assert math.isclose(P.edges[b, a, 0]["abs_avg_logit_diff"], 0.4)
    P0 = prune(G, 0.0, 2)
    assert P0.number_of_edges() == 5
    assert math.isclose(P0.edges[c, a, 0]["norm_weight"], 0.75)
