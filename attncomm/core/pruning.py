"""Pruning the intervention graph by causal effect (docs/METHOD.md section 7, pruning half).

An edge into the root is always kept; any other edge is kept when it appeared in at least
``n_min`` prompts and ``|mean(logit_diff)| >= th``. Degree-0 nodes and every weakly connected
component without the root are then dropped, and each kept edge gets ``norm_weight`` (its weight
over the sum of the weights of same-type edges into its target, in the pruned graph) and
``abs_avg_logit_diff``. Edges into the root carry no ``logit_diff``; like the published pruned
graphs they get ``abs_avg_logit_diff = ROOT_ABS_AVG_LOGIT_DIFF`` (2.0), a display value only.
"""

from __future__ import annotations

import logging

import networkx as nx
import numpy as np

from attncomm.core.node_ids import GraphFormatError, format_node_id, root_of

log = logging.getLogger(__name__)

#: ``abs_avg_logit_diff`` the published pruned graphs give to edges into the root (no logit_diff)
ROOT_ABS_AVG_LOGIT_DIFF = 2.0


def prune_thresholds(step: float = 0.05) -> list[float]:
    """Pruning thresholds ``0, step, .., 1`` (inclusive), rounded to 10 decimals for clean file names."""
    if not 0 < step <= 1:
        raise ValueError(f"prune step must be in (0, 1], got {step}")
    n = int(round(1.0 / step))
    if not np.isclose(n * step, 1.0):
        raise ValueError(f"prune step {step} does not divide 1")
    return [round(i * step, 10) for i in range(n + 1)]


def abs_avg_logit_diff(logit_diff: list[float]) -> float:
    """``|mean(logit_diff)|`` (NaN for an empty list)."""
    if len(logit_diff) == 0:
        return float("nan")
    return float(abs(np.mean(np.asarray(logit_diff, dtype=np.float64))))


def prune(G: nx.MultiDiGraph, th: float, n_min: int) -> nx.MultiDiGraph:
    """Prune an intervention graph at logit-difference threshold ``th`` with ``n_min`` prompts.

    The input is not modified; the result holds the kept nodes and edges with their attributes
    plus ``norm_weight`` and ``abs_avg_logit_diff``.
    """
    root = root_of(G)
    H = nx.MultiDiGraph()
    H.add_nodes_from(G.nodes(data=True))
    for u, v, key, data in G.edges(keys=True, data=True):
        if v == root:
            keep, effect = True, ROOT_ABS_AVG_LOGIT_DIFF
        else:
            for name in ("logit_diff", "prompts_appeared"):
                if name not in data:
                    raise GraphFormatError(
                        f"<edge source={format_node_id(u)!r} target={format_node_id(v)!r}> has no {name!r}: "
                        "prune needs the intervention graph"
                    )
            effect = abs_avg_logit_diff(data["logit_diff"])
            keep = len(data["prompts_appeared"]) >= n_min and effect >= th
        if keep:
            H.add_edge(u, v, key=key, **data)
            H.edges[u, v, key]["abs_avg_logit_diff"] = effect
    H.remove_nodes_from([n for n, deg in list(H.degree()) if deg == 0 and n != root])
    rooted = nx.node_connected_component(H.to_undirected(as_view=True), root)
    H.remove_nodes_from([n for n in list(H.nodes) if n not in rooted])
    _add_norm_weight(H)
    log.debug(
        "pruned at th=%s n_min=%d: %d nodes, %d edges", th, n_min, H.number_of_nodes(), H.number_of_edges()
    )
    return H


def _add_norm_weight(H: nx.MultiDiGraph) -> None:
    totals: dict[tuple[object, str], float] = {}
    for _, v, data in H.edges(data=True):
        totals[(v, data["type"])] = totals.get((v, data["type"]), 0.0) + float(data["weight"])
    for _, v, data in H.edges(data=True):
        total = totals[(v, data["type"])]
        data["norm_weight"] = float(data["weight"]) / total if total != 0 else float("nan")
