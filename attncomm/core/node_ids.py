"""ACC graph node ids: format and literal parse (never ``eval``), the root, and edge tables.

Node ids are the published Python-literal tuples: heads ``(layer, head, dest_label, src_label)``, other
components ``(layer, 'MLP'|'AH bias'|'Embedding', dest_label, src_label)`` and the root
``(direction_name, label)``. Ids come from untrusted files, so they are parsed by walking their AST and
accepting only those shapes. File I/O of graphs lives in :mod:`attncomm.io.graphml`.
"""

from __future__ import annotations

import ast
from typing import Any

import networkx as nx

from attncomm.core.types import COMPONENT_KINDS, NodeId
from attncomm.core.user_error import AttncommError

__all__ = [
    "COMPONENT_KINDS",
    "GraphFormatError",
    "NodeId",
    "NodeIdError",
    "edge_table",
    "format_node_id",
    "is_root",
    "parse_node_id",
    "root_of",
]

_MAX_ID_LEN = 1000
#: bound of layer and head indices in a node id (a model's own shape is checked where it is known)
_MAX_INDEX = 100_000


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
