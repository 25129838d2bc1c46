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
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from html import escape
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

_CSS = """
html, body { margin: 0; height: 100%; font-family: system-ui, sans-serif; font-size: 13px; }
body { display: flex; flex-direction: column; }
#toolbar { display: flex; gap: 12px; align-items: center; padding: 6px 10px;
  border-bottom: 1px solid #ccc; background: #f7f7f7; flex-wrap: wrap; }
#toolbar h1 { font-size: 14px; margin: 0 8px 0 0; }
#canvas { flex: 1; position: relative; overflow: hidden; background: #fff; }
#graph { width: 100%; height: 100%; cursor: grab; display: block; }
#graph.dragging { cursor: grabbing; }
.edge { fill: none; stroke-opacity: 0.55; }
.edge.type-d { stroke: #1f77b4; }
.edge.type-s { stroke: #ff7f0e; }
.edge.hidden, .node.hidden { display: none; }
.edge.hl { stroke-opacity: 1; }
.node circle, .node rect, .node polygon { stroke: #333; stroke-width: 1; }
.node.kind-head circle { fill: #cfe3f7; }
.node.kind-MLP rect { fill: #d5f0d0; }
.node.kind-AH-bias polygon { fill: #f3e0b5; }
.node.kind-Embedding rect { fill: #e6d5f2; }
.node.kind-root rect { fill: #f6c9c9; }
.node text { font-size: 10px; text-anchor: middle; pointer-events: none; fill: #111; }
.node.hl circle, .node.hl rect, .node.hl polygon { stroke: #d62728; stroke-width: 3; }
#tooltip { position: absolute; pointer-events: none; background: rgba(255,255,255,0.95);
  border: 1px solid #888; border-radius: 4px; padding: 6px 8px; display: none; white-space: pre;
  font-family: ui-monospace, monospace; font-size: 12px; box-shadow: 0 1px 4px rgba(0,0,0,0.2); }
#legend span { margin-right: 10px; }
#js-errors { color: #b00; margin: 0; padding: 0 10px; }
#js-errors:empty { display: none; }
"""

