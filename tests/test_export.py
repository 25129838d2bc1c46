"""Cytoscape JSON and HTML export of ACC graphs, the ``export`` stage, and the viewer in headless Chromium."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from pathlib import Path

import networkx as nx
import pytest

from attncomm.core.node_ids import edge_table, format_node_id
from attncomm.errors import MissingArtifactError
from attncomm.io.graphml import read_graph
from attncomm.runtime.config import AppConfig, ModelConfig, TaskConfig
from attncomm.runtime.registry import RunContext, get_stage
from attncomm.stages.export import run_export
from attncomm.viz.cytoscape import (
    cytoscape_to_graph,
    graph_to_html,
    layout_positions,
    node_data,
    node_label,
    write_cyjs,
    write_html,
)
from tests.browser import chromium_or_skip, dump_dom, screenshot
from tests.conftest import shared_path

PRUNED = ("combined_graphs_intervention", "gpt2-small_gp_n100_combined_0.2.graphml")
COMBINED = ("combined_graphs", "gpt2-small_gp_n100_combined_0.2.graphml")
ROOT = ("Correct - Incorrect pronoum", "end")


def _published(*parts: str) -> Path:
    return shared_path("reference", "published", "gpt2-small", "gp", *parts)


def _toy_graph() -> nx.MultiDiGraph:
    """A small hand-made graph with every component kind and hostile labels."""
    G = nx.MultiDiGraph()
    root = ("IO-S direction", "end")
    h = (2, 1, "end", "</script><b>x</b>")
    h2 = (1, 3, "S2", 'IO\'s "tok"')
    G.add_edge(h, root, weight=2.0, type="d")
    G.add_edge(h2, h, weight=0.5, type="d")
    G.add_edge(h2, h, weight=0.25, type="s")
    G.add_edge((1, "MLP", "end", "end"), h, weight=-0.1, type="d")
    G.add_edge((0, "AH bias", "S2", "S2"), h2, weight=0.05, type="s")
    G.add_edge((0, "Embedding", "S2", "S2"), h2, weight=1.5, type="d")
    return G


# ----------------------------------------------------------------------------- pure conversion


def test_node_data_and_labels() -> None:
    assert node_label((9, 6, "end", "IO")) == "9.6 end→IO"
    assert node_label((8, "MLP", "end", "end")) == "MLP 8 end"
    assert node_label(ROOT) == "Correct - Incorrect pronoum [end]"
    d = node_data((9, 6, "end", "IO"))
    assert d == {
        "id": "(9, 6, 'end', 'IO')",
        "label": "9.6 end→IO",
        "layer": 9,
        "component": 6,
        "kind": "head",
        "head": 6,
        "dest": "end",
        "src": "IO",
        "positions": ["end", "IO"],
    }
    assert node_data((0, "AH bias", "S2", "S2"))["component"] == "AH bias"
    root = node_data(ROOT)
    assert root["kind"] == "root" and root["layer"] is None and root["positions"] == ["end"]


def test_layout_root_on_top_layer_zero_at_bottom() -> None:
    G = read_graph(_published(*PRUNED))
    pos = layout_positions(G)
    root = next(n for n in G if len(n) == 2)
    ys = {n: y for n, (_, y) in pos.items()}
    assert ys[root] == min(ys.values())
    bottom = max(ys.values())
    assert all(n[0] == 0 for n, y in ys.items() if y == bottom)
    # every edge points up the page: upstream components sit below their downstream ones
    assert all(ys[u] > ys[v] for u, v in G.edges())
    # no two nodes share a position
    assert len(set(pos.values())) == len(pos)


def test_cytoscape_json_format_and_round_trip(tmp_path: Path) -> None:
    G = read_graph(_published(*PRUNED))
    path = write_cyjs(G, tmp_path / "g.cyjs", "pruned")
    cy = json.loads(path.read_text())
    nodes, edges = cy["elements"]["nodes"], cy["elements"]["edges"]
    assert (len(nodes), len(edges)) == (G.number_of_nodes(), G.number_of_edges())
    assert nodes[0]["data"]["id"] == format_node_id(ROOT)  # root first (top row)
    for node in nodes:
        assert {"id", "label", "layer", "component", "positions"} <= set(node["data"])
        assert set(node["position"]) == {"x", "y"}
    ids = {n["data"]["id"] for n in nodes}
    for edge in edges:
        data = edge["data"]
        assert data["source"] in ids and data["target"] in ids
        assert isinstance(data["weight"], float) and data["type"] in ("d", "s")
        assert data["n_prompts"] == len(data["prompts_appeared"])
        if data.get("logit_diff"):  # root edges of a pruned graph carry none
            diffs = data["logit_diff"]
            assert math.isclose(data["mean_logit_diff"], sum(diffs) / len(diffs))
    assert any("mean_logit_diff" in e["data"] for e in edges)
    back = cytoscape_to_graph(cy)
    assert set(back.nodes) == set(G.nodes)
    ours, pub = edge_table(back), edge_table(G)
    assert ours.keys() == pub.keys()
    for key, attrs in pub.items():
        assert ours[key]["weight"] == attrs["weight"]
        assert ours[key]["prompts_appeared"] == attrs["prompts_appeared"]


def test_html_is_self_contained() -> None:
    page = graph_to_html(_toy_graph(), "toy <graph>")
    assert "<title>toy &lt;graph&gt;</title>" in page
    assert not re.search(r"<(link|img|iframe)\b", page, re.I)
    assert not re.search(r"<script[^>]*\bsrc=", page, re.I)
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    # hostile labels cannot close the data <script>
    data = page.split('id="graph-data">', 1)[1].split("</script>", 1)[0]
    assert "</" not in data and "<b>" not in data
    assert cytoscape_to_graph(json.loads(data)).number_of_edges() == 6


# ----------------------------------------------------------------------------- headless browser


def _selftest(dom: str) -> dict[str, object]:
    match = re.search(r'<pre id="selftest"[^>]*>(.*?)</pre>', dom, re.S)
    assert match, "the viewer wrote no selftest report"
    return json.loads(html.unescape(match.group(1)))


def _js_errors(dom: str) -> str:
    match = re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert match, "the page has no js-errors box"
    return html.unescape(match.group(1)).strip()


@pytest.mark.browser
def test_viewer_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = chromium_or_skip()
    G = read_graph(_published(*PRUNED))
    page = write_html(G, tmp_path / "pruned.html", "gpt2-small gp pruned 0.2")
    dom, console = dump_dom(binary, page, "selftest")
    assert _js_errors(dom) == "" and not console, (_js_errors(dom), console)
    assert not re.search(r"<body[^>]*data-js-error", dom)
    assert f'data-rendered="{G.number_of_nodes()}"' in dom
    assert len(re.findall(r'<g class="node kind-', dom)) == G.number_of_nodes()
    assert len(re.findall(r'<path class="edge type-', dom)) == G.number_of_edges()
    report = _selftest(dom)
    assert report["tooltip_visible"] and report["highlighted"] == 1
    assert "layer:" in str(report["tooltip"]) and "head:" in str(report["tooltip"])
    weights = [abs(w) for _, _, w in G.edges(data="weight")]
    assert report["shown_at_half"] == sum(w >= max(weights) * 0.5 for w in weights)
    assert report["shown_at_zero"] == G.number_of_edges()
    assert math.isclose(float(report["zoom_ratio"]), 1.25)  # type: ignore[arg-type]

    png = screenshot(binary, page, tmp_path / "pruned.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


@pytest.mark.browser
def test_viewer_survives_hostile_labels(tmp_path: Path) -> None:
    binary = chromium_or_skip()
    G = _toy_graph()
    dom, console = dump_dom(binary, write_html(G, tmp_path / "toy.html", "toy"), "selftest")
    assert _js_errors(dom) == "" and not console
    assert len(re.findall(r'<g class="node kind-', dom)) == G.number_of_nodes() == 6
    assert "<b>x</b>" not in dom  # the label is text, not markup
    assert _selftest(dom)["shown_at_zero"] == 6


# ----------------------------------------------------------------------------- stage


def _cfg(**export: object) -> AppConfig:
    cfg = AppConfig(
        model=ModelConfig(name="gpt2-small", short_name="gpt2-small", family="gpt2"),
        task=TaskConfig(name="gp", n_prompts=100, seed=0),
    )
    for key, value in export.items():
        setattr(cfg.export, key, value)
    return cfg


def test_registered() -> None:
    spec = get_stage("export")
    assert not spec.needs_model and spec.produces == ("export",)


def test_export_stage(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = _cfg(thresholds=[0.2, 0.5])
    ctx = RunContext.for_tests(cfg, run_dir)
    arts = ctx.artifacts
    arts.pruned_graphs_dir.mkdir(parents=True)
    shutil.copy(_published(*PRUNED), arts.pruned_graph(0.2))
    arts.combined_graphs_dir.mkdir()
    shutil.copy(_published(*COMBINED), arts.combined_graph(0.2))
    arts.traced_graphs_dir.mkdir()
    for prompt in (3, 12):
        shutil.copy(
            _published("traced_graphs", f"gpt2-small_gp_n100_{prompt}_0.graphml"), arts.traced_graph(prompt)
        )
    shutil.copy(  # another seed's graph is not this run's
        _published("traced_graphs", "gpt2-small_gp_n100_5_0.graphml"),
        arts.traced_graphs_dir / "gpt2-small_gp_n100_5_1.graphml",
    )

    metrics = run_export(cfg, ctx)
    assert metrics == {
        "export/n_pruned_graphs": 1,
        "export/n_combined_graphs": 1,
        "export/n_traced_graphs": 2,
        "export/n_files": 8,
    }
    out = run_dir / "export"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "combined_graphs/gpt2-small_gp_n100_combined_0.2.cyjs",
        "combined_graphs/gpt2-small_gp_n100_combined_0.2.html",
        "pruned_graphs/gpt2-small_gp_n100_0.2.cyjs",
        "pruned_graphs/gpt2-small_gp_n100_0.2.html",
        "traced_graphs/gpt2-small_gp_n100_12_0.cyjs",
        "traced_graphs/gpt2-small_gp_n100_12_0.html",
        "traced_graphs/gpt2-small_gp_n100_3_0.cyjs",
        "traced_graphs/gpt2-small_gp_n100_3_0.html",
    ]
    cy = json.loads((out / "combined_graphs" / "gpt2-small_gp_n100_combined_0.2.cyjs").read_text())
    G = read_graph(arts.combined_graph(0.2))
    assert len(cy["elements"]["edges"]) == G.number_of_edges()
    assert '"export"' in (run_dir / "manifest.json").read_text()

    shutil.rmtree(out)
    metrics = run_export(_cfg(thresholds=[0.2], html=False), ctx)
    assert metrics["export/n_files"] == 4 and not list(out.rglob("*.html"))


def test_export_without_graphs_names_the_producer(tmp_path: Path) -> None:
    cfg = _cfg()
    with pytest.raises(MissingArtifactError) as err:
        run_export(cfg, RunContext.for_tests(cfg, tmp_path / "empty"))
    assert err.value.producer == "prune" and "stage=prune" in str(err.value)
