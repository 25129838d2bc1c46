"""The edge graph, circuit selection and pruning, MIB / EAP-IG JSON, faithfulness areas, ACC mapping,
and the CLI's bad-input errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

from attncomm.core.edge_graph import (
    EdgeGraph,
    EdgeGraphError,
    GraphShape,
    budget_edges,
    expand_nodes,
    nodes_of,
    prune,
    select,
    select_greedy,
    select_threshold,
    select_topn,
)
from attncomm.core.faithfulness import MIB_BUDGETS_PERCENT, curve_areas, normalized_faithfulness
from attncomm.io.graphml import read_graph, write_graph
from attncomm.io.mib_json import CircuitFileError, EdgeCircuit, from_mib_dict, read_mib_json, write_mib_json
from attncomm.methods.acc_edges import ROOT_SCORE, complete_untraced_slots, map_acc_graph
from attncomm.runtime.config import MIB_EDGE_BUDGETS

SMALL = GraphShape(n_layers=2, n_heads=2, parallel_attn=False, d_model=8)


def mask_of(graph: EdgeGraph, names: list[str]) -> torch.Tensor:
    out = graph.empty()
    for name in names:
        out[graph.edge_index(name)] = True
    return out


def names_of(graph: EdgeGraph, mask: torch.Tensor) -> set[str]:
    return {graph.edge_name(i, j) for i, j in torch.nonzero(mask & graph.real).tolist()}


def test_edge_counts_and_dataflow() -> None:
    assert EdgeGraph(GraphShape(12, 12, False, 768)).n_edges == 32491  # GPT-2 small, as MIB counts
    seq, par = EdgeGraph(SMALL), EdgeGraph(GraphShape(2, 2, True))
    # by hand: heads of layer l read 1 + 3l nodes (3 slots each), the MLP of layer l 3 + 3l (sequential)
    assert seq.n_edges == 2 * 3 * 1 + 2 * 3 * 4 + 3 + 6 + 7 == 46
    assert par.n_edges == 46 - 2 * 2  # the parallel MLPs do not read their own layer's two heads
    seq.edge_index("a0.h1->m0")
    with pytest.raises(EdgeGraphError, match="unknown edge"):
        par.edge_index("a0.h1->m0")
    par.edge_index("a0.h1->m1")
    for bad in ["a1.h0->a0.h1<q>", "a0.h0->a0.h1<q>", "input->a0.h1", "m1->m0", "logits->m1", "a0.h9->m1"]:
        with pytest.raises(EdgeGraphError):
            seq.edge_index(bad)
    assert len(seq.edge_names) == seq.n_edges == len(set(seq.edge_names))
    assert all(seq.edge_name(*seq.edge_index(n)) == n for n in seq.edge_names)
    assert seq.in_names[-1] == "logits" and seq.out_names[0] == "input"


def test_prune_removes_dangling_nodes() -> None:
    g = EdgeGraph(SMALL)
    path = ["input->a0.h0<q>", "a0.h0->a1.h1<k>", "a1.h1->logits"]
    dangling = ["a0.h1->a1.h0<v>", "input->m0"]  # a1.h0 and m0 never reach the logits
    no_input = ["a0.h1->logits"]  # a0.h1 has no incoming edge once a1.h0 is gone
    edges, nodes = prune(g, mask_of(g, path + dangling + no_input))
    assert names_of(g, edges) == set(path)
    assert {g.out_names[i] for i in torch.nonzero(nodes).flatten().tolist()} == {"input", "a0.h0", "a1.h1"}
    assert nodes_of(g, edges) == {"input", "a0.h0", "a1.h1", "logits"}


def test_known_circuit_ranks_first() -> None:
    g = EdgeGraph(SMALL)
    circuit = [
        "input->a0.h1<q>",
        "input->a0.h1<k>",
        "a0.h1->a1.h0<v>",
        "a1.h0->logits",
        "a0.h1->m1",
        "m1->logits",
    ]
    scores = torch.rand(g.n_forward, g.n_backward, generator=torch.Generator().manual_seed(0)) * 0.1
    scores = scores * torch.where(torch.rand(scores.shape) < 0.5, -1.0, 1.0)
    for k, name in enumerate(circuit):
        scores[g.edge_index(name)] = -(5.0 + k) if k % 2 else 5.0 + k  # large, both signs
    n = len(circuit)
    assert names_of(g, select_topn(g, scores, n)) == set(circuit)
    assert names_of(g, select_greedy(g, scores, n)) == set(circuit)
    assert names_of(g, select_threshold(g, scores, 4.0)) == set(circuit)
    assert names_of(g, prune(g, select_topn(g, scores, n))[0]) == set(circuit)
    # without absolute values only the positive half ranks first
    top_signed = names_of(g, select_topn(g, scores, 3, absolute=False))
    assert top_signed == {circuit[0], circuit[2], circuit[4]}
    # a high-scoring edge into a node the logits never read: topn takes it, greedy does not
    scores[g.edge_index("input->a1.h1<q>")] = 100.0
    assert "input->a1.h1<q>" in names_of(g, select_topn(g, scores, n))
    assert names_of(g, select_greedy(g, scores, n)) == set(circuit)
    # NaN scores are never selected
    nan = torch.full_like(scores, float("nan"))
    nan[g.edge_index("a1.h0->logits")] = 1.0
    assert names_of(g, select_topn(g, nan, 5)) == {"a1.h0->logits"}


def test_budgets() -> None:
    g = EdgeGraph(GraphShape(12, 12, False))
    assert [budget_edges(g, b) for b in (0.1, 1, 100)] == [32, 324, 32491]
    assert list(MIB_BUDGETS_PERCENT) == MIB_EDGE_BUDGETS
    for bad in (0, -1, 100.5):
        with pytest.raises(EdgeGraphError, match=r"outside \(0, 100\]"):
            budget_edges(g, bad)
    with pytest.raises(EdgeGraphError, match="unknown selection"):
        select(g, torch.zeros(g.n_forward, g.n_backward), "best", 1.0)


def test_expand_nodes() -> None:
    g = EdgeGraph(SMALL)
    edges = expand_nodes(g, {"a0.h1", "m1"})
    expected = {
        "input->a0.h1<q>",
        "input->a0.h1<k>",
        "input->a0.h1<v>",
        "input->m1",
        "a0.h1->m1",
        "input->logits",
        "a0.h1->logits",
        "m1->logits",
    }
    assert names_of(g, edges) == expected
    with pytest.raises(EdgeGraphError, match="unknown node"):
        expand_nodes(g, {"a5.h0"})


# ---- MIB / EAP-IG JSON ------------------------------------------------------------------------------


def test_mib_json_round_trip(tmp_path: Path) -> None:
    g = EdgeGraph(SMALL)
    scores = torch.randn(
        g.n_forward, g.n_backward, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    scores[g.edge_index("input->m0")] = float("nan")
    scores[~g.real] = float("nan")
    in_graph = mask_of(g, ["input->a0.h0<q>", "a0.h0->logits", "input->m0"])
    circuit = EdgeCircuit(g, scores, in_graph, {"a0.h0": 0.25}, {"method": "eap", "n_prompts": 3})
    path = write_mib_json(circuit, tmp_path / "c.json")
    raw = json.loads(path.read_text())
    assert raw["cfg"] == {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}
    assert len(raw["edges"]) == g.n_edges and raw["edges"]["input->m0"]["score"] is None
    assert raw["nodes"]["a0.h0"] == {"in_graph": True, "score": 0.25} and raw["nodes"]["logits"]["in_graph"]
    back = read_mib_json(path, expected=SMALL)
    assert torch.equal(back.in_graph, in_graph)
    assert torch.equal(torch.isnan(back.scores), torch.isnan(scores))
    assert torch.equal(back.scores[~torch.isnan(scores)], scores[~torch.isnan(scores)])  # bit for bit
    assert back.node_scores == {"a0.h0": 0.25} and back.meta == {"method": "eap", "n_prompts": 3}
    assert back.graph.shape == SMALL


def test_eap_ig_format_loads() -> None:
    """A file written the way EAP-IG's Graph.to_json writes it (older boolean nodes too)."""
    g = EdgeGraph(GraphShape(1, 1, True))
    data = {
        "cfg": {"n_layers": 1, "n_heads": 1, "parallel_attn_mlp": True, "d_model": 4, "extra": "ignored"},
        "nodes": {"input": True, "a0.h0": {"in_graph": True}, "m0": False, "logits": {"in_graph": True}},
        "edges": {
            "input->a0.h0<q>": {"score": 0.5, "in_graph": True},
            "input->a0.h0<k>": {"score": -0.25, "in_graph": False},
            "input->a0.h0<v>": {"score": 1.5, "in_graph": True},
            "input->m0": {"score": 0.0, "in_graph": False},
            "input->logits": {"score": 2.0, "in_graph": False},
            "a0.h0->logits": {"score": 3.0, "in_graph": True},
            "m0->logits": {"score": -1.0, "in_graph": False},
        },
    }
    c = from_mib_dict(data)
    assert c.graph.n_edges == 7 == len(data["edges"])
    assert names_of(g, c.in_graph) == {"input->a0.h0<q>", "input->a0.h0<v>", "a0.h0->logits"}
    assert float(c.scores[g.edge_index("input->a0.h0<k>")]) == -0.25
    assert float(c.scores[g.edge_index("m0->logits")]) == -1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["edges"].update({"a9.h0->logits": {"score": 1, "in_graph": True}}), "unknown edge"),
        (lambda d: d["cfg"].update({"n_heads": 3}), "this model has 2 layers x 2 heads"),
        (lambda d: d.pop("edges"), "needs the keys"),
        (lambda d: d["nodes"].update({"x7": True}), "unknown node"),
        (lambda d: d["edges"]["input->m0"].update({"score": "big"}), "not a number"),
    ],
)
def test_bad_circuit_files(change, message: str) -> None:
    g = EdgeGraph(SMALL)
    data = {
        "cfg": SMALL.to_cfg(),
        "nodes": {"input": {"in_graph": True}},
        "edges": {"input->m0": {"score": 1.0, "in_graph": True}},
    }
    change(data)
    with pytest.raises(CircuitFileError, match=message):
        from_mib_dict(data, "c.json", expected=g.shape)