_JS = r"""
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var cy = JSON.parse(document.getElementById("graph-data").textContent);
  var nodes = cy.elements.nodes, edges = cy.elements.edges;
  var svg = document.getElementById("graph");
  var viewport = document.getElementById("viewport");
  var edgeLayer = document.getElementById("edges"), nodeLayer = document.getElementById("nodes");
  var tooltip = document.getElementById("tooltip");
  var slider = document.getElementById("weight-slider");
  var attrSelect = document.getElementById("weight-attr");
  var shownLabel = document.getElementById("edges-shown");
  var minLabel = document.getElementById("weight-min");
  var byId = {}, nodeEls = {}, edgeEls = [];
  var view = {x: 0, y: 0, k: 1};

  function el(tag, attrs, parent) {
    var e = document.createElementNS(SVGNS, tag);
    for (var a in attrs) { e.setAttribute(a, attrs[a]); }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function applyView() {
    viewport.setAttribute("transform", "translate(" + view.x + "," + view.y + ") scale(" + view.k + ")");
  }
  function fit() {
    if (!nodes.length) { return; }
    var xs = nodes.map(function (n) { return n.position.x; });
    var ys = nodes.map(function (n) { return n.position.y; });
    var minX = Math.min.apply(null, xs) - 70, maxX = Math.max.apply(null, xs) + 70;
    var minY = Math.min.apply(null, ys) - 40, maxY = Math.max.apply(null, ys) + 40;
    var w = svg.clientWidth || 800, h = svg.clientHeight || 600;
    view.k = Math.min(w / (maxX - minX), h / (maxY - minY), 2);
    view.x = (w - (maxX + minX) * view.k) / 2;
    view.y = (h - (maxY + minY) * view.k) / 2;
    applyView();
  }
  function zoomAt(factor, cx, cy0) {
    var k = Math.max(0.05, Math.min(20, view.k * factor));
    view.x = cx - (cx - view.x) * (k / view.k);
    view.y = cy0 - (cy0 - view.y) * (k / view.k);
    view.k = k;
    applyView();
  }

  // ---- numeric edge attributes offered by the filter
  var numericAttrs = [];
  ["weight", "norm_weight", "abs_avg_logit_diff", "mean_logit_diff", "n_prompts"].forEach(function (a) {
    if (edges.some(function (e) { return typeof e.data[a] === "number"; })) { numericAttrs.push(a); }
  });
  numericAttrs.forEach(function (a) {
    var o = document.createElement("option");
    o.value = a; o.textContent = "|" + a + "|";
    attrSelect.appendChild(o);
  });
  function value(e, a) { var v = e.data[a]; return typeof v === "number" ? Math.abs(v) : 0; }
  var maxW = Math.max.apply(null, [1e-12].concat(edges.map(function (e) { return value(e, "weight"); })));

  // ---- draw edges (under the nodes)
  nodes.forEach(function (n) { byId[n.data.id] = n; });
  edges.forEach(function (e) {
    var s = byId[e.data.source], t = byId[e.data.target];
    if (!s || !t) { throw new Error("edge " + e.data.id + " names a missing node"); }
    var x1 = s.position.x, y1 = s.position.y, x2 = t.position.x, y2 = t.position.y;
    var bend = e.data.type === "s" ? 18 : -18;
    var mx = (x1 + x2) / 2 + bend, my = (y1 + y2) / 2;
    var dx = x2 - mx, dy = y2 - my, len = Math.sqrt(dx * dx + dy * dy) || 1;
    var stop = t.data.kind === "root" ? 18 : 19;  // end the arrow at the target's outline
    x2 -= dx / len * stop; y2 -= dy / len * stop;
    var width = 0.6 + 5 * value(e, "weight") / maxW;
    var path = el("path", {
      "class": "edge type-" + (e.data.type || "d"),
      "d": "M" + x1 + "," + y1 + " Q" + mx + "," + my + " " + x2 + "," + y2,
      "stroke-width": width.toFixed(2),
      "marker-end": "url(#arrow-" + (e.data.type === "s" ? "s" : "d") + ")",
      "data-id": e.data.id
    }, edgeLayer);
    var title = el("title", {}, path);
    title.textContent = e.data.source + " -> " + e.data.target + "\ntype " + e.data.type +
      "  weight " + (typeof e.data.weight === "number" ? e.data.weight.toPrecision(4) : "?");
    edgeEls.push({data: e, el: path});
  });

  // ---- draw nodes
  nodes.forEach(function (n) {
    var d = n.data, kind = d.kind || "head";
    var g = el("g", {
      "class": "node kind-" + kind.replace(" ", "-"),
      "data-id": d.id,
      "transform": "translate(" + n.position.x + "," + n.position.y + ")"
    }, nodeLayer);
    if (kind === "head") {
      el("circle", {r: 17}, g);
    } else if (kind === "AH bias") {
      el("polygon", {points: "0,-17 24,0 0,17 -24,0"}, g);
    } else if (kind === "root") {
      el("rect", {x: -110, y: -16, width: 220, height: 32, rx: 6}, g);
    } else {
      el("rect", {x: -24, y: -14, width: 48, height: 28, rx: 3}, g);
    }
    var top = el("text", {y: -1}, g), bottom = el("text", {y: 10}, g);
    if (kind === "head") { top.textContent = d.layer + "." + d.head; }
    else if (kind === "MLP") { top.textContent = "MLP" + d.layer; }
    else if (kind === "AH bias") { top.textContent = "bias" + d.layer; }
    else if (kind === "Embedding") { top.textContent = "Emb"; }
    else { top.textContent = d.label; }
    var pos = d.positions || [];
    bottom.textContent = kind === "root" ? "" :
      (pos.length === 2 && pos[0] !== pos[1] ? pos[0] + "\u2192" + pos[1] : (pos[0] || ""));
    nodeEls[d.id] = g;
    g.addEventListener("mouseenter", function (ev) { showTip(n, ev); highlight(d.id, true); });
    g.addEventListener("mousemove", function (ev) { moveTip(ev); });
    g.addEventListener("mouseleave", function () { tooltip.style.display = "none"; highlight(d.id, false); });
  });

  function showTip(n, ev) {
    var d = n.data, lines = [d.label, "id: " + d.id];
    if (d.kind !== "root") {
      lines.push("layer: " + d.layer);
      lines.push(d.kind === "head" ? "head: " + d.head : "component: " + d.component);
      lines.push("positions: dest " + d.dest + ", src " + d.src);
    } else { lines.push("position: " + d.dest); }
    if (d.n_appearences !== undefined) { lines.push("n_appearences: " + d.n_appearences); }
    var ins = 0, outs = 0;
    edgeEls.forEach(function (e) {
      if (e.data.data.target === d.id) { ins++; }
      if (e.data.data.source === d.id) { outs++; }
    });
    lines.push("in-edges: " + ins + ", out-edges: " + outs);
    tooltip.textContent = lines.join("\n");
    tooltip.style.display = "block";
    moveTip(ev);
  }
  function moveTip(ev) {
    var r = svg.getBoundingClientRect();
    tooltip.style.left = (ev.clientX - r.left + 14) + "px";
    tooltip.style.top = (ev.clientY - r.top + 14) + "px";
  }
  function highlight(id, on) {
    nodeEls[id].classList.toggle("hl", on);
    edgeEls.forEach(function (e) {
      if (e.data.data.source === id || e.data.data.target === id) { e.el.classList.toggle("hl", on); }
    });
  }

  // ---- weight filter
  function applyFilter() {
    var a = attrSelect.value || "weight";
    var vals = edges.map(function (e) { return value(e, a); });
    var maxV = Math.max.apply(null, [0].concat(vals));
    var thr = maxV * Number(slider.value) / 1000;
    var shown = 0;
    edgeEls.forEach(function (e, i) {
      var hide = vals[i] < thr;
      e.el.classList.toggle("hidden", hide);
      if (!hide) { shown++; }
    });
    minLabel.textContent = thr.toPrecision(3);
    shownLabel.textContent = shown + " / " + edges.length;
  }
  slider.addEventListener("input", applyFilter);
  attrSelect.addEventListener("change", applyFilter);

  // ---- pan and zoom
  var drag = null;
  svg.addEventListener("mousedown", function (ev) {
    drag = {x: ev.clientX, y: ev.clientY, vx: view.x, vy: view.y};
    svg.classList.add("dragging");
  });
  window.addEventListener("mousemove", function (ev) {
    if (!drag) { return; }
    view.x = drag.vx + ev.clientX - drag.x;
    view.y = drag.vy + ev.clientY - drag.y;
    applyView();
  });
  window.addEventListener("mouseup", function () { drag = null; svg.classList.remove("dragging"); });
  svg.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var r = svg.getBoundingClientRect();
    zoomAt(ev.deltaY < 0 ? 1.15 : 1 / 1.15, ev.clientX - r.left, ev.clientY - r.top);
  }, {passive: false});
  document.getElementById("zoom-in").addEventListener("click", function () {
    zoomAt(1.25, svg.clientWidth / 2, svg.clientHeight / 2);
  });
  document.getElementById("zoom-out").addEventListener("click", function () {
    zoomAt(1 / 1.25, svg.clientWidth / 2, svg.clientHeight / 2);
  });
  document.getElementById("fit").addEventListener("click", fit);
  window.addEventListener("resize", fit);

  applyFilter();
  fit();
  document.body.setAttribute("data-rendered", String(nodes.length));
  document.body.setAttribute("data-edges", String(edges.length));

  // ---- "#selftest": exercise hover, filter and zoom, report into <pre id="selftest"> (for tests)
  if (window.location.hash === "#selftest") {
    var report = {};
    var heads = nodes.filter(function (n) { return n.data.kind === "head"; });
    var probe = heads.length ? heads[0] : nodes[0];
    var first = probe ? nodeEls[probe.data.id] : null;
    if (first) {
      first.dispatchEvent(new MouseEvent("mouseenter", {clientX: 10, clientY: 10}));
      report.tooltip = tooltip.textContent;
      report.tooltip_visible = tooltip.style.display === "block";
      report.highlighted = document.querySelectorAll(".node.hl").length;
      first.dispatchEvent(new MouseEvent("mouseleave"));
    }
    attrSelect.value = "weight";
    slider.value = "500";
    slider.dispatchEvent(new Event("input"));
    report.shown_at_half = edgeEls.filter(function (e) { return !e.el.classList.contains("hidden"); }).length;
    slider.value = "0";
    slider.dispatchEvent(new Event("input"));
    report.shown_at_zero = document.querySelectorAll("path.edge:not(.hidden)").length;
    var k0 = view.k;
    document.getElementById("zoom-in").click();
    report.zoom_ratio = view.k / k0;
    fit();
    document.getElementById("selftest").textContent = JSON.stringify(report);
  }
})();
"""

