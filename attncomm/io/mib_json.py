"""MIB / EAP-IG circuit JSON: read and write edge scores and circuits so either side can score the other's.

The format (EAP-IG's ``Graph.to_json``, used by MIB's circuit-localization track)::

    {"cfg": {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": false, "d_model": 768},
     "nodes": {"input": {"in_graph": true}, "a0.h1": {"in_graph": true, "score": 0.3}, ...,
               "logits": {"in_graph": true}},
     "edges": {"input->a0.h1<q>": {"score": 0.12, "in_graph": true}, "a0.h1->m0": {...}, ...}}

Older EAP-IG files give a node as a plain boolean (``"a0.h1": true``); both are read. attncomm adds an
optional top-level ``"attncomm"`` block (method, model, task, settings) that EAP-IG ignores. Edges a
file does not list get a NaN score and are out of the circuit; a NaN score is written as ``null``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from attncomm.core.edge_graph import EdgeGraph, EdgeGraphError, GraphShape, nodes_of
from attncomm.errors import AttncommError
from attncomm.io.artifacts import atomic_write_text


class CircuitFileError(AttncommError, ValueError):
    """A circuit JSON file that is malformed, for another model shape, or names unknown edges."""


@dataclass
class EdgeCircuit:
    """Edge scores and a circuit on one edge graph (what a MIB JSON file holds)."""

    graph: EdgeGraph
    scores: Float[Tensor, "n_forward n_backward"]  # float64; NaN = not scored
    in_graph: Bool[Tensor, "n_forward n_backward"]
    node_scores: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nodes_in_graph(self) -> Bool[Tensor, " n_forward"]:
        """Nodes (forward order) that an edge of the circuit leaves or enters; ``input`` always."""
        touched = nodes_of(self.graph, self.in_graph)
        out = torch.tensor([n in touched for n in self.graph.out_names])
        out[0] = True
        return out

    @property
    def n_edges(self) -> int:
        return int((self.in_graph & self.graph.real).sum())


def _float_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def to_mib_dict(circuit: EdgeCircuit) -> dict[str, Any]:
    """The JSON-ready dict of a circuit (edges in the graph's row-major order)."""
    g = circuit.graph
    scores = circuit.scores.to(torch.float64)
    in_graph = circuit.in_graph & g.real
    nodes_alive = circuit.nodes_in_graph
    nodes: dict[str, Any] = {}
    for i, name in enumerate(g.out_names):
        entry: dict[str, Any] = {"in_graph": bool(nodes_alive[i])}
        if name in circuit.node_scores:
            entry["score"] = float(circuit.node_scores[name])
        nodes[name] = entry
    nodes["logits"] = {"in_graph": True}
    edges: dict[str, Any] = {}
    rows, cols = torch.nonzero(g.real, as_tuple=True)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        edges[g.edge_name(i, j)] = {
            "score": _float_or_none(float(scores[i, j])),
            "in_graph": bool(in_graph[i, j]),
        }
    out: dict[str, Any] = {"cfg": g.shape.to_cfg(), "nodes": nodes, "edges": edges}
    if circuit.meta:
        out["attncomm"] = circuit.meta
    return out


def write_mib_json(circuit: EdgeCircuit, path: str | Path) -> Path:
    """Write the circuit as MIB / EAP-IG JSON (atomically); returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(to_mib_dict(circuit)))
    return path


def from_mib_dict(data: Any, where: str = "", expected: GraphShape | None = None) -> EdgeCircuit:
    """Parse a MIB / EAP-IG dict; ``expected`` (the model's shape) rejects a file for another model."""
    prefix = f"{where}: " if where else ""
    if not isinstance(data, dict) or not {"cfg", "nodes", "edges"} <= set(data):
        raise CircuitFileError(
            f"{prefix}not a MIB / EAP-IG circuit file: it needs the keys 'cfg', 'nodes' and 'edges'"
        )
    if not isinstance(data["cfg"], dict) or not isinstance(data["edges"], dict):
        raise CircuitFileError(f"{prefix}'cfg' and 'edges' must be JSON objects")
    try:
        shape = GraphShape.from_cfg(data["cfg"], where)
    except EdgeGraphError as exc:
        raise CircuitFileError(str(exc)) from None
    if expected is not None and not shape.same_graph(expected):
        raise CircuitFileError(
            f"{prefix}the circuit is for a model with {shape.n_layers} layers x {shape.n_heads} heads "
            f"(parallel_attn_mlp={shape.parallel_attn}), but this model has {expected.n_layers} layers x "
            f"{expected.n_heads} heads (parallel_attn_mlp={expected.parallel_attn}); use a circuit file "
            "written for this model"
        )
    if expected is not None and expected.d_model:
        shape = GraphShape(shape.n_layers, shape.n_heads, shape.parallel_attn, expected.d_model)
    g = EdgeGraph(shape)
    scores = torch.full((g.n_forward, g.n_backward), float("nan"), dtype=torch.float64)
    in_graph = g.empty()
    unknown: list[str] = []
    for name, info in data["edges"].items():
        try:
            i, j = g.edge_index(name)
        except EdgeGraphError:
            unknown.append(name)
            continue
        if not isinstance(info, dict):
            raise CircuitFileError(f"{prefix}edge {name!r}: expected {{'score': ..., 'in_graph': ...}}")
        score = info.get("score")
        try:
            scores[i, j] = float("nan") if score is None else float(score)
        except (TypeError, ValueError):
            raise CircuitFileError(f"{prefix}edge {name!r}: score {score!r} is not a number") from None
        in_graph[i, j] = bool(info.get("in_graph", False))
    if unknown:
        raise CircuitFileError(
            f"{prefix}{len(unknown)} unknown edge name(s) for a {shape.n_layers}-layer, {shape.n_heads}-head "
            f"graph, e.g. {unknown[:3]}; edge names look like 'input->a0.h1<q>', 'a0.h1->m2', 'm2->logits'"
        )
    node_scores: dict[str, float] = {}
    nodes = data["nodes"]
    if not isinstance(nodes, dict):
        raise CircuitFileError(f"{prefix}'nodes' must be a JSON object")
    for name, info in nodes.items():
        if name != "logits" and name not in g.out_index:
            raise CircuitFileError(
                f"{prefix}unknown node {name!r}; nodes look like 'input', 'a0.h1', 'm2', 'logits'"
            )
        if isinstance(info, dict) and info.get("score") is not None:
            node_scores[name] = float(info["score"])
    meta = data.get("attncomm") or {}
    return EdgeCircuit(g, scores, in_graph, node_scores, dict(meta) if isinstance(meta, dict) else {})


def read_mib_json(path: str | Path, expected: GraphShape | None = None) -> EdgeCircuit:
    """Read a MIB / EAP-IG circuit JSON file (see :func:`from_mib_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise CircuitFileError(f"circuit file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CircuitFileError(f"{path}: not valid JSON ({exc})") from None
    return from_mib_dict(data, str(path), expected)