# ---- faithfulness -----------------------------------------------------------------------------------


def test_curve_areas_by_hand() -> None:
    # x = 0.01, 0.1, 1; trapezoids: 0.09 * (0 + 0.5) / 2 + 0.9 * (0.5 + 1) / 2
    cpr, cmd = curve_areas([1, 10, 100], [0.0, 0.5, 1.0])
    assert math.isclose(cpr, 0.0225 + 0.675) and math.isclose(cmd, 0.0675 + 0.225)
    cpr, cmd = curve_areas(list(MIB_BUDGETS_PERCENT), [1.0] * 10)
    assert math.isclose(cpr, 0.999) and cmd == 0.0
    cpr_log, _ = curve_areas([1, 10, 100], [1.0, 1.0, 1.0], log_x=True)
    assert math.isclose(cpr_log, 2 * math.log(10))
    _, cmd = curve_areas([10, 100], [1.5, 1.5])  # overshooting counts as distance too
    assert math.isclose(cmd, 0.9 * 0.5)
    assert normalized_faithfulness(3.0, 5.0, 1.0) == 0.5 and math.isnan(normalized_faithfulness(1, 1, 1))
    with pytest.raises(ValueError, match="increase"):
        curve_areas([10, 1], [0, 1])


# ---- ACC mapping ------------------------------------------------------------------------------------


