"""Where edge circuits live and how a named circuit is loaded: a method's edges JSON, a literature circuit
expanded to edges, or a MIB / EAP-IG JSON file.

Files, per run directory: ``circuits/{method}/{model}_{task}_edges.json`` (every edge's score and the
method's circuit, MIB JSON) and ``circuits/{method}/{model}_{task}_faithfulness.csv`` (the curve, CPR,
CMD).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attncomm.core.edge_graph import EdgeGraph, GraphShape, expand_nodes
from attncomm.errors import ConfigError
from attncomm.io.circuits_data import excluded_components, literature_circuit
from attncomm.io.mib_json import EdgeCircuit, read_mib_json

#: methods of ``stage=discover``
METHOD_NAMES: tuple[str, ...] = ("eap", "eap-ig", "exact", "acc")


def check_method(name: str) -> str:
    """Reject an unknown method name with the valid ones."""
    if name not in METHOD_NAMES:
        raise ConfigError(f"method={name!r} is not one of {', '.join(METHOD_NAMES)} (e.g. method=eap)")
    return name


def method_dir(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / "circuits" / method


def edges_json(run_dir: Path, method: str, model: str, task: str) -> Path:
    """``circuits/{method}/{model}_{task}_edges.json``."""
    return method_dir(run_dir, method) / f"{model}_{task}_edges.json"


def faithfulness_csv(run_dir: Path, method: str, model: str, task: str) -> Path:
    """``circuits/{method}/{model}_{task}_faithfulness.csv``."""
    return method_dir(run_dir, method) / f"{model}_{task}_faithfulness.csv"


def literature_edges(
    graph: EdgeGraph, data: dict[str, Any], model: str, task: str, method: str
) -> EdgeCircuit:
    """A literature node circuit (heads, MLPs) as edges: every edge among its nodes, the input and the
    logits. When the literature method never considers MLPs (``excluded_components``), all MLPs are
    kept, as they were never ablated in that work."""
    components = literature_circuit(data, model, task, method)
    nodes = {f"a{layer}.h{comp}" if isinstance(comp, int) else f"m{layer}" for layer, comp in components}
    if "MLP" in excluded_components(data, task, method):
        nodes |= {f"m{layer}" for layer in range(graph.shape.n_layers)}
    outside = sorted(n for n in nodes if n not in graph.out_index)
    if outside:
        raise ConfigError(
            f"literature circuit {method!r} for {model}/{task} names {outside}, which this model "
            f"({graph.shape.n_layers} layers x {graph.shape.n_heads} heads) does not have"
        )
    edges = expand_nodes(graph, nodes)
    scores = torch.full((graph.n_forward, graph.n_backward), float("nan"), dtype=torch.float64)
    return EdgeCircuit(graph, scores, edges, meta={"source": f"literature:{method}"})


def load_fixed_circuit(
    spec: str, shape: GraphShape, data: dict[str, Any], model: str, task: str
) -> tuple[str, EdgeCircuit]:
    """``(label, circuit)`` of ``evaluate.circuit``: ``literature:METHOD`` or a MIB / EAP-IG JSON path."""
    graph = EdgeGraph(shape)
    if spec.startswith("literature:"):
        method = spec.split(":", 1)[1]
        return f"literature:{method}", literature_edges(graph, data, model, task, method)
    circuit = read_mib_json(spec, expected=shape)
    return Path(spec).stem, circuit
