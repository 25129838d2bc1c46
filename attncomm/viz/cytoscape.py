"""Export ACC graphs as Cytoscape JSON (``.cyjs``) and as a self-contained HTML viewer.

Pure conversion, no Hydra or wandb: :func:`graph_to_cytoscape` turns a traced, combined or pruned
graph (tuple node ids, docs/METHOD.md sections 4-7) into Cytoscape's JSON format::

    {"data": {...graph facts...},
     "elements": {"nodes": [{"data": {id, label, layer, component, kind, head, dest, src,
                                      positions, ...}, "position": {"x": .., "y": ..}}, ...],
                  "edges": [{"data": {id, source, target, weight, type, ...}}, ...]}}

Node ``id`` is the published node id string (``(9, 6, 'end', 'IO')``), so a ``.cyjs`` file maps
back to the GraphML one; :func:`cytoscape_to_graph` is the inverse. Positions are layer-ordered:
the root at the top, layer 0 at the bottom (Cytoscape's ``y`` grows downwards), an MLP half a
level above its layer's heads (it reads their output), the Embedding half a level below layer 0.

:func:`graph_to_html` writes one HTML page holding the graph and a small viewer in plain
JavaScript + SVG (no library, no network): pan (drag), zoom (wheel, buttons), hover a node for its
layer/head/positions, and a slider that hides edges whose ``|weight|`` (or another numeric edge
attribute) is below a value. JavaScript errors are written into ``<pre id="js-errors">`` so a
headless browser's DOM dump shows them; ``<body data-rendered="N">`` is set once N nodes are drawn.

The viewer's page, stylesheet and scripts are package files under ``attncomm/viz/viewer/``
(``viewer.html`` with ``{{name}}`` placeholders, ``viewer.css``, ``viewer.js``, ``error_hook.js``),
read with :mod:`importlib.resources` and inlined into each page.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from functools import cache
from html import escape
from importlib.resources import files
from pathlib import Path
from typing import Any

import networkx as nx

from attncomm.core.node_ids import NodeId, format_node_id, is_root, parse_node_id
from attncomm.io.artifacts import atomic_write_text

log = logging.getLogger(__name__)

#: horizontal distance between neighbouring nodes of one level, and vertical distance between levels
X_SPACING = 120.0
Y_SPACING = 110.0
#: most nodes in one row, and vertical distance between the sub-rows of a wrapped level
MAX_ROW = 24
SUB_ROW_SPACING = 50.0

#: order of non-head components inside a level (heads first, by index)
_KIND_ORDER = {"head": 0, "AH bias": 1, "MLP": 2, "Embedding": 3}

#: edge attributes that are graph-structure bookkeeping, not data to carry
_SKIP_EDGE_ATTRS = frozenset({"id", "upstream_node", "downstream_node"})
#: node attributes replaced by the computed layout
_SKIP_NODE_ATTRS = frozenset({"x", "y"})


# ----------------------------------------------------------------------------- node facts


def node_kind(node: NodeId) -> str:
    """``root``, ``head``, ``MLP``, ``AH bias`` or ``Embedding``."""
    if is_root(node):
        return "root"
    comp = node[1]
    return "head" if isinstance(comp, int) else str(comp)


def node_level(node: NodeId, top: float) -> float:
    """Vertical level of a node (bigger = higher): heads/bias at their layer, MLP +0.5, Embedding -0.5."""
    kind = node_kind(node)
    if kind == "root":
        return top
    layer = int(node[0])
    if kind == "MLP":
        return layer + 0.5
    if kind == "Embedding":
        return layer - 0.5
    return float(layer)


def node_label(node: NodeId) -> str:
    """Short human label: ``9.6 end→IO``, ``MLP 8 end``, ``AH bias 4 end``, ``Embedding IO``, root name."""
    if is_root(node):
        return f"{node[0]} [{node[1]}]"
    layer, comp, dest, src = node  # type: ignore[misc]
    where = dest if dest == src else f"{dest}→{src}"
    if isinstance(comp, int):
        return f"{layer}.{comp} {where}"
    if comp == "Embedding":
        return f"Embedding {where}"
    return f"{comp} {layer} {where}"


def node_data(node: NodeId) -> dict[str, Any]:
    """The descriptive fields of a node: id, label, layer, component, kind, head, dest, src, positions."""
    kind = node_kind(node)
    if kind == "root":
        return {
            "id": format_node_id(node),
            "label": node_label(node),
            "layer": None,
            "component": "root",
            "kind": "root",
            "head": None,
            "dest": node[1],
            "src": None,
            "positions": [node[1]],
        }
    layer, comp, dest, src = node  # type: ignore[misc]
    return {
        "id": format_node_id(node),
        "label": node_label(node),
        "layer": int(layer),
        "component": int(comp) if isinstance(comp, int) else comp,
        "kind": kind,
        "head": int(comp) if isinstance(comp, int) else None,
        "dest": dest,
        "src": src,
        "positions": [dest, src],
    }


def _sort_key(node: NodeId) -> tuple[Any, ...]:
    if is_root(node):
        return (0, 0, "", "")
    layer, comp, dest, src = node  # type: ignore[misc]
    kind = node_kind(node)
    return (_KIND_ORDER[kind], comp if isinstance(comp, int) else 0, str(dest), str(src))


def layout_positions(G: nx.MultiDiGraph) -> dict[NodeId, tuple[float, float]]:
    """Layer-ordered positions ``{node: (x, y)}``: the root on top, layer 0 at the bottom.

    Each level (see :func:`node_level`) is a centred row ordered by component (heads by index,
    then AH bias, MLP, Embedding) and then by dest and source label, so the layout is
    deterministic and the same node sits at the same place in every export of a graph. A level of
    more than :data:`MAX_ROW` nodes wraps into several staggered sub-rows, and the levels below it
    move down to make room, so every node of a lower level stays below every node of a higher one.
    """
    layers = [int(n[0]) for n in G.nodes if not is_root(n)]
    top = (max(layers) + 1.5) if layers else 0.0
    rows: dict[float, list[NodeId]] = defaultdict(list)
    for node in G.nodes:
        rows[node_level(node, top)].append(node)
    positions: dict[NodeId, tuple[float, float]] = {}
    extra = 0.0  # room taken by the sub-rows of the levels above
    for level in sorted(rows, reverse=True):
        nodes = sorted(rows[level], key=_sort_key)
        n_sub = math.ceil(len(nodes) / MAX_ROW)
        per_row = math.ceil(len(nodes) / n_sub)
        y0 = (top - level) * Y_SPACING + extra
        for sub in range(n_sub):
            chunk = nodes[sub * per_row : (sub + 1) * per_row]
            width = (len(chunk) - 1) * X_SPACING
            shift = X_SPACING / 2 if sub % 2 else 0.0
            for i, node in enumerate(chunk):
                x = i * X_SPACING - width / 2 + shift
                positions[node] = (round(x, 3), round(y0 + sub * SUB_ROW_SPACING, 3))
        extra += (n_sub - 1) * SUB_ROW_SPACING
    return positions


# ----------------------------------------------------------------------------- cytoscape json


def _json_value(value: Any) -> Any:
    """A JSON-safe copy of an attribute value (numpy scalars to Python, NaN/inf to None)."""
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def graph_to_cytoscape(G: nx.MultiDiGraph, name: str = "") -> dict[str, Any]:
    """Cytoscape JSON of an ACC graph, with layer-ordered positions and every edge's weight.

    Node data: the fields of :func:`node_data` plus the graph's own node attributes
    (``n_appearences``); edge data: ``id`` (``e0, e1, ...``), ``source``, ``target``, ``weight``,
    ``type`` and the other edge attributes (``prompts_appeared``, ``logit_diff``,
    ``norm_weight``, ``abs_avg_logit_diff``), plus ``n_prompts`` when ``prompts_appeared`` is
    known and ``mean_logit_diff`` when ``logit_diff`` is.
    """
    positions = layout_positions(G)
    nodes = []
    # nodes and edges sorted, so the file's bytes never depend on insertion order (PYTHONHASHSEED)
    for node in sorted(G.nodes, key=lambda n: (positions[n][1], positions[n][0], format_node_id(n))):
        data = node_data(node)
        for key, value in G.nodes[node].items():
            if key not in _SKIP_NODE_ATTRS and key not in data:
                data[key] = _json_value(value)
        x, y = positions[node]
        nodes.append({"data": data, "position": {"x": x, "y": y}})
    edges = []
    ordered = sorted(
        G.edges(keys=True, data=True), key=lambda e: (format_node_id(e[0]), format_node_id(e[1]), str(e[2]))
    )
    for i, (u, v, _, attrs) in enumerate(ordered):
        data: dict[str, Any] = {"id": f"e{i}", "source": format_node_id(u), "target": format_node_id(v)}
        for key, value in attrs.items():
            if key not in _SKIP_EDGE_ATTRS:
                data[key] = _json_value(value)
        if "prompts_appeared" in attrs:
            data["n_prompts"] = len(attrs["prompts_appeared"])
        if attrs.get("logit_diff"):
            diffs = [float(x) for x in attrs["logit_diff"]]
            data["mean_logit_diff"] = _json_value(sum(diffs) / len(diffs))
        edges.append({"data": data})
    graph_data = {
        "name": name,
        "n_nodes": G.number_of_nodes(),
        "n_edges": G.number_of_edges(),
        "directed": True,
        "multigraph": True,
    }
    return {"data": graph_data, "elements": {"nodes": nodes, "edges": edges}}


def cytoscape_to_graph(cy: dict[str, Any]) -> nx.MultiDiGraph:
    """Inverse of :func:`graph_to_cytoscape`: tuple node ids back, layout kept as node ``x``/``y``.

    Descriptive fields added on export (label, layer, ...) are dropped; node ids are parsed with
    the literal parser (never ``eval``).
    """
    descriptive = set(node_data(("r", "r"))) | set(node_data((0, 0, "a", "b")))
    derived = {"id", "source", "target", "n_prompts", "mean_logit_diff"}
    G = nx.MultiDiGraph()
    for item in cy["elements"]["nodes"]:
        data = item["data"]
        attrs = {k: v for k, v in data.items() if k not in descriptive}
        if "position" in item:
            attrs["x"], attrs["y"] = float(item["position"]["x"]), float(item["position"]["y"])
        G.add_node(parse_node_id(data["id"], where="cyjs node"), **attrs)
    for item in cy["elements"]["edges"]:
        data = item["data"]
        u = parse_node_id(data["source"], where="cyjs edge")
        v = parse_node_id(data["target"], where="cyjs edge")
        G.add_edge(u, v, **{k: val for k, val in data.items() if k not in derived})
    return G


def write_cyjs(G: nx.MultiDiGraph, path: str | Path, name: str = "") -> Path:
    """Write ``G`` as Cytoscape JSON at ``path`` (atomically)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(graph_to_cytoscape(G, name or path.stem), allow_nan=False))
    return path


