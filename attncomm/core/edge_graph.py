"""The edge graph: a transformer's computational graph at MIB / EAP-IG granularity, and circuit selection.

Nodes are ``input`` (the embeddings), ``a{l}.h{h}`` (attention heads), ``m{l}`` (MLPs) and ``logits``.
Every node except ``logits`` has one *output* (its write into the residual stream); every node except
``input`` has *input slots* (what it reads from the residual stream): an attention head has three,
``a{l}.h{h}<q>``, ``<k>`` and ``<v>``; an MLP and the logits have one. An edge joins the output of an
earlier node to an input slot of a later node, named ``"{parent}->{child}"`` (``"{parent}->a{l}.h{h}<q>"``
for heads). "Earlier" follows the model's dataflow: heads of layer ``l`` read the input and every node of
the layers before; the MLP of layer ``l`` also reads the heads of layer ``l`` in sequential models (GPT-2)
but not in parallel-attention models (GPT-NeoX / Pythia), whose MLP reads the same residual as the
attention; the logits read everything. GPT-2 small has 32,491 edges.

Scores and circuits are dense ``[n_forward, n_backward]`` tensors indexed as EAP-IG indexes them:
forward (output) index ``0`` is ``input``, then per layer the heads then the MLP; backward (input slot)
index per layer is the ``n_heads`` ``<q>`` slots, the ``<k>`` slots, the ``<v>`` slots, the MLP, and the
last index is ``logits``. :attr:`EdgeGraph.real` masks the pairs that are edges.

Circuit selection (all pure functions on these tensors): top-n edges, a score threshold, and EAP-IG's
greedy search from the logits backward; :func:`prune` then removes, until nothing changes, nodes with
no outgoing edge or no incoming edge (the input needs none, the logits are always kept) and the edges
of removed nodes, so every remaining edge lies on a path from the input to the logits.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from attncomm.core.user_error import AttncommError

_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")
_SLOT = re.compile(r"^(a\d+\.h\d+)<([qkv])>$")


class EdgeGraphError(AttncommError, ValueError):
    """An edge or node name that the graph does not have, or a graph of another model shape."""


@dataclass(frozen=True)
class GraphShape:
    """What fixes a model's edge graph: layers, heads, parallel attention (and ``d_model``, for MIB's cfg)."""

    n_layers: int
    n_heads: int
    parallel_attn: bool
    d_model: int = 0

    def to_cfg(self) -> dict[str, Any]:
        """The ``cfg`` block of MIB / EAP-IG's JSON (the keys EAP-IG's ``Graph.from_model`` reads)."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "parallel_attn_mlp": self.parallel_attn,
            "d_model": self.d_model,
        }

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any], where: str = "") -> GraphShape:
        """Read a MIB / EAP-IG ``cfg`` block (n_layers, n_heads, parallel_attn_mlp, d_model)."""
        try:
            return cls(
                n_layers=int(cfg["n_layers"]),
                n_heads=int(cfg["n_heads"]),
                parallel_attn=bool(cfg.get("parallel_attn_mlp", False)),
                d_model=int(cfg.get("d_model", 0) or 0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgeGraphError(
                f"{where + ': ' if where else ''}the 'cfg' block needs integer n_layers and n_heads "
                f"(and parallel_attn_mlp), got {cfg!r} ({exc})"
            ) from None

    def same_graph(self, other: GraphShape) -> bool:
        """Whether two shapes give the same edges (``d_model`` does not matter)."""
        return (self.n_layers, self.n_heads, self.parallel_attn) == (
            other.n_layers,
            other.n_heads,
            other.parallel_attn,
        )


class EdgeGraph:
    """Node and edge names and indices of one model shape (see the module docstring)."""

    def __init__(self, shape: GraphShape) -> None:
        if shape.n_layers < 1 or shape.n_heads < 1:
            raise EdgeGraphError(f"a graph needs at least one layer and one head, got {shape}")
        self.shape = shape
        L, H = shape.n_layers, shape.n_heads
        self.n_forward = 1 + L * (H + 1)
        self.n_backward = L * (3 * H + 1) + 1
        out_names = ["input"]
        for layer in range(L):
            out_names += [f"a{layer}.h{h}" for h in range(H)] + [f"m{layer}"]
        in_names: list[str] = []
        for layer in range(L):
            for letter in "qkv":
                in_names += [f"a{layer}.h{h}<{letter}>" for h in range(H)]
            in_names.append(f"m{layer}")
        in_names.append("logits")
        self.out_names: list[str] = out_names
        self.in_names: list[str] = in_names
        self.out_index: dict[str, int] = {n: i for i, n in enumerate(out_names)}
        self.in_index: dict[str, int] = {n: j for j, n in enumerate(in_names)}
        prev = torch.tensor([self._prev_index(n) for n in in_names])
        self.real: Bool[Tensor, "n_forward n_backward"] = (
            torch.arange(self.n_forward)[:, None] < prev[None, :]
        )
        #: ``owner[i, j]``: input slot ``j`` belongs to the node whose output is ``i``
        owner = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        for j, name in enumerate(in_names):
            node = self.slot_node(name)
            if node != "logits":
                owner[self.out_index[node], j] = True
        self.owner: Bool[Tensor, "n_forward n_backward"] = owner

    # ---- names ------------------------------------------------------------------------------

    def _prev_index(self, slot: str) -> int:
        """Forward indices below this bound feed the input slot ``slot``."""
        H = self.shape.n_heads
        if slot == "logits":
            return self.n_forward
        node = self.slot_node(slot)
        if node.startswith("m"):
            layer = int(node[1:])
            return 1 + layer * (H + 1) + (0 if self.shape.parallel_attn else H)
        layer = int(_HEAD.match(node).group(1))  # type: ignore[union-attr]
        return 1 + layer * (H + 1)

    @staticmethod
    def slot_node(slot: str) -> str:
        """The node an input slot belongs to: ``a0.h1<q>`` -> ``a0.h1``; ``m3`` -> ``m3``."""
        match = _SLOT.match(slot)
        return match.group(1) if match else slot

    @property
    def node_names(self) -> list[str]:
        """Every node: the outputs' owners in forward order, then ``logits``."""
        return [*self.out_names, "logits"]

    @cached_property
    def n_edges(self) -> int:
        return int(self.real.sum())

    def edge_name(self, i: int, j: int) -> str:
        """``"{parent}->{slot}"`` of the pair ``(i, j)``."""
        return f"{self.out_names[i]}->{self.in_names[j]}"

    @cached_property
    def edge_names(self) -> list[str]:
        """All edge names, row-major over the ``[n_forward, n_backward]`` grid."""
        rows, cols = torch.nonzero(self.real, as_tuple=True)
        return [self.edge_name(int(i), int(j)) for i, j in zip(rows.tolist(), cols.tolist(), strict=True)]

    def edge_index(self, name: str, where: str = "") -> tuple[int, int]:
        """``(i, j)`` of an edge name; raises :class:`EdgeGraphError` for a name this graph lacks."""
        parent, sep, child = name.partition("->")
        i = self.out_index.get(parent) if sep else None
        j = self.in_index.get(child) if sep else None
        if i is None or j is None or not bool(self.real[i, j]):
            raise EdgeGraphError(
                f"{where + ': ' if where else ''}unknown edge {name!r} for a graph with "
                f"{self.shape.n_layers} layers x {self.shape.n_heads} heads "
                f"({'parallel' if self.shape.parallel_attn else 'sequential'} attention/MLP); edges look "
                "like 'input->a0.h1<q>', 'a0.h1->m2', 'm2->logits'"
            )
        return i, j

    def node_output_index(self, node: str) -> int:
        """Forward index of a node (``input``, ``a{l}.h{h}``, ``m{l}``)."""
        if node not in self.out_index:
            raise EdgeGraphError(f"unknown node {node!r}; nodes look like 'input', 'a0.h1', 'm2'")
        return self.out_index[node]

    def empty(self) -> Bool[Tensor, "n_forward n_backward"]:
        """An edge mask with no edge."""
        return torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)

    def full(self) -> Bool[Tensor, "n_forward n_backward"]:
        """An edge mask with every edge."""
        return self.real.clone()


# ---- nodes of a circuit -----------------------------------------------------------------------


def nodes_of(graph: EdgeGraph, edges: Bool[Tensor, "n_forward n_backward"]) -> set[str]:
    """Names of the nodes touched by the edges (as parent or as the owner of a slot), logits included."""
    edges = edges & graph.real
    out = {graph.out_names[i] for i in torch.nonzero(edges.any(dim=1)).flatten().tolist()}
    for j in torch.nonzero(edges.any(dim=0)).flatten().tolist():
        out.add(graph.slot_node(graph.in_names[j]))
    return out


def prune(
    graph: EdgeGraph, edges: Bool[Tensor, "n_forward n_backward"]
) -> tuple[Bool[Tensor, "n_forward n_backward"], Bool[Tensor, " n_forward"]]:
    """Remove dangling nodes and their edges until nothing changes; return ``(edges, nodes_in_graph)``.

    A node stays if it has an outgoing edge and (unless it is ``input``) an incoming edge into any of
    its slots; ``logits`` always stays. An edge stays if its parent and its child node stay.
    """
    edges = edges & graph.real
    owner = graph.owner.to(torch.float32)
    nodes = torch.zeros(graph.n_forward, dtype=torch.bool)
    while True:
        outgoing = edges.any(dim=1)
        incoming = (owner @ edges.any(dim=0).to(torch.float32)) > 0
        incoming[0] = True
        new_nodes = outgoing & incoming
        child_alive = (new_nodes.to(torch.float32) @ owner) > 0
        child_alive[-1] = True  # logits
        new_edges = edges & new_nodes[:, None] & child_alive[None, :]
        if torch.equal(new_nodes, nodes) and torch.equal(new_edges, edges):
            return edges, nodes
        nodes, edges = new_nodes, new_edges


def _ranked(scores: Float[Tensor, "n_forward n_backward"], real: Tensor, absolute: bool) -> Tensor:
    """Flat indices of the real, scored (non-NaN) edges, best first; ties keep index order."""
    values = scores.abs() if absolute else scores
    flat = values.flatten().to(torch.float64)
    valid = (real.flatten()) & ~torch.isnan(flat)
    idx = torch.nonzero(valid).flatten()
    order = torch.sort(flat[idx], descending=True, stable=True).indices
    return idx[order]


def select_topn(
    graph: EdgeGraph, scores: Float[Tensor, "n_forward n_backward"], n: int, absolute: bool = True
) -> Bool[Tensor, "n_forward n_backward"]:
    """The ``n`` edges with the highest (absolute) scores; NaN-scored edges are never chosen."""
    if n < 0:
        raise EdgeGraphError(f"cannot select a negative number of edges ({n})")
    ranked = _ranked(scores, graph.real, absolute)[:n]
    out = torch.zeros(graph.n_forward * graph.n_backward, dtype=torch.bool)
    out[ranked] = True
    return out.view(graph.n_forward, graph.n_backward)


def select_threshold(
    graph: EdgeGraph, scores: Float[Tensor, "n_forward n_backward"], threshold: float, absolute: bool = True
) -> Bool[Tensor, "n_forward n_backward"]:
    """The edges whose (absolute) score is at least ``threshold``."""
    values = scores.abs() if absolute else scores
    return graph.real & ~torch.isnan(values) & (values >= threshold)


def select_greedy(
    graph: EdgeGraph, scores: Float[Tensor, "n_forward n_backward"], n: int, absolute: bool = True
) -> Bool[Tensor, "n_forward n_backward"]:
    """EAP-IG's greedy search: start from the edges into the logits, repeatedly take the best candidate
    edge, and when its parent joins the circuit add the parent's incoming edges to the candidates."""
    if n < 0:
        raise EdgeGraphError(f"cannot select a negative number of edges ({n})")
    values = (scores.abs() if absolute else scores).to(torch.float64)
    real = graph.real
    chosen = graph.empty()
    in_circuit = torch.zeros(graph.n_forward, dtype=torch.bool)
    heap: list[tuple[float, int, int]] = []

    def push_into(columns: list[int]) -> None:
        for j in columns:
            for i in torch.nonzero(real[:, j]).flatten().tolist():
                v = float(values[i, j])
                if v == v:  # not NaN
                    heapq.heappush(heap, (-v, i * graph.n_backward + j, i))

    push_into([graph.n_backward - 1])
    while n > 0 and heap:
        _, flat, i = heapq.heappop(heap)
        j = flat % graph.n_backward
        if chosen[i, j]:
            continue
        chosen[i, j] = True
        n -= 1
        if not in_circuit[i]:
            in_circuit[i] = True
            push_into(torch.nonzero(graph.owner[i]).flatten().tolist())
    return chosen


def budget_edges(graph: EdgeGraph, percent: float) -> int:
    """Number of edges of a budget given in percent of all edges (MIB: ``int(fraction * n_edges)``)."""
    check_budget(percent)
    return int(percent / 100.0 * graph.n_edges)


def check_budget(percent: float, option: str = "evaluate.budgets") -> None:
    """Reject a budget outside ``(0, 100]`` percent with a clear message."""
    if not (0.0 < float(percent) <= 100.0):
        raise EdgeGraphError(
            f"{option}: budget {percent!r} is outside (0, 100]; budgets are percentages of all edges, "
            "e.g. [0.1, 1, 10, 100]"
        )


def select(
    graph: EdgeGraph,
    scores: Float[Tensor, "n_forward n_backward"],
    how: str,
    value: float,
    absolute: bool = True,
    do_prune: bool = True,
) -> Bool[Tensor, "n_forward n_backward"]:
    """One entry point: ``how`` is ``topn`` / ``greedy`` (``value`` = budget in percent of all edges) or
    ``threshold`` (``value`` = minimum score); pruned unless ``do_prune`` is False."""
    if how == "topn":
        edges = select_topn(graph, scores, budget_edges(graph, value), absolute)
    elif how == "greedy":
        edges = select_greedy(graph, scores, budget_edges(graph, value), absolute)
    elif how == "threshold":
        edges = select_threshold(graph, scores, value, absolute)
    else:
        raise EdgeGraphError(f"unknown selection {how!r}; use topn, greedy or threshold")
    return prune(graph, edges)[0] if do_prune else edges


def expand_nodes(graph: EdgeGraph, nodes: set[str]) -> Bool[Tensor, "n_forward n_backward"]:
    """Every edge between the given nodes (plus ``input`` and ``logits``): a node circuit as edges."""
    unknown = sorted(n for n in nodes if n not in graph.out_index and n != "logits")
    if unknown:
        raise EdgeGraphError(f"unknown node(s) {unknown}; nodes look like 'input', 'a0.h1', 'm2'")
    keep_out = torch.zeros(graph.n_forward, dtype=torch.bool)
    for n in nodes | {"input"}:
        if n != "logits":
            keep_out[graph.out_index[n]] = True
    keep_in = (keep_out.to(torch.float32) @ graph.owner.to(torch.float32)) > 0
    keep_in[-1] = True
    return graph.real & keep_out[:, None] & keep_in[None, :]