def small_acc_graph() -> nx.MultiDiGraph:
    """A traced-graph-shaped ACC graph whose edge-graph counterpart is known."""
    G = nx.MultiDiGraph()
    root = ("IO-S direction", "end")
    G.add_edge((1, 1, "end", "IO"), root, weight=0.9, type="d")  # seed head -> root
    G.add_edge((0, "MLP", "end", "end"), root, weight=0.2, type="d")  # MLP -> root
    G.add_edge((0, 0, "end", "S2"), (1, 1, "end", "IO"), weight=0.5, type="d", logit_diff=[-1.0, -2.0])
    G.add_edge((0, 1, "IO", "IO"), (1, 1, "end", "IO"), weight=0.4, type="s", logit_diff=[0.5])
    G.add_edge((0, 0, "IO", "S1"), (1, 1, "end", "IO"), weight=0.3, type="s", logit_diff=[3.0])  # merges
    G.add_edge((0, "Embedding", "end", "end"), (0, 0, "end", "S2"), weight=0.7, type="d")
    G.add_edge((0, "Embedding", "S2", "S2"), (0, 0, "end", "S2"), weight=0.6, type="s")
    G.add_edge((0, "AH bias", "end", "end"), (1, 1, "end", "IO"), weight=0.1, type="d")  # dropped
    return G