_ERROR_HOOK = r"""
window.onerror = function (msg, src, line, col, err) {
  var box = document.getElementById("js-errors");
  box.textContent += "JS error: " + msg + " (line " + line + ")\n";
  document.body.setAttribute("data-js-error", "1");
};
"""


def _script_json(payload: Any) -> str:
    """JSON safe to put inside ``<script type="application/json">`` (no ``</`` or HTML-significant chars)."""
    text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def graph_to_html(G: nx.MultiDiGraph, title: str = "ACC graph") -> str:
    """A self-contained HTML page (inline data, CSS and JS; no network) viewing ``G``."""
    cy = graph_to_cytoscape(G, title)
    n_d = sum(1 for _, _, t in G.edges(data="type") if t == "d")
    n_s = G.number_of_edges() - n_d
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<script>{_ERROR_HOOK}</script>
<style>{_CSS}</style>
</head>
<body>
<div id="toolbar">
  <h1>{escape(title)}</h1>
  <span>{G.number_of_nodes()} nodes, {G.number_of_edges()} edges</span>
  <label>filter by <select id="weight-attr"></select></label>
  <label>min <input id="weight-slider" type="range" min="0" max="1000" value="0" step="1"></label>
  <span>&ge; <span id="weight-min">0</span>, edges shown <span id="edges-shown"></span></span>
  <button id="zoom-in" type="button">+</button>
  <button id="zoom-out" type="button">&minus;</button>
  <button id="fit" type="button">fit</button>
  <span id="legend"><span style="color:#1f77b4">&#9644; dest (d) edge: {n_d}</span>
  <span style="color:#ff7f0e">&#9644; source (s) edge: {n_s}</span></span>
</div>
<pre id="js-errors"></pre>
<pre id="selftest" hidden></pre>
<div id="canvas">
<svg id="graph" xmlns="http://www.w3.org/2000/svg">
  <defs>
    <marker id="arrow-d" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="9" markerHeight="9"
      markerUnits="userSpaceOnUse"
      orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#1f77b4"/></marker>
    <marker id="arrow-s" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="9" markerHeight="9"
      markerUnits="userSpaceOnUse"
      orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#ff7f0e"/></marker>
  </defs>
  <g id="viewport"><g id="edges"></g><g id="nodes"></g></g>
</svg>
<div id="tooltip"></div>
</div>
<script type="application/json" id="graph-data">{_script_json(cy)}</script>
<script>{_JS}</script>
</body>
</html>
"""


def write_html(G: nx.MultiDiGraph, path: str | Path, title: str = "") -> Path:
    """Write the HTML viewer of ``G`` at ``path`` (atomically)."""
    path = Path(path)
    atomic_write_text(path, graph_to_html(G, title or path.stem))
    return path
