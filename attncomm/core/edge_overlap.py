"""Overlap of two edge circuits at node and edge level: precision, recall and F1 of ``B`` against ``A``.

``A`` is the reference: precision ``|A & B| / |B|``, recall ``|A & B| / |A|``, F1 their harmonic mean,
0 for an empty denominator (as :mod:`attncomm.core.circuit_overlap` does for the paper's node table).
Nodes are the heads and MLPs a circuit touches (``input`` and ``logits`` are in every circuit and are not
counted); edges are the circuit's edges.
"""

from __future__ import annotations

from jaxtyping import Bool
from torch import Tensor

from attncomm.core.edge_graph import EdgeGraph, nodes_of

LEVELS: tuple[str, ...] = ("node", "edge")


def circuit_items(graph: EdgeGraph, edges: Bool[Tensor, "n_forward n_backward"], level: str) -> set[str]:
    """The node names (heads, MLPs) or edge names of a circuit."""
    if level == "node":
        return nodes_of(graph, edges) - {"input", "logits"}
    if level == "edge":
        rows = (edges & graph.real).nonzero().tolist()
        return {graph.edge_name(i, j) for i, j in rows}
    raise ValueError(f"unknown level {level!r}; use one of {LEVELS}")


def overlap_scores(reference: set[str], other: set[str]) -> dict[str, float]:
    """Precision, recall and F1 of ``other`` against ``reference`` plus both sizes and the intersection."""
    inter = len(reference & other)
    precision = inter / len(other) if other else 0.0
    recall = inter / len(reference) if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "size_a": float(len(reference)),
        "size_b": float(len(other)),
        "intersection": float(inter),
    }


def compare_circuits(
    graph: EdgeGraph,
    a: Bool[Tensor, "n_forward n_backward"],
    b: Bool[Tensor, "n_forward n_backward"],
) -> dict[str, dict[str, float]]:
    """``{level: overlap_scores}`` of circuit ``b`` against reference ``a`` at node and edge level."""
    return {
        level: overlap_scores(circuit_items(graph, a, level), circuit_items(graph, b, level))
        for level in LEVELS
    }
