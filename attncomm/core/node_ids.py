"""ACC graph format: node ids (format + literal parse, never ``eval``) and GraphML read/write.

Node ids are the published Python-literal tuples (ACC-METHOD.md sections 4-5): heads
``(layer, head, dest_label, src_label)``, other components ``(layer, 'MLP'|'AH bias'|'Embedding',
dest_label, src_label)`` and the root ``(direction_name, label)``. GraphML files are untrusted input:
ids are parsed by walking their AST and accepting only those shapes, and every attribute is
converted to its documented type (``weight`` float, ``type`` str, ``n_appearences`` int,
``prompts_appeared`` list[int], ``logit_diff`` list[float]).
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import networkx as nx

from attncomm.core.crashpoints import before_commit
from attncomm.errors import AttncommError

#: ``(layer, head|'MLP'|'AH bias'|'Embedding', dest_label, src_label)`` or the root ``(name, label)``
NodeId: TypeAlias = tuple[int, int | str, str, str] | tuple[str, str]

#: non-head components of a node id
COMPONENT_KINDS: frozenset[str] = frozenset({"MLP", "AH bias", "Embedding"})

GRAPHML_NS = "http://graphml.graphdrawing.org/xmlns"
_NS = {"g": GRAPHML_NS}
_MAX_ID_LEN = 1000
#: bound of layer and head indices in a node id (a model's own shape is checked where it is known)
_MAX_INDEX = 100_000
#: GraphML files above this size (MiB) are refused unless ATTNCOMM_MAX_GRAPHML_MB raises the limit
MAX_GRAPHML_MB = 256

#: edge attributes every ACC graph carries
REQUIRED_EDGE_ATTRS: tuple[str, ...] = ("weight", "type")
EDGE_TYPES: frozenset[str] = frozenset({"d", "s"})

_TRACED_NAME = re.compile(
    r"^(?P<model>.+)_(?P<task>[^_]+)_n(?P<n>\d+)_(?P<prompt>\d+)_(?P<seed>\d+)\.graphml$"
)


class NodeIdError(AttncommError, ValueError):
    """A node id that is not one of the published tuple shapes."""


class GraphFormatError(AttncommError, ValueError):
    """A GraphML file that is not a valid ACC graph (missing or malformed attribute, bad structure)."""


# ----------------------------------------------------------------------------- node ids


def _where(where: str) -> str:
    return f"{where}: " if where else ""


def parse_node_id(text: str, where: str = "") -> NodeId:
    """Parse a published node id string into its tuple, accepting only the published shapes.

    ``where`` (e.g. the file name) is put in the error message; anything else raises
    :class:`NodeIdError`.
    """

    def fail(problem: str) -> NodeIdError:
        return NodeIdError(f"{_where(where)}malformed node id {text!r}: {problem}")

    if not isinstance(text, str):
        raise fail(f"expected a string, got {type(text).__name__}")
    if len(text) > _MAX_ID_LEN:
        raise fail(f"longer than {_MAX_ID_LEN} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise fail(f"not a Python literal ({exc.__class__.__name__})") from None
    body = tree.body
    if not isinstance(body, ast.Tuple):
        raise fail("expected a tuple literal")
    values: list[Any] = []
    for elt in body.elts:
        if not isinstance(elt, ast.Constant) or type(elt.value) not in (int, str):
            raise fail("tuple elements must be plain int or str literals")
        values.append(elt.value)
    if len(values) == 2:
        if not all(isinstance(v, str) for v in values):
            raise fail("a root id is (str, str)")
        return (values[0], values[1])
    if len(values) == 4:
        layer, comp, dest, src = values
        if not isinstance(layer, int) or not 0 <= layer < _MAX_INDEX:
            raise fail(f"the layer must be an int in [0, {_MAX_INDEX})")
        if isinstance(comp, int):
            if not 0 <= comp < _MAX_INDEX:
                raise fail(f"the head index must be an int in [0, {_MAX_INDEX})")
        elif comp not in COMPONENT_KINDS:
            raise fail(f"the component must be a head index or one of {sorted(COMPONENT_KINDS)}")
        if not isinstance(dest, str) or not isinstance(src, str):
            raise fail("the dest and source labels must be str")
        return (layer, comp, dest, src)
    raise fail(f"expected 4 elements (component) or 2 (root), got {len(values)}")


def format_node_id(node: NodeId) -> str:
    """Format a node id as the published Python repr with plain ints, e.g. ``(9, 6, 'end', 'IO')``."""
    if not isinstance(node, tuple) or len(node) not in (2, 4):
        raise NodeIdError(f"cannot format node id {node!r}: expected a 2- or 4-tuple")
    parts: list[str] = []
    for value in node:
        if isinstance(value, str):
            parts.append(repr(value))
        elif isinstance(value, bool):
            raise NodeIdError(f"cannot format node id {node!r}: bool element")
        else:
            try:
                parts.append(repr(int(value)))  # numpy ints print as np.int64(3) otherwise
            except (TypeError, ValueError):
                raise NodeIdError(f"cannot format node id {node!r}: element {value!r}") from None
    return "(" + ", ".join(parts) + ")"


def is_root(node: NodeId) -> bool:
    """True for the task-direction root ``(name, label)``."""
    return len(node) == 2


def root_of(G: nx.MultiDiGraph) -> NodeId:
    """The graph's root node (the one 2-tuple); raises :class:`GraphFormatError` if not exactly one."""
    roots = [n for n in G.nodes if is_root(n)]
    if len(roots) != 1:
        raise GraphFormatError(f"expected exactly one root node (name, label), found {len(roots)}: {roots}")
    return roots[0]


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

    for node, attrs in G.nodes(data=True):
        node_rows.append((format_node_id(node), encode(attrs, node_keys)))
    multi = G.is_multigraph()
    for edge in G.edges(keys=True, data=True) if multi else G.edges(data=True):
        u, v = edge[0], edge[1]
        key = edge[2] if multi else None
        attrs = {k: val for k, val in edge[-1].items() if k != "id"}
        edge_rows.append(
            (
                format_node_id(u),
                format_node_id(v),
                None if key is None else str(key),
                encode(attrs, edge_keys),
            )
        )

    # sorted, so that the bytes never depend on insertion order (which can follow PYTHONHASHSEED)
    node_rows.sort(key=lambda row: row[0])
    edge_rows.sort(key=lambda row: (row[0], row[1], "" if row[2] is None else row[2].zfill(12)))
    root = ET.Element("graphml", {"xmlns": GRAPHML_NS})
    key_ids: dict[tuple[str, str], str] = {}
    for kind, declared in (("node", node_keys), ("edge", edge_keys)):
        for name, xml_type in declared.items():
            kid = f"d{len(key_ids)}"
            key_ids[(kind, name)] = kid
            ET.SubElement(root, "key", {"id": kid, "for": kind, "attr.name": name, "attr.type": xml_type})
    graph_el = ET.SubElement(root, "graph", {"edgedefault": "directed"})
    for node_id, data in node_rows:
        el = ET.SubElement(graph_el, "node", {"id": node_id})
        for name, text in data:
            ET.SubElement(el, "data", {"key": key_ids[("node", name)]}).text = text
    for src, tgt, key, data in edge_rows:
        attrib = {"source": src, "target": tgt}
        if key is not None:
            attrib["id"] = key
        el = ET.SubElement(graph_el, "edge", attrib)
        for name, text in data:
            ET.SubElement(el, "data", {"key": key_ids[("edge", name)]}).text = text
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    mask = os.umask(0o022)  # mkstemp makes 0600: give the file what the user's umask gives new files
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        before_commit()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_graph(G: nx.MultiDiGraph, path: str | Path) -> Path:
    """Write an ACC graph as GraphML atomically; reading it back gives the same ids and attributes."""
    return atomic_write_bytes(path, graph_to_xml(G))


# ----------------------------------------------------------------------------- comparison helpers


def edge_table(G: nx.MultiDiGraph) -> dict[tuple[NodeId, NodeId, str], dict[str, Any]]:
    """Edges keyed by ``(source, target, type)`` (unique in ACC graphs); raises on duplicates."""
    table: dict[tuple[NodeId, NodeId, str], dict[str, Any]] = {}
    for u, v, data in G.edges(data=True):
        key = (u, v, data["type"])
        if key in table:
            raise GraphFormatError(
                f"duplicate edge {format_node_id(u)} -> {format_node_id(v)} type {data['type']!r}"
            )
        table[key] = data
    return table
