"""The trace stage's fast writers give the bytes of straightforward reference writers built here.

GraphML: :func:`graph_to_xml` and :func:`edge_list_to_xml` build the document as strings; the
reference builds the same element tree with ElementTree (``ET.indent`` then ``ET.tostring``) from the
graph, so escaping (XML specials, quotes, CR/LF/TAB in attributes, control characters, lone
surrogates, unicode, empty and very long values) is ElementTree's own. HDF5: part and merged files
written through h5py's low-level API against the same files written with ``create_dataset`` /
``attrs`` / ``Group.copy``.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import h5py
import networkx as nx
import numpy as np
import pytest

from attncomm.core.edge_list import EdgeList
from attncomm.core.node_ids import format_node_id
from attncomm.io.graphml import GRAPHML_NS, edge_list_to_xml, graph_to_xml, read_graph, write_graph
from attncomm.io.results import STATUSES, FiringRecord, PromptRecord, build_results, dataset_name, write_part

# ----------------------------------------------------------------------------- GraphML reference


def _typed(value: Any) -> tuple[str, str]:
    """GraphML type and text of an attribute value (the published rules, for the values used here)."""
    if isinstance(value, bool):
        return "boolean", "true" if value else "false"
    if isinstance(value, int | np.integer):
        return "long", repr(int(value))
    if isinstance(value, float | np.floating):
        return "double", repr(float(value))
    if isinstance(value, list):
        return "string", "[" + ", ".join(repr(v) for v in value) + "]"
    return "string", value


def et_reference(G: nx.DiGraph) -> bytes:
    """ElementTree serialization of ``G``: keys in first-seen order (nodes, then edges), nodes sorted by
    id, edges by (source, target, key), multigraph keys as the ``id`` attribute."""
    multi = G.is_multigraph()
    declared: dict[tuple[str, str], str] = {}
    nodes, edges = [], []
    for node, attrs in G.nodes(data=True):
        data = [(name, *_typed(v)) for name, v in attrs.items() if v is not None]
        for name, xml_type, _ in data:
            declared.setdefault(("node", name), xml_type)
        nodes.append((format_node_id(node), data))
    for edge in G.edges(keys=True, data=True) if multi else G.edges(data=True):
        data = [(name, *_typed(v)) for name, v in edge[-1].items() if v is not None and name != "id"]
        for name, xml_type, _ in data:
            declared.setdefault(("edge", name), xml_type)
        key = str(edge[2]) if multi else None
        edges.append((format_node_id(edge[0]), format_node_id(edge[1]), key, data))
    nodes.sort(key=lambda row: row[0])
    edges.sort(key=lambda row: (row[0], row[1], "" if row[2] is None else row[2].zfill(12)))
    kind_order = {"node": 0, "edge": 1}
    ordered = sorted(declared.items(), key=lambda item: kind_order[item[0][0]])
    ids = {k: f"d{i}" for i, (k, _) in enumerate(ordered)}
    root = ET.Element("graphml", {"xmlns": GRAPHML_NS})
    for (kind, name), xml_type in ordered:
        attrib = {"id": ids[(kind, name)], "for": kind, "attr.name": name, "attr.type": xml_type}
        ET.SubElement(root, "key", attrib)
    graph = ET.SubElement(root, "graph", {"edgedefault": "directed"})
    for node_id, data in nodes:
        el = ET.SubElement(graph, "node", {"id": node_id})
        for name, _, text in data:
            ET.SubElement(el, "data", {"key": ids[("node", name)]}).text = text
    for src, tgt, key, data in edges:
        attrib = {"source": src, "target": tgt} | ({} if key is None else {"id": key})
        el = ET.SubElement(graph, "edge", attrib)
        for name, _, text in data:
            ET.SubElement(el, "data", {"key": ids[("edge", name)]}).text = text
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


#: labels and values that exercise every escaping rule and encoding path
AWKWARD = [
    "end",
    "a<b>&c",
    'say "hi"',
    "it's",
    "both ' and \"",
    "tab\there",
    "line\nbreak",
    "cr\rlf\r\n",
    "ctl\x01\x02\x1f\x7f",
    "lone \ud800 surrogate",
    "ünïcödé ✓ 中文 🙂",
    "&amp; already escaped &lt;",
    "]]>",
    "   ",
    "",
    "x" * 20_000,
]


def awkward_graph(multi: bool = True) -> nx.DiGraph:
    """A graph whose labels, attribute names and values are :data:`AWKWARD` strings."""
    G: nx.DiGraph = nx.MultiDiGraph() if multi else nx.DiGraph()
    root = ('dir <&> "x"', "end\t'")
    G.add_node(root, n_appearences=3, label="root & co")
    for i, text in enumerate(AWKWARD):
        node = (i % 3, i if i % 2 else "MLP", text, AWKWARD[-1 - i][:50])
        attrs = {"note <&>": text, "flag": bool(i % 2), 'tab\tcr\rlf\n "name"': i}
        G.add_node(node, **attrs if i % 3 else {})  # node ids are reprs: no raw CR/LF/TAB, attr names can
        G.add_edge(node, root, weight=0.1 * i - 0.7, type="d", free_text=text, prompts_appeared=[i, 2])
        if i % 4 == 0:
            G.add_edge(node, root, weight=float(i), type="s")
    G.add_node((7, 7, "lonely", "node"))  # no attributes, no edges
    G.add_edge((7, 7, "lonely", "node"), (7, 7, "lonely", "node"), weight=1e-300, type="d")  # self loop
    return G


@pytest.mark.parametrize("multi", [True, False])
def test_graph_to_xml_is_elementtree_bytes(multi: bool) -> None:
    G = awkward_graph(multi)
    assert graph_to_xml(G) == et_reference(G)


def test_graph_to_xml_edge_cases_are_elementtree_bytes() -> None:
    empty = nx.MultiDiGraph()
    assert graph_to_xml(empty) == et_reference(empty)  # <graph ... /> without children
    only_nodes = nx.MultiDiGraph()
    only_nodes.add_node((0, 1, "a", "b"))
    only_nodes.add_node(("r", "end"), text="")
    assert graph_to_xml(only_nodes) == et_reference(only_nodes)
    parallel = nx.MultiDiGraph()
    for i in range(25):  # keys 0..24: "10" sorts after "9" as the reference's zero-padded keys do
        parallel.add_edge((0, 1, "a", "b"), ("r", "end"), weight=float(i), type="ds"[i % 2])
    parallel.add_edge((0, 1, "a", "b"), ("r", "end"), key="named", weight=1.0, type="d")
    assert graph_to_xml(parallel) == et_reference(parallel)


def random_edge_list(rng: random.Random, labels: list[str]) -> EdgeList:
    """Edges among heads, MLPs and a root with awkward labels, many of them parallel, in random order."""
    nodes: list[Any] = [('dir "<&>"', labels[0])]
    for layer in range(3):
        for comp in (0, 1, "MLP", "AH bias"):
            nodes.append((layer, comp, rng.choice(labels), rng.choice(labels)))
    edges = EdgeList()
    for _ in range(400):
        up, down = rng.choice(nodes[1:]), rng.choice(nodes[:6])
        edges.add(
            up,
            down,
            rng.uniform(-2, 2) if rng.random() < 0.9 else rng.choice([0.0, -0.0, 1e-310]),
            "ds"[rng.random() < 0.5],
        )
    return edges


@pytest.mark.parametrize("seed", range(4))
def test_edge_list_to_xml_is_the_graphs_elementtree_bytes(seed: int, tmp_path: Path) -> None:
    edges = random_edge_list(random.Random(seed), [s for s in AWKWARD if len(s) < 100])
    want = et_reference(edges.to_graph())
    assert edge_list_to_xml(edges) == want
    write_graph(edges, tmp_path / "g.graphml")
    assert (tmp_path / "g.graphml").read_bytes() == want


def test_edge_list_to_xml_edge_cases() -> None:
    assert edge_list_to_xml(EdgeList()) == et_reference(nx.MultiDiGraph())
    clash = EdgeList()  # two distinct nodes with one printed id (a float head index): falls back
    clash.add((0, 2, "a", "b"), ("r", "end"), 1.0, "d")
    clash.add((0, np.float64(2.5), "a", "b"), ("r", "end"), 2.0, "s")
    clash.add((0, 2, "a", "b"), ("r", "end"), 3.0, "d")
    assert edge_list_to_xml(clash) == et_reference(clash.to_graph())


def test_written_awkward_graph_reads_back(tmp_path: Path) -> None:
    edges = random_edge_list(random.Random(9), ["a<b>&c", 'say "hi"', "it's", "ünïcödé 🙂", "x" * 300])
    write_graph(edges, tmp_path / "g.graphml")
    back = read_graph(tmp_path / "g.graphml")
    want = edges.to_graph()
    assert sorted(map(format_node_id, back.nodes)) == sorted(map(format_node_id, want.nodes))
    assert sorted(
        (format_node_id(u), format_node_id(v), k, d["weight"], d["type"])
        for u, v, k, d in back.edges(keys=True, data=True)
    ) == sorted(
        (format_node_id(u), format_node_id(v), k, d["weight"], d["type"])
        for u, v, k, d in want.edges(keys=True, data=True)
    )


# ----------------------------------------------------------------------------- HDF5 reference


def firing_record(rng: np.random.Generator, layer: int, d: int, n_terms: int, dtype: type) -> FiringRecord:
    return FiringRecord(
        rng.permutation(64)[:n_terms],
        np.array([], dtype=np.int64) if n_terms % 2 else rng.permutation(64)[: n_terms + 1],
        rng.standard_normal((layer, 6, d + 1)).astype(dtype),
        rng.standard_normal((layer, 6, d + 1)).astype(dtype),
    )


def prompt_record(prompt: int, seed: int) -> PromptRecord:
    """Firings with contribution sizes below, at and above the 64-value compression threshold, empty
    and long term lists, float32 and float64."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 0), (1, 9), (1, 10), (2, 4), (3, 20), (1, 1)]  # 6, 60, 66, 60, 378, 12 values
    firings = {}
    for i, (layer, d) in enumerate(shapes * 2):
        key = (prompt, layer, i % 5, d, i % (d + 1))
        firings[key] = firing_record(
            rng, layer, d, [0, 3, 64, 65, 1][i % 5], np.float64 if i % 3 == 0 else np.float32
        )
    return PromptRecord(prompt, "traced", len(firings), firings)


