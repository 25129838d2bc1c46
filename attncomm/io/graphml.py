"""GraphML files of ACC graphs: read (validated, untrusted input) and write (atomic, reproducible).

Every attribute is converted to its documented type on reading (``weight`` float, ``type`` str,
``n_appearences`` int, ``prompts_appeared`` list[int], ``logit_diff`` list[float]); node ids are parsed
with :func:`attncomm.core.node_ids.parse_node_id`. Traced graphs are named
``{model}_{task}_n{N}_{prompt}_{seed}.graphml``.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from attncomm.core.edge_list import EdgeList
from attncomm.core.node_ids import GraphFormatError, NodeId, format_node_id, parse_node_id
from attncomm.io.artifacts import atomic_write_bytes

#: GraphML files above this size (MiB) are refused unless ATTNCOMM_MAX_GRAPHML_MB raises the limit
MAX_GRAPHML_MB = 256

GRAPHML_NS = "http://graphml.graphdrawing.org/xmlns"
_NS = {"g": GRAPHML_NS}

#: edge attributes every ACC graph carries
REQUIRED_EDGE_ATTRS: tuple[str, ...] = ("weight", "type")
EDGE_TYPES: frozenset[str] = frozenset({"d", "s"})

_TRACED_NAME = re.compile(
    r"^(?P<model>.+)_(?P<task>[^_]+)_n(?P<n>\d+)_(?P<prompt>\d+)_(?P<seed>\d+)\.graphml$"
)


def traced_graph_name(model: str, task: str, n_prompts: int, prompt: int, seed: int) -> str:
    """File name of one prompt's traced graph: ``{model}_{task}_n{N}_{prompt}_{seed}.graphml``."""
    return f"{model}_{task}_n{n_prompts}_{prompt}_{seed}.graphml"


def traced_graph_prompt(path: str | Path) -> int:
    """The prompt id in a traced graph's file name ``{model}_{task}_n{N}_{prompt}_{seed}.graphml``."""
    match = _TRACED_NAME.match(Path(path).name)
    if match is None:
        raise GraphFormatError(
            f"{path}: not a traced-graph file name ({{model}}_{{task}}_n{{N}}_{{prompt}}_{{seed}}.graphml)"
        )
    return int(match.group("prompt"))


# ----------------------------------------------------------------------------- attribute types


def _parse_list(text: str, conv: Callable[[str], Any]) -> list[Any]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError("expected a list '[a, b, ...]'")
    inner = text[1:-1].strip()
    if not inner:
        return []
    return [conv(item.strip()) for item in inner.split(",")]


