"""Section 8: circuit components, precision/recall/F1, the published comparison CSV, and figures."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import pandas as pd
import pytest
import yaml

from attncomm.core.circuit_overlap import circuit_components, compare_with_literature, precision_recall_f1
from attncomm.core.node_ids import parse_node_id
from attncomm.core.pruning import prune
from attncomm.io.circuits_data import (
    NoReferenceCircuitError,
    available_methods,
    canonical_method,
    excluded_components,
    intervention_experiment_edges,
    literature_circuit,
    load_circuits_data,
)
from attncomm.io.graphml import read_graph
from attncomm.viz.plots import comparison_across_thresholds, comparison_bar_plot, save_figure

INTERVENTIONS = "interventions_graph_gpt2-small_gp_n100_0_combined_0.01.graphml"


@pytest.fixture(scope="module")
def pruned_gp_02(published_gp_dir: Path) -> nx.MultiDiGraph:
    return prune(read_graph(published_gp_dir / INTERVENTIONS), 0.2, 15)


def test_packaged_circuits_equal_reference(reference_dir: Path) -> None:
    reference = yaml.safe_load((reference_dir / "circuits.yaml").read_text())
    assert load_circuits_data() == reference
    assert load_circuits_data(reference_dir / "circuits.yaml") == reference


def test_circuit_lookups() -> None:
    data = load_circuits_data()
    assert canonical_method(data, "gpt2-small", "gp") == "ACDC"
    assert canonical_method(data, "pythia-160m", "ioi") == "EAP-IG"
    assert available_methods(data, "gpt2-small", "gp") == ["ACDC", "Edge Pruning"]
    assert excluded_components(data, "ioi", "Path Patching") == ["AH bias", "Embedding", "MLP"]
    acdc = literature_circuit(data, "gpt2-small", "gp", "ACDC")
    assert len(acdc) == 16 and (0, "MLP") in acdc and (10, 9) in acdc
    with pytest.raises(NoReferenceCircuitError):
        canonical_method(data, "gemma-2-2b", "gp")
    with pytest.raises(NoReferenceCircuitError):
        literature_circuit(data, "gpt2-small", "gp", "Nope")
    for up, down, _ in intervention_experiment_edges(data, "gpt2-small", "ioi"):
        parse_node_id(up), parse_node_id(down)


def test_circuit_components() -> None:
    G = nx.MultiDiGraph()
    root = ("IO-S direction", "end")
    for node in [
        (9, 9, "end", "IO"),
        (9, 9, "end", "S1"),
        (0, "MLP", "end", "end"),
        (3, "AH bias", "a", "a"),
    ]:
        G.add_edge(node, root, weight=1.0, type="d")
    G.add_edge((0, "Embedding", "a", "a"), (9, 9, "end", "IO"), weight=1.0, type="s")
    assert circuit_components(G) == {(9, 9), (0, "MLP")}


def test_precision_recall_f1_by_hand() -> None:
    ref = {(1, 1), (2, 2), (3, "MLP"), (4, 4)}
    ours = {(1, 1), (2, 2), (3, "MLP"), (5, 5), (6, "MLP")}
    got = precision_recall_f1(ref, ours, [])
    assert got["Precision"] == 3 / 5 and got["Recall"] == 3 / 4
    assert math.isclose(got["F1-Score"], 2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    got = precision_recall_f1(ref, ours, ["MLP", "AH bias"])  # MLPs dropped from both sides
    assert got["Precision"] == 2 / 3 and got["Recall"] == 2 / 3
    assert precision_recall_f1(ref, set(), [])["F1-Score"] == 0.0


def test_gp_against_acdc(pruned_gp_02: nx.MultiDiGraph) -> None:
    data = load_circuits_data()
    got = precision_recall_f1(
        literature_circuit(data, "gpt2-small", "gp", "ACDC"),
        circuit_components(pruned_gp_02),
        ["AH bias", "Embedding"],
    )
    assert (
        round(got["Precision"], 4) == 0.4138 and got["Recall"] == 0.75 and round(got["F1-Score"], 4) == 0.5333
    )


def test_reproduces_published_csv(pruned_gp_02: nx.MultiDiGraph, published_gp_dir: Path) -> None:
    published = pd.read_csv(published_gp_dir / "gpt2-small_gp_0.2.csv")
    ours = compare_with_literature(pruned_gp_02, "gpt2-small", "gp", load_circuits_data(), threshold=0.2)
    assert list(ours.columns) == list(published.columns) == ["Method B", "Metric", "Value", "Model", "Task"]
    assert len(ours) == len(published) == 6
    for (_, a), (_, b) in zip(ours.iterrows(), published.iterrows(), strict=True):
        assert (a["Method B"], a["Metric"], a["Model"], a["Task"]) == (
            b["Method B"],
            b["Metric"],
            b["Model"],
            b["Task"],
        )
        assert abs(a["Value"] - b["Value"]) <= 1e-12, (a, b)
    # written as CSV, it reads back as the published table
    assert pd.read_csv(pd.io.common.StringIO(ours.to_csv(index=False))).equals(published)


def test_methods_selection(pruned_gp_02: nx.MultiDiGraph) -> None:
    data = load_circuits_data()
    df = compare_with_literature(pruned_gp_02, "gpt2-small", "gp", data, methods=[], threshold=0.35)
    assert list(df["Method B"]) == ["Ours w/ th=0.35"] * 3
    df = compare_with_literature(pruned_gp_02, "gpt2-small", "ioi", data)
    assert list(dict.fromkeys(df["Method B"])) == ["ACDC", "EAP", "Ours w/ th=0.2"]
    with pytest.raises(NoReferenceCircuitError):
        compare_with_literature(pruned_gp_02, "gpt2-small", "gp", data, methods=["Nope"])


@pytest.mark.slow
def test_figures(pruned_gp_02: nx.MultiDiGraph, published_gp_dir: Path, tmp_path: Path) -> None:
    data = load_circuits_data()
    df = pd.read_csv(published_gp_dir / "gpt2-small_gp_0.2.csv")
    fig = comparison_bar_plot(df, reference="ACDC")
    assert len(fig.axes[0].patches) == 6
    paths = save_figure(fig, tmp_path / "figs" / "bars")
    assert [p.name for p in paths] == ["bars.png", "bars.pdf"] and all(p.stat().st_size > 0 for p in paths)
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and paths[1].read_bytes()[:4] == b"%PDF"
    by_th = {
        th: compare_with_literature(pruned_gp_02, "gpt2-small", "gp", data, threshold=th)
        for th in (0.1, 0.2, 0.3)
    }
    fig = comparison_across_thresholds(by_th)
    assert len(fig.axes) == 3
    save_figure(fig, tmp_path / "across")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["across.pdf", "across.png", "figs"]
    with pytest.raises(ValueError):
        comparison_across_thresholds({})