def test_acc_mapping(tmp_path: Path) -> None:
    g = EdgeGraph(SMALL)
    G = read_graph(write_graph(small_acc_graph(), tmp_path / "acc.graphml"))  # through the file format
    scores, edges, report = map_acc_graph(g, G)
    expected = {
        "a1.h1->logits": ROOT_SCORE,
        "m0->logits": ROOT_SCORE,
        "a0.h0->a1.h1<q>": 1.5,
        "a0.h1->a1.h1<k>": 0.5,
        "a0.h0->a1.h1<k>": 3.0,
        "input->a0.h0<q>": 0.7,
        "input->a0.h0<k>": 0.6,
    }
    assert names_of(g, edges) == set(expected)
    for name, value in expected.items():
        assert math.isclose(float(scores[g.edge_index(name)]), value), name
    assert report == {"mapped": 7, "dropped_bias": 1, "edges": 7}
    # untraced inputs (values, MLP inputs) completed from the circuit's earlier nodes
    completed = names_of(g, complete_untraced_slots(g, edges)) - set(expected)
    assert completed == {
        "input->a0.h0<v>",
        "input->a0.h1<v>",
        "input->a1.h1<v>",
        "a0.h0->a1.h1<v>",
        "a0.h1->a1.h1<v>",
        "m0->a1.h1<v>",
        "input->m0",
        "a0.h0->m0",
        "a0.h1->m0",
    }


# ---- CLI ------------------------------------------------------------------------------------------


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", f"paths.root={tmp_path / 'out'}", "logger.mode=disabled", *overrides]
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.cli
@pytest.mark.parametrize("case", ["other_shape", "unknown_edges", "budget", "ig_variant"])
def test_cli_bad_input(tmp_path: Path, case: str) -> None:
    circuit = tmp_path / "circuit.json"
    toy = GraphShape(3, 4, False, 64)  # toy-ioi
    if case == "other_shape":
        write_mib_json(EdgeCircuit(EdgeGraph(SMALL), torch.zeros(7, 15), EdgeGraph(SMALL).empty()), circuit)
        args, message = [f"evaluate.circuit={circuit}"], "this model has 3 layers x 4 heads"
    elif case == "unknown_edges":
        circuit.write_text(
            json.dumps(
                {"cfg": toy.to_cfg(), "nodes": {}, "edges": {"a7.h0->logits": {"score": 1, "in_graph": 1}}}
            )
        )
        args, message = [f"evaluate.circuit={circuit}"], "unknown edge name"
    elif case == "budget":
        args, message = ["evaluate.budgets=[0,10,100]"], r"budget 0.0 is outside (0, 100]"
    else:
        args, message = ["method.ig_variant=layers"], "method.ig_variant='layers' is not one of"
    stage = ["stage=discover", "method=eap-ig"] if case == "ig_variant" else ["stage=evaluate", "method=eap"]
    proc = _cli(tmp_path, *stage, "task.n_prompts=2", *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_discover_warns_when_pruning_empties_the_circuit(caplog: pytest.LogCaptureFixture) -> None:
    """Top-n edges that do not connect the input to the logits are all pruned: the stage says so and
    names the fixes instead of silently writing an empty circuit."""
    import logging

    from attncomm.runtime.config import AppConfig
    from attncomm.stages.discover import warn_if_pruned_away

    g = EdgeGraph(SMALL)
    scores = torch.zeros(g.n_forward, g.n_backward)
    for name in ("a0.h1->a1.h0<v>", "input->m0"):  # the two best edges never reach the logits
        i, j = g.edge_index(name)
        scores[i, j] = 5.0
    cfg = AppConfig()
    cfg.method.select, cfg.method.budget = "topn", 100 * 2 / g.n_edges + 1e-9
    kept = select(g, scores, "topn", cfg.method.budget)
    assert int(kept.sum()) == 0
    with caplog.at_level(logging.WARNING, logger="attncomm.stages.discover"):
        warn_if_pruned_away(g, scores, cfg, int(kept.sum()))
    assert "picked 2 of" in caplog.text and "method.select=greedy" in caplog.text
    caplog.clear()
    cfg.method.budget = 1e-6  # rounds to no edge at all
    with caplog.at_level(logging.WARNING, logger="attncomm.stages.discover"):
        warn_if_pruned_away(g, scores, cfg, 0)
    assert "selects no edge" in caplog.text
    caplog.clear()
    warn_if_pruned_away(g, scores, cfg, 3)  # a non-empty circuit: nothing to say
    assert caplog.text == ""