def _strict_int(text: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", text.strip()):
        raise ValueError(f"{text!r} is not an int")
    return int(text)


def _graphml_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


_XML_TYPES: dict[str, Callable[[str], Any]] = {
    "int": _strict_int,
    "long": _strict_int,
    "float": float,
    "double": float,
    "string": str,
    "boolean": _graphml_bool,
}

#: attributes with a fixed meaning, converted regardless of the declared GraphML type
_KNOWN_ATTRS: dict[str, Callable[[str], Any]] = {
    "weight": float,
    "type": str,
    "n_appearences": _strict_int,
    "prompts_appeared": lambda s: _parse_list(s, _strict_int),
    "logit_diff": lambda s: _parse_list(s, float),
    "norm_weight": float,
    "abs_avg_logit_diff": float,
    "x": float,
    "y": float,
    "upstream_node": str,
    "downstream_node": str,
}


def _list_text(values: list[Any]) -> str:
    return "[" + ", ".join(repr(v) for v in values) + "]"


# ----------------------------------------------------------------------------- reading


def _element_desc(tag: str, elem: ET.Element) -> str:
    if tag == "node":
        return f"<node id={elem.get('id')!r}>"
    return f"<edge source={elem.get('source')!r} target={elem.get('target')!r}>"


def read_graph(path: str | Path) -> nx.MultiDiGraph:
    """Read an ACC GraphML file into a ``MultiDiGraph`` with tuple node ids and typed attributes.

    Node ``x``/``y`` layout and the edge ``id`` (multigraph key) are accepted; a missing required
    edge attribute (``weight``, ``type``), a malformed value or node id raises an error naming the
    file, the element and the problem.
    """
    path = Path(path)
    limit_mb = int(os.environ.get("ATTNCOMM_MAX_GRAPHML_MB", MAX_GRAPHML_MB))
    if path.is_file() and path.stat().st_size > limit_mb * 2**20:
        size_mb = path.stat().st_size / 2**20
        raise GraphFormatError(
            f"{path}: {size_mb:.0f} MiB is above the GraphML size limit of {limit_mb} MiB "
            "(ACC graphs are far smaller: is this the right file?); raise it with ATTNCOMM_MAX_GRAPHML_MB=N"
        )
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise GraphFormatError(f"{path}: not well-formed XML: {exc}") from None
    if root.tag != f"{{{GRAPHML_NS}}}graphml":
        raise GraphFormatError(f"{path}: root element is {root.tag!r}, expected GraphML <graphml>")

    keys: dict[str, tuple[str, str, str]] = {}  # key id -> (for, attr.name, attr.type)
    defaults: dict[str, dict[str, Any]] = {"node": {}, "edge": {}}
    for key in root.findall("g:key", _NS):
        kid, kfor, name = key.get("id"), key.get("for"), key.get("attr.name")
        ktype = key.get("attr.type", "string")
        if kid is None or name is None or kfor not in ("node", "edge", "graph", "all"):
            raise GraphFormatError(f"{path}: malformed <key> element {key.attrib}")
        if ktype not in _XML_TYPES:
            raise GraphFormatError(f"{path}: <key id={kid!r}> has unsupported attr.type {ktype!r}")
        keys[kid] = (kfor, name, ktype)
        default = key.find("g:default", _NS)
        if default is not None and default.text is not None and kfor in defaults:
            defaults[kfor][name] = _convert(path, f"<key id={kid!r}> default", name, ktype, default.text)

    graphs = root.findall("g:graph", _NS)
    if len(graphs) != 1:
        raise GraphFormatError(f"{path}: expected exactly one <graph>, found {len(graphs)}")
    graph_el = graphs[0]
    if graph_el.get("edgedefault", "directed") != "directed":
        raise GraphFormatError(
            f"{path}: <graph edgedefault={graph_el.get('edgedefault')!r}>, expected directed"
        )

    G = nx.MultiDiGraph()
    ids: dict[str, NodeId] = {}
    for node_el in graph_el.findall("g:node", _NS):
        raw = node_el.get("id")
        if raw is None:
            raise GraphFormatError(f"{path}: <node> without an id attribute")
        node = parse_node_id(raw, where=f"{path}: <node>")
        if raw in ids:
            raise GraphFormatError(f"{path}: duplicate <node id={raw!r}>")
        ids[raw] = node
        attrs = dict(defaults["node"])
        attrs.update(_read_data(path, node_el, "node", keys))
        G.add_node(node, **attrs)

    for edge_el in graph_el.findall("g:edge", _NS):
        desc = _element_desc("edge", edge_el)
        ends: list[NodeId] = []
        for end in ("source", "target"):
            raw = edge_el.get(end)
            if raw is None:
                raise GraphFormatError(f"{path}: {desc} has no {end} attribute")
            if raw not in ids:
                raise GraphFormatError(f"{path}: {desc}: {end} {raw!r} is not a declared <node>")
            ends.append(ids[raw])
        attrs = dict(defaults["edge"])
        attrs.update(_read_data(path, edge_el, "edge", keys))
        attrs.pop("id", None)  # networkx writes the multigraph key both as XML id and as data
        for name in REQUIRED_EDGE_ATTRS:
            if name not in attrs:
                raise GraphFormatError(f"{path}: {desc} is missing required attribute {name!r}")
        if attrs["type"] not in EDGE_TYPES:
            raise GraphFormatError(
                f"{path}: {desc}: type {attrs['type']!r} is not one of {sorted(EDGE_TYPES)}"
            )
        key = _edge_key(path, desc, edge_el.get("id"))
        if key is not None and G.has_edge(ends[0], ends[1], key):
            key = None  # keep both; networkx assigns a fresh key
        G.add_edge(ends[0], ends[1], key=key, **attrs)
    return G


def _edge_key(path: Path, desc: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return _strict_int(raw)
    except ValueError:
        raise GraphFormatError(f"{path}: {desc}: edge id {raw!r} is not an int key") from None


def _read_data(
    path: Path, elem: ET.Element, kind: str, keys: dict[str, tuple[str, str, str]]
) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    desc = _element_desc(kind, elem)
    for data in elem.findall("g:data", _NS):
        kid = data.get("key")
        if kid not in keys:
            raise GraphFormatError(f"{path}: {desc}: <data key={kid!r}> refers to no declared <key>")
        kfor, name, ktype = keys[kid]
        if kfor not in (kind, "all"):
            raise GraphFormatError(f"{path}: {desc}: <data key={kid!r}> is declared for {kfor}, not {kind}")
        attrs[name] = _convert(path, desc, name, ktype, data.text or "")
    return attrs


def _convert(path: Path, desc: str, name: str, xml_type: str, text: str) -> Any:
    conv = _KNOWN_ATTRS.get(name, _XML_TYPES[xml_type])
    try:
        return conv(text)
    except ValueError as exc:
        raise GraphFormatError(
            f"{path}: {desc}: attribute {name!r} has malformed value {text!r} ({exc})"
        ) from None


# ----------------------------------------------------------------------------- writing


def _value_type_text(name: str, value: Any) -> tuple[str, str]:
    if isinstance(value, bool):
        return "boolean", "true" if value else "false"
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return "long", repr(int(value))
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f"):
        return "double", repr(float(value))
    if isinstance(value, str):
        return "string", value
    if isinstance(value, list | tuple):
        if name == "prompts_appeared":
            return "string", _list_text([int(v) for v in value])
        return "string", _list_text([float(v) if not isinstance(v, int) else v for v in value])
    raise GraphFormatError(f"cannot write attribute {name!r} of type {type(value).__name__}")


# The writer builds the text ElementTree would give for the tree of ``<key>``, ``<graph>``, ``<node>``,
# ``<edge>`` and ``<data>`` elements indented with ``ET.indent`` and serialized with
# ``ET.tostring(encoding="utf-8", xml_declaration=True)``, directly as strings: the same escaping
# (attribute values: & < > " CR LF TAB; text: & < >), ``<tag ... />`` for an element without text or
# children, characters UTF-8 cannot encode (lone surrogates) as character references. Building and
# serializing an element tree of a traced graph took 10 to 20 times longer than this.

_DECLARATION = "<?xml version='1.0' encoding='utf-8'?>"


def _escape_text(text: str) -> str:
    """Element text escaped as ElementTree escapes it."""
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


def _escape_attrib(text: str) -> str:
    """An attribute value escaped as ElementTree escapes it (element text's escapes, then more)."""
    text = _escape_text(text)
    if '"' in text:
        text = text.replace('"', "&quot;")
    if "\r" in text:
        text = text.replace("\r", "&#13;")
    if "\n" in text:
        text = text.replace("\n", "&#10;")
    if "\t" in text:
        text = text.replace("\t", "&#09;")
    return text


def _element(indent: str, open_tag: str, data: list[tuple[str, str]], out: list[str]) -> None:
    """Append the lines of ``<tag attrs>`` (``open_tag`` without ``<``/``>``, escaped) with ``<data>``
    children ``(key id, text)``; ``indent`` is the element's own indentation."""
    if not data:
        out.append(f"{indent}<{open_tag} />")
        return
    out.append(f"{indent}<{open_tag}>")
    inner = indent + "  "
    for kid, text in data:
        if text:
            out.append(f'{inner}<data key="{kid}">{_escape_text(text)}</data>')
        else:
            out.append(f'{inner}<data key="{kid}" />')
    out.append(f"{indent}</{open_tag.split(' ', 1)[0]}>")


def _document(keys: list[tuple[str, str, str, str]], body: list[str]) -> bytes:
    """The GraphML document: ``keys`` ``(id, for, attr.name, attr.type)`` and the ``<graph>``'s
    children (lines already indented by four spaces)."""
    lines = [_DECLARATION, f'<graphml xmlns="{_escape_attrib(GRAPHML_NS)}">']
    for kid, kind, name, xml_type in keys:
        lines.append(
            f'  <key id="{kid}" for="{kind}" attr.name="{_escape_attrib(name)}" '
            f'attr.type="{_escape_attrib(xml_type)}" />'
        )
    if body:
        lines.append('  <graph edgedefault="directed">')
        lines.extend(body)
        lines.append("  </graph>")
    else:
        lines.append('  <graph edgedefault="directed" />')
    lines.append("</graphml>")
    lines.append("")
    return "\n".join(lines).encode("utf-8", "xmlcharrefreplace")


def graph_to_xml(G: nx.MultiDiGraph) -> bytes:
    """Serialize an ACC graph as GraphML bytes (node ids as published reprs, lists as their strings)."""
    if not G.is_directed():
        raise GraphFormatError("ACC graphs are directed")
    node_keys: dict[str, str] = {}
    edge_keys: dict[str, str] = {}
    node_rows: list[tuple[str, list[tuple[str, str]]]] = []
    edge_rows: list[tuple[str, str, str | None, list[tuple[str, str]]]] = []

    def encode(attrs: dict[str, Any], declared: dict[str, str]) -> list[tuple[str, str]]:
        out = []
        for name, value in attrs.items():
            if value is None:
                continue
            xml_type, text = _value_type_text(name, value)
            if name in declared and declared[name] != xml_type:
                raise GraphFormatError(
                    f"attribute {name!r} has mixed types ({declared[name]} and {xml_type})"
                )
            declared[name] = xml_type
            out.append((name, text))
        return out

    ids: dict[Any, str] = {}
    for node, attrs in G.nodes(data=True):
        ids[node] = text = format_node_id(node)
        node_rows.append((text, encode(attrs, node_keys)))
    multi = G.is_multigraph()
    for edge in G.edges(keys=True, data=True) if multi else G.edges(data=True):
        u, v = edge[0], edge[1]
        key = edge[2] if multi else None
        attrs = {k: val for k, val in edge[-1].items() if k != "id"}
        edge_rows.append((ids[u], ids[v], None if key is None else str(key), encode(attrs, edge_keys)))

    # sorted, so that the bytes never depend on insertion order (which can follow PYTHONHASHSEED)
    node_rows.sort(key=lambda row: row[0])
    edge_rows.sort(key=lambda row: (row[0], row[1], "" if row[2] is None else row[2].zfill(12)))
    keys: list[tuple[str, str, str, str]] = []
    key_ids: dict[tuple[str, str], str] = {}
    for kind, declared in (("node", node_keys), ("edge", edge_keys)):
        for name, xml_type in declared.items():
            kid = f"d{len(key_ids)}"
            key_ids[(kind, name)] = kid
            keys.append((kid, kind, name, xml_type))
    body: list[str] = []
    for node_id, data in node_rows:
        tag = f'node id="{_escape_attrib(node_id)}"'
        _element("    ", tag, [(key_ids[("node", name)], text) for name, text in data], body)
    for src, tgt, key, data in edge_rows:
        tag = f'edge source="{_escape_attrib(src)}" target="{_escape_attrib(tgt)}"'
        if key is not None:
            tag += f' id="{_escape_attrib(key)}"'
        _element("    ", tag, [(key_ids[("edge", name)], text) for name, text in data], body)
    return _document(keys, body)


def edge_list_to_xml(edges: EdgeList) -> bytes:
    """``graph_to_xml(edges.to_graph())`` without building the ``MultiDiGraph``.

    The graph of an :class:`~attncomm.core.edge_list.EdgeList` has nodes without attributes and edges
    with ``weight`` (double) then ``type`` (string), keyed ``0, 1, ...`` per (source, target) pair in
    insertion order; its rows are sorted here with numpy. Falls back to the graph for an empty list
    or node ids that format alike (not ACC ids).
    """
    nodes, up, down, weight, kind = edges.columns()
    ids = [format_node_id(node) for node in nodes]
    if not len(up) or len(set(ids)) != len(ids):
        return graph_to_xml(edges.to_graph())
    n = len(ids)
    up_a = np.frombuffer(up, dtype=np.int64)
    down_a = np.frombuffer(down, dtype=np.int64)
    # multigraph key: the edge's occurrence number among the edges of its (source, target) pair
    pair = up_a * n + down_a
    by_pair = np.argsort(pair, kind="stable")
    sorted_pair = pair[by_pair]
    starts = np.flatnonzero(np.r_[True, sorted_pair[1:] != sorted_pair[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(pair)]))
    key = np.empty(len(pair), dtype=np.int64)
    key[by_pair] = np.arange(len(pair)) - group_start
    # rows in the order of (source id, target id, key) as graph_to_xml sorts them
    rank = np.empty(n, dtype=np.int64)
    rank[sorted(range(n), key=ids.__getitem__)] = np.arange(n)
    order = np.lexsort((key, rank[down_a], rank[up_a]))
    attr_ids = [_escape_attrib(text) for text in ids]
    kinds = {k: _escape_text(chr(k)) for k in set(kind)}
    body = [f'    <node id="{attr_ids[i]}" />' for i in sorted(range(n), key=ids.__getitem__)]
    for i, u, v, k in zip(
        order.tolist(), up_a[order].tolist(), down_a[order].tolist(), key[order].tolist(), strict=True
    ):
        text = kinds[kind[i]]
        type_line = f'      <data key="d1">{text}</data>' if text else '      <data key="d1" />'
        body.append(
            f'    <edge source="{attr_ids[u]}" target="{attr_ids[v]}" id="{k}">\n'
            f'      <data key="d0">{weight[i]!r}</data>\n{type_line}\n    </edge>'
        )
    keys = [("d0", "edge", "weight", "double"), ("d1", "edge", "type", "string")]
    return _document(keys, body)


def write_graph(G: nx.MultiDiGraph | EdgeList, path: str | Path) -> Path:
    """Write an ACC graph as GraphML atomically; reading it back gives the same ids and attributes.

    ``G`` may be a traced prompt's :class:`~attncomm.core.edge_list.EdgeList`: the file is the one its
    ``to_graph()`` would give, written without building the graph.
    """
    if isinstance(G, EdgeList):
        return atomic_write_bytes(path, edge_list_to_xml(G))
    return atomic_write_bytes(path, graph_to_xml(G))
