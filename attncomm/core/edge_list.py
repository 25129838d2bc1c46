"""A compact, append-only list of a traced prompt's edges, turned into a ``MultiDiGraph`` on demand.

Tracing a long prompt adds millions of edges (a 1023-token prompt on a random GPT-2 small: about 550
edges per firing, thousands of firings). A ``networkx.MultiDiGraph`` holds each edge in nested dicts
(about 580 bytes an edge); :class:`EdgeList` holds it in flat arrays (two node indices, a weight and a
type: 21 bytes) and interns each node id once. :meth:`EdgeList.to_graph` replays the edges in insertion
order, so the graph is exactly the one that adding them to a ``MultiDiGraph`` one by one would give
(same node order, same edge keys, same attributes).
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Iterator

import networkx as nx

__all__ = ["EdgeList"]


class EdgeList:
    """Edges ``(upstream, downstream, weight, type)`` in insertion order; node ids interned."""

    def __init__(self) -> None:
        self._index: dict[Hashable, int] = {}
        self._nodes: list[Hashable] = []
        self._up = array("q")
        self._down = array("q")
        self._weight = array("d")
        self._kind = bytearray()

    def _node(self, node: Hashable) -> int:
        idx = self._index.get(node)
        if idx is None:
            idx = len(self._nodes)
            self._index[node] = idx
            self._nodes.append(node)
        return idx

    def add(self, up: Hashable, down: Hashable, weight: float, kind: str) -> None:
        """Append the edge ``up -> down`` with ``weight`` and ``type=kind`` (one character)."""
        self._up.append(self._node(up))
        self._down.append(self._node(down))
        self._weight.append(float(weight))
        self._kind.append(ord(kind))

    def __len__(self) -> int:
        return len(self._weight)

    @property
    def n_nodes(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[tuple[Hashable, Hashable, float, str]]:
        nodes = self._nodes
        for u, v, w, k in zip(self._up, self._down, self._weight, self._kind, strict=True):
            yield nodes[u], nodes[v], w, chr(k)

    def columns(self) -> tuple[list[Hashable], array, array, array, bytearray]:
        """The edges as columns (no copies, do not modify): the node ids in interning order, then per
        edge the upstream and downstream node indices (``array('q')``), the weight (``array('d')``) and
        the type character code (``bytearray``), in insertion order."""
        return self._nodes, self._up, self._down, self._weight, self._kind

    def nbytes(self) -> int:
        """Bytes of the edge arrays (the interned node ids not counted)."""
        return sum(a.itemsize * len(a) for a in (self._up, self._down, self._weight)) + len(self._kind)

    def to_graph(self) -> nx.MultiDiGraph:
        """The ``MultiDiGraph`` of the edges, as if each had been added with ``add_edge`` in order."""
        graph = nx.MultiDiGraph()
        for up, down, weight, kind in self:
            graph.add_edge(up, down, weight=weight, type=kind)
        return graph
