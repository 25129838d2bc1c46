"""Section 6 on the published traced graphs reproduces every published combined graph."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import pytest

from attncomm.core.node_ids import edge_table
from attncomm.core.unification import PUBLISHED_THRESHOLDS, filter_value, min_appearances, unify
from attncomm.io.graphml import read_graph, traced_graph_prompt


@pytest.fixture(scope="module")
def published_traced(published_gp_dir: Path) -> dict[int, nx.MultiDiGraph]:
    files = sorted((published_gp_dir / "traced_graphs").glob("*.graphml"))
    assert len(files) == 100
    return {traced_graph_prompt(f): read_graph(f) for f in files}


def test_threshold_floats() -> None:
    assert filter_value(0.3) == 0.30000000000000004
    assert filter_value(0.7) == 0.7000000000000001
    assert filter_value(0.6) == 0.6  # np.arange(0.1, 1.0, 0.1)[5], not 0.6000000000000001
    assert filter_value(0.05) == 0.05 and filter_value(0.33) == 0.33
    assert min_appearances(0.3, 15) == 5  # 4.500000000000001; the clean 0.3 * 15 = 4.5 would round to 4
    assert min_appearances(0.5, 99) == 50  # half to even: 49.5 -> 50
    assert min_appearances(0.05, 230) == 12  # 11.5 -> 12
    assert min_appearances(0.5, 39) == 20  # 19.5 -> 20
    assert min_appearances(0.01, 100) == 1


@pytest.mark.slow
def test_unify_reproduces_published_combined_graphs(
    published_traced: dict[int, nx.MultiDiGraph], published_gp_dir: Path
) -> None:
    out = unify(published_traced, PUBLISHED_THRESHOLDS)
    assert sorted(out) == [0.0, *PUBLISHED_THRESHOLDS]
    files = sorted((published_gp_dir / "combined_graphs").glob("*.graphml"))
    assert len(files) == len(out) == 12
    for path in files:
        th = float(path.stem.rsplit("_", 1)[1])
        ours, pub = out[th], read_graph(path)
        assert dict(ours.nodes(data="n_appearences")) == dict(pub.nodes(data="n_appearences")), path
        ea, eb = edge_table(ours), edge_table(pub)
        assert ea.keys() == eb.keys(), path
        for key, data in eb.items():
            assert ea[key]["prompts_appeared"] == data["prompts_appeared"], (path, key)
            assert math.isclose(ea[key]["weight"], data["weight"], rel_tol=1e-9), (path, key)
            assert ea[key]["type"] == data["type"]
        assert ours.number_of_edges() == pub.number_of_edges()


def test_unify_small_example() -> None:
    root = ("IO-S direction", "end")
    a, b, c = (9, 9, "end", "IO"), (5, 5, "S2", "S1+1"), (0, "MLP", "end", "end")
    g0 = nx.MultiDiGraph()
    g0.add_edge(a, root, weight=2.0, type="d")
    g0.add_edge(b, a, weight=1.0, type="d")
    g0.add_edge(b, a, weight=3.0, type="s")
    g7 = nx.MultiDiGraph()
    g7.add_edge(a, root, weight=4.0, type="d")
    g7.add_edge(c, a, weight=1.0, type="s")
    out = unify({7: g7, 0: g0}, [0.5, 0.6])
    full = out[0.0]
    assert dict(full.nodes(data="n_appearences")) == {a: 2, root: 2, b: 1, c: 1}
    table = edge_table(full)
    assert table[(a, root, "d")]["weight"] == 3.0 and table[(a, root, "d")]["prompts_appeared"] == [0, 7]
    assert table[(b, a, "s")]["weight"] == 1.5 and table[(b, a, "d")]["prompts_appeared"] == [0]
    assert table[(c, a, "s")]["prompts_appeared"] == [7]
    # 0.5 * 2 = 1: everything stays; 0.6 * 2 = 1.2 -> 1 as well
    assert out[0.5].number_of_edges() == 4 and out[0.6].number_of_nodes() == 4
    out = unify({0: g0, 7: g7}, [0.9])
    assert set(out[0.9].nodes) == {a, root}  # b and c need 2 appearances
    with pytest.raises(ValueError):
        unify({}, [0.1])