def reference_part(path: Path, rec: PromptRecord) -> None:
    """The part file with h5py's high-level API: one dataset per firing and kind, gzip above 64 values."""
    kinds = [
        ("svs_used_decomp_i", "dest_terms", "term"),
        ("svs_used_decomp_j", "src_terms", "term"),
        ("contrib_sv_dest", "contrib_dest", "layer,component,src_pos"),
        ("contrib_sv_src", "contrib_src", "layer,component,src_pos"),
    ]
    with h5py.File(path, "w", track_order=True) as f:
        f.attrs["prompt"] = rec.prompt
        f.attrs["status"] = rec.status
        f.attrs["n_firings"] = rec.n_firings
        for key in sorted(rec.firings):
            for kind, field, dims in kinds:
                arr = np.asarray(getattr(rec.firings[key], field))
                if kind.startswith("svs"):
                    arr = arr.astype(np.int64)
                compression = "gzip" if arr.size > 64 else None
                ds = f.create_dataset(
                    dataset_name(kind, key), data=arr, compression=compression, track_times=False
                )
                ds.attrs["dims"] = dims


def test_part_file_is_the_high_level_api_bytes(tmp_path: Path) -> None:
    rec = prompt_record(4, seed=0)
    written = write_part(tmp_path, rec)
    reference_part(tmp_path / "reference.h5", rec)
    assert written.read_bytes() == (tmp_path / "reference.h5").read_bytes()


