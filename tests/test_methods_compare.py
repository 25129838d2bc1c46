"""Comparing circuits across methods: overlap by hand, the comparison figure's legend, and the stages
discover -> evaluate -> compare_methods -> gather_methods on toy-ioi (EAP and a hand-made ACC graph)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import pandas as pd
import pytest

from attncomm.core.edge_graph import EdgeGraph, GraphShape
from attncomm.core.edge_overlap import compare_circuits, overlap_scores
from attncomm.core.faithfulness import curve_areas
from attncomm.io.graphml import write_graph
from attncomm.io.mib_json import read_mib_json
from attncomm.methods.circuit_sources import edges_json, faithfulness_csv
from attncomm.runtime.config import AppConfig, ModelConfig, TaskConfig, package_path
from attncomm.runtime.registry import RunContext
from attncomm.viz.plots import comparison_bar_plot
from tests.models_fixtures import test_cache_dir


def test_overlap_by_hand() -> None:
    got = overlap_scores({"a", "b", "c", "d"}, {"a", "b", "e"})
    assert got["precision"] == 2 / 3 and got["recall"] == 2 / 4
    assert math.isclose(got["f1"], 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert overlap_scores(set(), set())["f1"] == 0.0
    g = EdgeGraph(GraphShape(2, 2, False))
    a = g.empty()
    b = g.empty()
    for name in ["input->a0.h0<q>", "a0.h0->logits", "input->m1", "m1->logits"]:
        a[g.edge_index(name)] = True
    for name in ["input->a0.h0<k>", "a0.h0->logits", "input->a1.h1<v>", "a1.h1->logits"]:
        b[g.edge_index(name)] = True
    result = compare_circuits(g, a, b)
    # nodes: A = {a0.h0, m1}, B = {a0.h0, a1.h1}; edges share only a0.h0->logits
    assert result["node"]["precision"] == 0.5 and result["node"]["recall"] == 0.5
    assert result["edge"]["precision"] == 0.25 and result["edge"]["recall"] == 0.25


def test_comparison_bar_legend_hides_nothing() -> None:
    """The legend sits outside the axes (it used to cover a bar label at 1.00 and cut off "F1-Score")."""
    df = pd.DataFrame(
        {
            "Method B": ["Ours w/ th=0.2"] * 3,
            "Metric": ["Precision", "Recall", "F1-Score"],
            "Value": [0.5, 1.0, 2 / 3],
            "Model": "toy-ioi",
            "Task": "ioi",
        }
    )
    fig = comparison_bar_plot(df, reference="Toy reference")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    ax = fig.axes[0]
    assert not legend.overlaps(ax.get_window_extent(renderer))
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["Precision", "Recall", "F1-Score"]
    figure_box = fig.bbox
    assert figure_box.x0 <= legend.x0 and legend.x1 <= figure_box.x1  # not cut off
    for label in ax.texts:  # every bar label inside the axes
        box = label.get_window_extent(renderer)
        assert ax.get_window_extent(renderer).contains(box.x0, box.y1 - 1)


def _cfg(run_dir: Path) -> AppConfig:
    cfg = AppConfig(
        model=ModelConfig(
            name="toy-ioi", short_name="toy-ioi", family="gpt2", path=package_path("toys/toy-ioi")
        ),
        task=TaskConfig(name="ioi", n_prompts=4, seed=0, batch_size=4),
    )
    cfg.paths.cache_dir = str(test_cache_dir())
    cfg.paths.root = str(run_dir.parent)
    cfg.evaluate.budgets = [10.0, 50.0, 100.0]
    cfg.method.budget = 20.0
    return cfg


def _acc_graph() -> nx.MultiDiGraph:
    G = nx.MultiDiGraph()
    root = ("IO-S direction", "end")
    G.add_edge((2, 1, "end", "IO"), root, weight=0.9, type="d")
    G.add_edge(
        (1, 3, "end", "S2"), (2, 1, "end", "IO"), weight=0.5, type="d", logit_diff=[-1.0], n_appearences=3
    )
    G.add_edge((0, "Embedding", "S2", "S2"), (1, 3, "end", "S2"), weight=0.6, type="s", logit_diff=[0.5])
    G.add_edge((0, "Embedding", "end", "end"), (1, 3, "end", "S2"), weight=0.2, type="d", logit_diff=[0.25])
    return G


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_stages_on_toy_ioi(tmp_path: Path) -> None:
    from attncomm.stages.compare_methods import run_compare_methods
    from attncomm.stages.discover import run_discover
    from attncomm.stages.evaluate import run_evaluate
    from attncomm.stages.gather_methods import run_gather_methods

    run_dir = tmp_path / "out" / "run"
    cfg = _cfg(run_dir)
    ctx = RunContext.for_tests(cfg, run_dir)
    run_discover(cfg, ctx)
    circuit = read_mib_json(edges_json(run_dir, "eap", "toy-ioi", "ioi"), expected=GraphShape(3, 4, False))
    assert circuit.graph.n_edges == 262 and circuit.meta["method"] == "eap"
    assert 0 < circuit.n_edges <= int(0.2 * 262)
    metrics = run_evaluate(cfg, ctx)
    table = pd.read_csv(faithfulness_csv(run_dir, "eap", "toy-ioi", "ioi"))
    keys = table["circuit"] + "@" + table["budget_percent"].astype(str)
    faith = dict(zip(keys, table["faithfulness"], strict=True))
    assert faith["clean@100.0"] == 1.0 and faith["empty@0.0"] == 0.0
    assert abs(faith["budget@100.0"] - 1.0) < 1e-5  # every edge kept: the clean model
    curve = table[table["circuit"] == "budget"]
    cpr, cmd = curve_areas(list(curve["budget_percent"]), list(curve["faithfulness"]))
    assert math.isclose(metrics["evaluate/cpr"], cpr) and math.isclose(metrics["evaluate/cmd"], cmd)
    assert math.isclose(float(table.loc[table["circuit"] == "CPR", "faithfulness"].iloc[0]), cpr)

    # ACC: a hand-made pruned graph in the run directory, mapped and evaluated like the others
    write_graph(_acc_graph(), ctx.artifacts.pruned_graph(cfg.compare.threshold))
    cfg.method.name = "acc"
    acc_ctx = RunContext.for_tests(cfg, run_dir)
    run_discover(cfg, acc_ctx)
    assert "model" not in vars(acc_ctx)  # the graph's shape came from config.json, no weights loaded
    acc = read_mib_json(edges_json(run_dir, "acc", "toy-ioi", "ioi"))
    g = acc.graph
    in_graph = {g.edge_name(i, j) for i, j in (acc.in_graph & g.real).nonzero().tolist()}
    assert in_graph == {"a2.h1->logits", "a1.h3->a2.h1<q>", "input->a1.h3<k>", "input->a1.h3<q>"}
    cfg.evaluate.acc_untraced = "ablate"  # the mapped edges exactly
    run_evaluate(cfg, ctx)
    rows = pd.read_csv(faithfulness_csv(run_dir, "acc", "toy-ioi", "ioi")).set_index("circuit")
    assert rows.loc["acc circuit", "n_edges"] == 4
    cfg.evaluate.acc_untraced = "complete"  # + values of a1.h3 and a2.h1 from input and a1.h3
    cfg.overwrite = True  # the faithfulness CSV of acc_untraced=ablate is replaced
    run_evaluate(cfg, ctx)
    cfg.overwrite = False
    rows = pd.read_csv(faithfulness_csv(run_dir, "acc", "toy-ioi", "ioi")).set_index("circuit")
    assert rows.loc["acc circuit", "n_edges"] == 4 + 3

    cfg.compare_methods.methods = ["eap", "acc"]
    run_compare_methods(cfg, ctx)
    pairs = pd.read_csv(run_dir / "circuits" / "compare_toy-ioi_ioi.csv")
    assert set(zip(pairs["A"], pairs["B"], strict=True)) == {
        ("literature:Toy reference", "eap"),
        ("literature:Toy reference", "acc"),
        ("eap", "acc"),
    }
    summary = pd.read_csv(run_dir / "circuits" / "summary_toy-ioi_ioi.csv")
    assert list(summary["circuit"]) == ["literature:Toy reference", "eap", "acc"]
    assert summary.loc[summary["circuit"] == "acc", "n_nodes"].iloc[0] == 2  # a1.h3, a2.h1
    assert (ctx.artifacts.figures_dir / "methods_toy-ioi_ioi.png").is_file()

    cfg.gather_methods.root = str(tmp_path / "out")
    run_gather_methods(cfg, ctx)
    gathered = pd.read_csv(tmp_path / "out" / "methods_summary" / "methods_cpr_cmd.csv")
    assert list(gathered["method"]) == ["acc", "eap"]
    assert math.isclose(float(gathered.loc[gathered["method"] == "eap", "cpr"].iloc[0]), cpr)


def test_gather_skips_a_run_whose_evaluate_did_not_finish(tmp_path: Path) -> None:
    """A faithfulness CSV whose ``evaluate`` record is still in progress (a killed run) is not gathered."""
    from attncomm.io.provenance import IN_PROGRESS, RECORDS_DIR
    from attncomm.stages.gather_methods import gather_faithfulness

    table = pd.DataFrame(
        {
            "circuit": ["CPR", "CMD"],
            "faithfulness": [0.5, 0.5],
            "method": ["eap", "eap"],
            "model": ["m", "m"],
            "task": ["t", "t"],
        }
    )
    for run, in_progress in (("done", False), ("killed", True)):
        folder = tmp_path / run / "circuits" / "eap"
        folder.mkdir(parents=True)
        table.to_csv(folder / "m_t_faithfulness.csv", index=False)
        record = tmp_path / run / RECORDS_DIR / "evaluate-eap.json"
        record.parent.mkdir()
        record.write_text(json.dumps({"task.name": "t", **({IN_PROGRESS: True} if in_progress else {})}))
    gathered = gather_faithfulness(tmp_path)
    assert list(gathered["run_dir"]) == [str(tmp_path / "done")]