# ----------------------------------------------------------------------------- html viewer

#: the viewer's files (package data under ``attncomm/viz/viewer/``): the page template and what it inlines
VIEWER_FILES: tuple[str, ...] = ("viewer.html", "viewer.css", "viewer.js", "error_hook.js")

#: ``{{name}}`` placeholders of ``viewer.html``
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@cache
def viewer_asset(name: str) -> str:
    """The text of one viewer file (see :data:`VIEWER_FILES`), read once from the installed package."""
    if name not in VIEWER_FILES:
        raise ValueError(f"unknown viewer file {name!r}; one of {VIEWER_FILES}")
    return files("attncomm.viz").joinpath("viewer", name).read_text(encoding="utf-8")


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{name}}`` of ``template`` by ``values[name]`` in one pass (a value's own text is
    never searched for placeholders); a placeholder without a value raises ``KeyError``."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _script_json(payload: Any) -> str:
    """JSON safe to put inside ``<script type="application/json">`` (no ``</`` or HTML-significant chars)."""
    text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def graph_to_html(G: nx.MultiDiGraph, title: str = "ACC graph") -> str:
    """A self-contained HTML page (inline data, CSS and JS; no network) viewing ``G``."""
    cy = graph_to_cytoscape(G, title)
    n_d = sum(1 for _, _, t in G.edges(data="type") if t == "d")
    n_s = G.number_of_edges() - n_d
    values = {
        "title": escape(title),
        "error_hook": viewer_asset("error_hook.js"),
        "css": viewer_asset("viewer.css"),
        "js": viewer_asset("viewer.js"),
        "n_nodes": str(G.number_of_nodes()),
        "n_edges": str(G.number_of_edges()),
        "n_d": str(n_d),
        "n_s": str(n_s),
        "graph_json": _script_json(cy),
    }
    return fill_template(viewer_asset("viewer.html"), values)


def write_html(G: nx.MultiDiGraph, path: str | Path, title: str = "") -> Path:
    """Write the HTML viewer of ``G`` at ``path`` (atomically)."""
    path = Path(path)
    atomic_write_text(path, graph_to_html(G, title or path.stem))
    return path