KIND_ORDER = ("svs_used_decomp_i", "svs_used_decomp_j", "contrib_sv_dest", "contrib_sv_src")


def firing_order(name: str) -> tuple[tuple[int, ...], int]:
    """Sort key of a dataset name ``{kind}_(p, l, h, d, s)``: firing, then kind in published order."""
    kind, key = name.rsplit("_(", 1)
    return tuple(int(x) for x in key[:-1].split(", ")), KIND_ORDER.index(kind)


def test_merged_file_is_the_high_level_api_bytes(tmp_path: Path) -> None:
    recs = [prompt_record(p, seed=p) for p in range(3)] + [PromptRecord(3, "incorrect", 0, {})]
    for rec in recs:
        write_part(tmp_path, rec)
    merged = build_results(tmp_path / "merged.h5", tmp_path, range(4))
    with h5py.File(tmp_path / "reference.h5", "w", track_order=True) as f:
        for rec in recs:
            with h5py.File(tmp_path / "parts" / f"{rec.prompt}.h5", "r") as part:
                for name in sorted(part.keys(), key=firing_order):
                    part.copy(part[name], f, name=name)
        table = {
            "prompt": np.array([r.prompt for r in recs], dtype=np.int64),
            "status": np.array([STATUSES.index(r.status) for r in recs], dtype=np.int8),
            "n_firings": np.array([r.n_firings for r in recs], dtype=np.int64),
        }
        for column, values in table.items():
            f.create_dataset(f"prompts/{column}", data=values, track_times=False)
        f["prompts"].attrs["status_codes"] = ",".join(STATUSES)
    assert merged.read_bytes() == (tmp_path / "reference.h5").read_bytes()
