"""Circuit comparison with the literature (docs/METHOD.md section 8).

A circuit is the set of ``(layer, head)`` and ``(layer, 'MLP')`` of a pruned graph's nodes. The
published table (``circuit_comparison/{model}_{task}_{th}.csv``) compares every circuit with the
canonical literature circuit ``A`` of the model/task (ACDC for GPT-2 small gp): one row block per
other literature method ``B`` and one for ACC (``Ours w/ th={th}``), with precision
``|A & B| / |B|``, recall ``|A & B| / |A|`` and F1, after removing from both sides the component
kinds the canonical method never considers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import networkx as nx
import pandas as pd

from attncomm.core.literature import (
    Component,
    available_methods,
    canonical_method,
    excluded_components,
    literature_circuit,
)
from attncomm.core.node_ids import is_root

METRICS: tuple[str, ...] = ("Precision", "Recall", "F1-Score")
COLUMNS: tuple[str, ...] = ("Method B", "Metric", "Value", "Model", "Task")


def circuit_components(G: nx.MultiDiGraph) -> set[Component]:
    """``(layer, head)`` and ``(layer, 'MLP')`` of the graph's nodes (root, AH bias, Embedding excluded)."""
    out: set[Component] = set()
    for node in G.nodes:
        if is_root(node):
            continue
        layer, comp = node[0], node[1]
        if isinstance(comp, int) or comp == "MLP":
            out.add((int(layer), comp))
    return out


def _kind(component: Component) -> str:
    return "head" if isinstance(component[1], int) else str(component[1])


def precision_recall_f1(
    reference: set[Component], ours: set[Component], excluded: Iterable[str]
) -> dict[str, float]:
    """Precision ``|A&B|/|B|``, recall ``|A&B|/|A|`` and F1 of ``ours`` (B) against ``reference`` (A).

    Components whose kind (``MLP``, ``AH bias``, ``Embedding``) is in ``excluded`` are removed from
    both sides first; an empty denominator gives 0.
    """
    drop = set(excluded)
    a = {c for c in reference if _kind(c) not in drop}
    b = {c for c in ours if _kind(c) not in drop}
    inter = len(a & b)
    precision = inter / len(b) if b else 0.0
    recall = inter / len(a) if a else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"Precision": precision, "Recall": recall, "F1-Score": f1}


def ours_label(threshold: float) -> str:
    """Row label of the ACC circuit, e.g. ``Ours w/ th=0.2``."""
    return f"Ours w/ th={round(float(threshold), 10)!r}"


def compare_with_literature(
    G: nx.MultiDiGraph,
    model: str,
    task: str,
    circuits_data: dict[str, Any],
    methods: Iterable[str] | None = None,
    threshold: float = 0.2,
) -> pd.DataFrame:
    """The published comparison table for the pruned graph ``G`` (pruned at ``threshold``).

    Rows: for each metric (Precision, Recall, F1-Score), one row per literature method in
    ``methods`` (default: every method except the canonical one) and one for ours, each compared
    with the canonical circuit; columns ``Method B, Metric, Value, Model, Task``.
    """
    reference_method = canonical_method(circuits_data, model, task)
    reference = literature_circuit(circuits_data, model, task, reference_method)
    excluded = excluded_components(circuits_data, task, reference_method)
    if methods is None:
        methods = [m for m in available_methods(circuits_data, model, task) if m != reference_method]
    compared: list[tuple[str, set[Component]]] = [
        (m, literature_circuit(circuits_data, model, task, m)) for m in methods
    ]
    compared.append((ours_label(threshold), circuit_components(G)))
    scores = {name: precision_recall_f1(reference, circuit, excluded) for name, circuit in compared}
    rows = [
        {"Method B": name, "Metric": metric, "Value": scores[name][metric], "Model": model, "Task": task}
        for metric in METRICS
        for name, _ in compared
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))
