"""Unifying per-prompt traced graphs into combined graphs (docs/METHOD.md section 6).

Threshold values: the reference generated ``0.1 .. 0.9`` with ``np.arange(0.1, 1.0, 0.1)`` (so
``0.30000000000000004`` and ``0.7000000000000001``), filtered with ``n_appearences >=
round(th * n_traced)`` (Python's half-to-even ``round``) and named the files with the rounded
values (the published names read ``combined_0.3``). :func:`filter_value` maps a configured
threshold to that arange float. With the published N = 100 no count depends on the difference
(``round(30.000000000000004) == 30``), but with e.g. 15 traced prompts ``0.3 * 15 = 4.5`` rounds to
4 while ``0.30000000000000004 * 15`` rounds to 5, so we reproduce the arange floats.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import networkx as nx
import numpy as np
from tqdm.auto import tqdm

from attncomm.core.node_ids import NodeId

log = logging.getLogger(__name__)

#: the published thresholds (0.0, the unfiltered graph, is always written as well)
PUBLISHED_THRESHOLDS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: the reference's threshold floats: two literals and ``np.arange(0.1, 1.0, 0.1)``
_REFERENCE_FLOATS: tuple[float, ...] = (0.01, 0.05, *(float(x) for x in np.arange(0.1, 1.0, 0.1)))


def filter_value(th: float) -> float:
    """The float the reference filtered with for the configured threshold ``th`` (its np.arange twin).

    A threshold that rounds (to 10 decimals) to one of the published values is replaced by the
    reference's float; any other threshold is used as given.
    """
    for ref in _REFERENCE_FLOATS:
        if round(ref, 10) == round(float(th), 10):
            return ref
    return float(th)


def min_appearances(th: float, n_traced: int) -> int:
    """Minimum ``n_appearences`` a node needs at threshold ``th``: ``round(filter_value(th) * n)``."""
    return round(filter_value(th) * n_traced)


def combine(graphs: Mapping[int, nx.MultiDiGraph]) -> nx.MultiDiGraph:
    """Add every prompt's edges into one graph, one edge per ``(u, v, type)``, unfiltered.

    ``weight`` is summed then divided by the number of prompts, ``prompts_appeared`` is the
    ascending list of prompt ids, and nodes get ``n_appearences`` (prompts containing them).
    """
    n_traced = len(graphs)
    if n_traced == 0:
        raise ValueError("cannot unify an empty set of traced graphs")
    weights: dict[tuple[NodeId, NodeId, str], float] = {}
    prompts: dict[tuple[NodeId, NodeId, str], list[int]] = {}
    node_counts: dict[NodeId, int] = {}
    for prompt in tqdm(sorted(graphs), desc="unify", unit="prompt", leave=False):
        G = graphs[prompt]
        for node in G.nodes:
            node_counts[node] = node_counts.get(node, 0) + 1
        seen: set[tuple[NodeId, NodeId, str]] = set()
        for u, v, data in G.edges(data=True):
            key = (u, v, data["type"])
            weights[key] = weights.get(key, 0.0) + float(data["weight"])
            if key not in seen:
                prompts.setdefault(key, []).append(int(prompt))
                seen.add(key)
    combined = nx.MultiDiGraph()
    for node, count in node_counts.items():
        combined.add_node(node, n_appearences=count)
    for (u, v, etype), total in weights.items():
        combined.add_edge(u, v, weight=total / n_traced, type=etype, prompts_appeared=prompts[(u, v, etype)])
    return combined


def filter_by_appearances(combined: nx.MultiDiGraph, th: float, n_traced: int) -> nx.MultiDiGraph:
    """Keep nodes with ``n_appearences >= round(th * n_traced)`` (see :func:`min_appearances`), then
    drop degree-0 nodes."""
    need = min_appearances(th, n_traced)
    kept = [n for n, count in combined.nodes(data="n_appearences") if count >= need]
    G = combined.subgraph(kept).copy()
    G.remove_nodes_from([n for n, deg in list(G.degree()) if deg == 0])
    return G


def unify(graphs: Mapping[int, nx.MultiDiGraph], thresholds: Iterable[float]) -> dict[float, nx.MultiDiGraph]:
    """Combined graphs by threshold: ``0.0`` is the unfiltered graph, every other the filtered one.

    ``graphs`` maps prompt id to that prompt's traced graph; the number of traced prompts is
    ``len(graphs)``.
    """
    combined = combine(graphs)
    out: dict[float, nx.MultiDiGraph] = {0.0: combined}
    for th in thresholds:
        th = float(th)
        if th < 0 or th > 1:
            raise ValueError(f"unify threshold {th} is outside [0, 1]")
        if th == 0.0:
            continue
        out[th] = filter_by_appearances(combined, th, len(graphs))
        log.debug(
            "combined graph at %s: %d nodes, %d edges",
            th,
            out[th].number_of_nodes(),
            out[th].number_of_edges(),
        )
    return out
