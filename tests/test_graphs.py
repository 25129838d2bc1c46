"""Node-id parsing and GraphML round trips, on every published gpt2-small gp graph."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx
import pytest

from attncomm.core.node_ids import GraphFormatError, NodeIdError, format_node_id, parse_node_id, root_of
from attncomm.io.graphml import GRAPHML_NS, read_graph, traced_graph_prompt, write_graph

NS = {"g": GRAPHML_NS}


def _published_graphs(published_gp_dir: Path) -> list[Path]:
    files = sorted(published_gp_dir.rglob("*.graphml"))
    assert len(files) == 100 + 12 + 1 + 21, f"unexpected published graph count {len(files)}"
    return files


def _raw_ids(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    graph = ET.parse(path).getroot().find("g:graph", NS)
    nodes = [n.get("id") for n in graph.findall("g:node", NS)]
    edges = [(e.get("source"), e.get("target")) for e in graph.findall("g:edge", NS)]
    return nodes, edges


def _raw_edge_data(path: Path) -> list[dict[str, str]]:
    """Edge data by attribute name, as strings, straight from the XML (independent of read_graph)."""
    root = ET.parse(path).getroot()
    names = {k.get("id"): k.get("attr.name") for k in root.findall("g:key", NS)}
    rows = []
    for e in root.find("g:graph", NS).findall("g:edge", NS):
        rows.append(
            {names[d.get("key")]: d.text for d in e.findall("g:data", NS) if names[d.get("key")] != "id"}
        )
    return rows


@pytest.mark.parametrize(
    "text, expected",
    [
        ("(9, 6, 'end', 'IO')", (9, 6, "end", "IO")),
        ("(0, 'MLP', 'end', 'end')", (0, "MLP", "end", "end")),
        ("(4, 'AH bias', 'noun', 'noun')", (4, "AH bias", "noun", "noun")),
        ("(0, 'Embedding', 'is', 'is')", (0, "Embedding", "is", "is")),
        ("('IO-S direction', 'end')", ("IO-S direction", "end")),
        ("('Correct - Incorrect pronoum', 'end')", ("Correct - Incorrect pronoum", "end")),
        ("(3, 2, 'S1+1', \"it's (1)\")", (3, 2, "S1+1", "it's (1)")),
    ],
)
def test_parse_and_format_node_id(text: str, expected: tuple) -> None:
    node = parse_node_id(text)
    assert node == expected and all(type(a) is type(b) for a, b in zip(node, expected, strict=True))
    assert parse_node_id(format_node_id(node)) == node


def test_format_node_id_plain_ints() -> None:
    np = pytest.importorskip("numpy")
    assert format_node_id((np.int64(9), np.int64(6), "end", "IO")) == "(9, 6, 'end', 'IO')"
    assert format_node_id((np.int32(0), "MLP", "end", "end")) == "(0, 'MLP', 'end', 'end')"
    assert format_node_id(("IO-S direction", "end")) == "('IO-S direction', 'end')"


@pytest.mark.parametrize(
    "bad",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "(1, 2)",
        "(1, 'Foo', 'a', 'b')",
        "(1.5, 2, 'a', 'b')",
        "(True, 2, 'a', 'b')",
        "(1, 2, 'a')",
        "(1, 2, 'a', 3)",
        "(-1, 2, 'a', 'b')",
        "[1, 2, 'a', 'b']",
        "(1, 2, 'a', 'b', 'c')",
        "('root',)",
        "(1, 2, 'a', 'b'",
        "(x, 2, 'a', 'b')",
        "('a', 1)",
        "",
    ],
)
def test_parse_node_id_refuses(bad: str) -> None:
    with pytest.raises(NodeIdError) as err:
        parse_node_id(bad, where="some/file.graphml")
    assert "some/file.graphml" in str(err.value) and repr(bad) in str(err.value)


def test_traced_graph_prompt() -> None:
    assert traced_graph_prompt("x/gpt2-small_gp_n100_37_0.graphml") == 37
    assert traced_graph_prompt("pythia-160m_ioi_n256_5_3.graphml") == 5
    with pytest.raises(GraphFormatError):
        traced_graph_prompt("gpt2-small_gp_n100_combined_0.2.graphml")


@pytest.mark.slow
def test_every_published_graph_round_trips(published_gp_dir: Path, tmp_path: Path) -> None:
    for path in _published_graphs(published_gp_dir):
        G = read_graph(path)
        raw_nodes, raw_edges = _raw_ids(path)
        # node ids parse to tuples whose repr is the published string, in file order
        assert [format_node_id(n) for n in G.nodes] == raw_nodes, path
        assert sorted((format_node_id(u), format_node_id(v)) for u, v in G.edges()) == sorted(raw_edges), path
        root_of(G)
        for _, _, data in G.edges(data=True):
            assert isinstance(data["weight"], float) and data["type"] in ("d", "s")
            if "prompts_appeared" in data:
                assert all(type(p) is int for p in data["prompts_appeared"])
            if "logit_diff" in data:
                assert all(type(x) is float for x in data["logit_diff"])
        for _, count in G.nodes(data="n_appearences"):
            assert count is None or type(count) is int
        # typed values equal the raw strings' parse
        for (_, _, data), raw in zip(G.edges(data=True), _raw_edge_data(path), strict=True):
            assert data["weight"] == float(raw["weight"]) and data["type"] == raw["type"]
            if "prompts_appeared" in raw:
                assert data["prompts_appeared"] == [
                    int(x) for x in raw["prompts_appeared"].strip("[]").split(",")
                ]
            if "logit_diff" in raw:
                assert data["logit_diff"] == [float(x) for x in raw["logit_diff"].strip("[]").split(",")]

        out = tmp_path / path.name
        write_graph(G, out)
        H = read_graph(out)
        # written sorted (bytes independent of insertion order), same nodes, edges and attributes
        assert sorted(H.nodes(data=True), key=str) == sorted(G.nodes(data=True), key=str), path
        assert sorted(H.edges(keys=True, data=True), key=str) == sorted(
            G.edges(keys=True, data=True), key=str
        ), path
        out_nodes, out_edges = _raw_ids(out)
        assert out_nodes == sorted(raw_nodes) and sorted(out_edges) == sorted(raw_edges), path
        assert out_edges == sorted(out_edges), path
        # the prompt list strings are written exactly as published
        by_edge_in = sorted(zip(raw_edges, _raw_edge_data(path), strict=True), key=str)
        by_edge_out = sorted(zip(out_edges, _raw_edge_data(out), strict=True), key=str)
        for (e_in, raw_in), (e_out, raw_out) in zip(by_edge_in, by_edge_out, strict=True):
            assert e_in == e_out
            if "prompts_appeared" in raw_in:
                assert raw_out["prompts_appeared"] == raw_in["prompts_appeared"]
    assert not list(tmp_path.glob(".*.tmp")), "temp files left behind"


def test_written_file_is_plain_graphml(published_gp_dir: Path, tmp_path: Path) -> None:
    src = published_gp_dir / "interventions_graph_gpt2-small_gp_n100_0_combined_0.01.graphml"
    G = read_graph(src)
    write_graph(G, tmp_path / "g.graphml")
    N = nx.read_graphml(tmp_path / "g.graphml", force_multigraph=True)
    assert N.number_of_nodes() == G.number_of_nodes() and N.number_of_edges() == G.number_of_edges()
    assert set(N.nodes) == {format_node_id(n) for n in G.nodes}


def test_write_formats_numpy_values(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    G = nx.MultiDiGraph()
    root = ("IO-S direction", "end")
    G.add_node((np.int64(9), np.int64(6), "end", "IO"), n_appearences=np.int64(3))
    G.add_node(root, n_appearences=3)
    G.add_edge((9, 6, "end", "IO"), root, weight=np.float32(0.5), type="d", prompts_appeared=[np.int64(0), 2])
    write_graph(G, tmp_path / "g.graphml")
    text = (tmp_path / "g.graphml").read_text()
    assert "np." not in text and "[0, 2]" in text and "(9, 6, 'end', 'IO')" in text
    H = read_graph(tmp_path / "g.graphml")
    assert list(H.edges(data=True)) == [
        ((9, 6, "end", "IO"), root, {"weight": 0.5, "type": "d", "prompts_appeared": [0, 2]})
    ]
    assert H.nodes[(9, 6, "end", "IO")]["n_appearences"] == 3


def _graphml(nodes: str, edges: str, keys: str | None = None) -> str:
    keys = keys or (
        '<key id="d0" for="edge" attr.name="weight" attr.type="double"/>'
        '<key id="d1" for="edge" attr.name="type" attr.type="string"/>'
        '<key id="d2" for="edge" attr.name="prompts_appeared" attr.type="string"/>'
    )
    return (
        f'<graphml xmlns="{GRAPHML_NS}">{keys}<graph edgedefault="directed">{nodes}{edges}</graph></graphml>'
    )


GOOD_NODES = "<node id=\"(1, 2, 'end', 'IO')\"/><node id=\"('IO-S direction', 'end')\"/>"
EDGE = "<edge source=\"(1, 2, 'end', 'IO')\" target=\"('IO-S direction', 'end')\">{}</edge>"


@pytest.mark.parametrize(
    "nodes, edges, needle",
    [
        ("<node id=\"__import__('os')\"/>", "", "__import__('os')"),
        ("<node id=\"(1, 'Foo', 'a', 'b')\"/>", "", "(1, 'Foo', 'a', 'b')"),
        (GOOD_NODES, EDGE.format('<data key="d1">d</data>'), "'weight'"),
        (GOOD_NODES, EDGE.format('<data key="d0">0.5</data>'), "'type'"),
        (GOOD_NODES, EDGE.format('<data key="d0">abc</data><data key="d1">d</data>'), "'weight'"),
        (GOOD_NODES, EDGE.format('<data key="d0">1</data><data key="d1">q</data>'), "type"),
        (
            GOOD_NODES,
            EDGE.format('<data key="d0">1</data><data key="d1">d</data><data key="d2">[0, x]</data>'),
            "'prompts_appeared'",
        ),
        (
            GOOD_NODES,
            "<edge source=\"(1, 2, 'end', 'IO')\" target=\"(5, 5, 'a', 'b')\"/>",
            "(5, 5, 'a', 'b')",
        ),
    ],
)
def test_read_graph_errors_name_file_and_element(tmp_path: Path, nodes: str, edges: str, needle: str) -> None:
    path = tmp_path / "bad.graphml"
    path.write_text(_graphml(nodes, edges))
    with pytest.raises((GraphFormatError, NodeIdError)) as err:
        read_graph(path)
    msg = str(err.value)
    assert str(path) in msg and needle in msg, msg


def test_read_graph_edge_error_names_the_edge(tmp_path: Path) -> None:
    path = tmp_path / "bad.graphml"
    path.write_text(_graphml(GOOD_NODES, EDGE.format('<data key="d0">0.5</data>')))
    with pytest.raises(GraphFormatError, match=r"<edge source=.*\(1, 2, 'end', 'IO'\)"):
        read_graph(path)


def test_read_graph_not_xml(tmp_path: Path) -> None:
    path = tmp_path / "bad.graphml"
    path.write_text("not xml <")
    with pytest.raises(GraphFormatError, match="bad.graphml"):
        read_graph(path)


def test_root_of_requires_one_root() -> None:
    G = nx.MultiDiGraph()
    G.add_node((1, 2, "a", "b"))
    with pytest.raises(GraphFormatError):
        root_of(G)
    G.add_node(("IO-S direction", "end"))
    assert root_of(G) == ("IO-S direction", "end")
