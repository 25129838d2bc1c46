"""ACC's graphs mapped onto the edge graph, so ACC circuits are scored like EAP's.

ACC's nodes are head firings ``(layer, head, dest_label, src_label)``, contributors ``(layer, 'MLP' |
'Embedding' | 'AH bias', dest_label, src_label)`` and the task-direction root ``(name, label)``; an edge
``u -> v`` of type ``"d"`` says ``u`` writes what head ``v`` reads on its destination (query) side, type
``"s"`` on its source (key) side. The mapping, position labels dropped:

- ``u -> head (l, h)`` type ``d`` becomes ``u' -> a{l}.h{h}<q>``, type ``s`` becomes ``u' -> a{l}.h{h}<k>``;
- ``u -> root`` becomes ``u' -> logits`` (the task direction is read from the final residual);
- ``u'`` is ``a{l}.h{h}`` for a head, ``m{l}`` for an MLP, ``input`` for the embedding;
- ``AH bias`` (a layer's attention output bias) is a constant, not a node of the edge graph: its edges
  are dropped (counted in the report).

ACC has no counterpart for value paths (``<v>`` slots: ACC explains where a head attends, not what it
moves) nor for MLP inputs (MLPs are contributors, never traced into). :func:`complete_untraced_slots`
gives a circuit those inputs from every earlier circuit node (``evaluate.acc_untraced=complete``, the
default), so an ACC circuit's heads move their values and its MLPs compute as in the model; with
``ablate`` they are ablated like any missing edge (a strict reading of the ACC circuit).

Several ACC edges (different positions) can map to one edge; the edge's score is the largest of
theirs. An ACC edge's score is its intervention effect ``abs_avg_logit_diff`` (``|mean logit_diff|``),
else ``|weight|``; edges into the root carry ACC's display value 2.0 as in the pruned graphs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import networkx as nx
import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from attncomm.core.edge_graph import EdgeGraph
from attncomm.core.node_ids import is_root

#: score of an edge into the root (ACC's pruned graphs give these edges abs_avg_logit_diff = 2.0)
ROOT_SCORE = 2.0


def acc_node_name(node: Any) -> str | None:
    """The edge-graph node of an ACC upstream node (None for an attention bias or the root)."""
    if is_root(node):
        return None
    layer, comp = int(node[0]), node[1]
    if isinstance(comp, int):
        return f"a{layer}.h{comp}"
    if comp == "MLP":
        return f"m{layer}"
    if comp == "Embedding":
        return "input"
    return None


def acc_edge_score(attrs: dict[str, Any], into_root: bool) -> float:
    """An ACC edge's ranking score (see the module docstring)."""
    if "abs_avg_logit_diff" in attrs and not into_root:
        return float(attrs["abs_avg_logit_diff"])
    diffs = attrs.get("logit_diff")
    if diffs is not None and len(diffs):
        return float(abs(np.mean(np.asarray(diffs, dtype=np.float64))))
    if into_root:
        return ROOT_SCORE
    return float(abs(float(attrs.get("weight", 0.0))))


def map_acc_graph(
    graph: EdgeGraph, G: nx.MultiDiGraph
) -> tuple[Float[Tensor, "n_forward n_backward"], Bool[Tensor, "n_forward n_backward"], dict[str, int]]:
    """``(scores, edges, report)`` of an ACC graph on the edge graph.

    ``scores`` is NaN where no ACC edge maps; ``edges`` marks the mapped edges; ``report`` counts the
    ACC edges ``mapped``, ``dropped_bias`` (attention-bias contributors), ``dropped_other`` (a
    downstream node that is not a head or the root, or a pair that is not an edge of this model).
    """
    scores = torch.full((graph.n_forward, graph.n_backward), float("nan"), dtype=torch.float64)
    report: Counter[str] = Counter()
    for u, v, attrs in G.edges(data=True):
        parent = acc_node_name(u)
        if parent is None:
            report["dropped_bias" if not is_root(u) and u[1] == "AH bias" else "dropped_other"] += 1
            continue
        into_root = is_root(v)
        if into_root:
            slot = "logits"
        elif isinstance(v[1], int):
            letter = {"d": "q", "s": "k"}.get(str(attrs.get("type")))
            if letter is None:
                report["dropped_other"] += 1
                continue
            slot = f"a{int(v[0])}.h{v[1]}<{letter}>"
        else:
            report["dropped_other"] += 1
            continue
        i, j = graph.out_index.get(parent), graph.in_index.get(slot)
        if i is None or j is None or not bool(graph.real[i, j]):
            report["dropped_other"] += 1
            continue
        score = acc_edge_score(attrs, into_root)
        old = float(scores[i, j])
        scores[i, j] = score if old != old else max(old, score)
        report["mapped"] += 1
    edges = ~torch.isnan(scores) & graph.real
    report["edges"] = int(edges.sum())
    return scores, edges, dict(report)


def complete_untraced_slots(
    graph: EdgeGraph, edges: Bool[Tensor, "n_forward n_backward"]
) -> Bool[Tensor, "n_forward n_backward"]:
    """Add, for every head and MLP of the circuit, the edges into its ``<v>`` / MLP slot from every
    earlier node of the circuit (input included): the inputs ACC does not trace."""
    edges = edges & graph.real
    members = edges.any(dim=1) | (graph.owner.to(torch.float32) @ edges.any(dim=0).to(torch.float32) > 0)
    members[0] = True
    untraced = torch.tensor([n.endswith("<v>") or n.startswith("m") for n in graph.in_names])
    owned = (members.to(torch.float32) @ graph.owner.to(torch.float32)) > 0
    cols = untraced & owned
    return edges | (graph.real & members[:, None] & cols[None, :])
