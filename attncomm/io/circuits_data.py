"""Literature circuits (ACC-METHOD.md section 8), shipped with the package as ``attncomm/data/circuits.yaml``.

The packaged file is a copy of ``reference/circuits.yaml`` (a test checks they are equal), so
``compare`` works without ``../shared``. Components are ``(layer, head)`` or ``(layer, 'MLP')``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from attncomm.errors import AttncommError

Component = tuple[int, int | str]


class NoReferenceCircuitError(AttncommError, LookupError):
    """No literature circuit exists for the requested model, task or method."""


def load_circuits_data(path: str | Path | None = None) -> dict[str, Any]:
    """The literature-circuit data: the packaged YAML, or the YAML file at ``path``."""
    if path is None:
        text = resources.files("attncomm.data").joinpath("circuits.yaml").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or "circuits" not in data:
        raise AttncommError(
            f"circuits data {path or 'attncomm/data/circuits.yaml'} has no 'circuits' section"
        )
    return data


def _component(item: Any, where: str) -> Component:
    if (
        not isinstance(item, list | tuple)
        or len(item) != 2
        or type(item[0]) is not int
        or not (type(item[1]) is int or item[1] == "MLP")
    ):
        raise AttncommError(f"{where}: malformed component {item!r}, expected [layer, head] or [layer, MLP]")
    return (item[0], item[1])


def available_methods(data: dict[str, Any], model: str, task: str) -> list[str]:
    """Literature methods with a circuit for ``model``/``task``, in file order (empty if none)."""
    return list(data["circuits"].get(model, {}).get(task, {}) or {})


def literature_circuit(data: dict[str, Any], model: str, task: str, method: str) -> set[Component]:
    """The circuit a literature ``method`` found for ``model``/``task`` as a set of components."""
    methods = data["circuits"].get(model, {}).get(task, {}) or {}
    if method not in methods:
        raise NoReferenceCircuitError(
            f"no literature circuit for method {method!r} on {model}/{task}; available: {sorted(methods)}"
        )
    return {_component(item, f"circuits.{model}.{task}.{method}") for item in methods[method]}


def canonical_method(data: dict[str, Any], model: str, task: str) -> str:
    """The reference method the paper compares against for ``model``/``task`` (e.g. ACDC for gp)."""
    method = data.get("canonical", {}).get(task, {}).get(model)
    if method is None:
        raise NoReferenceCircuitError(f"no canonical literature circuit for {model}/{task}")
    return method


def excluded_components(data: dict[str, Any], task: str, method: str) -> list[str]:
    """Component kinds the reference ``method`` never considers on ``task`` (e.g. ``MLP``)."""
    return list(data.get("excluded_components", {}).get(task, {}).get(method, []))


def intervention_experiment_edges(data: dict[str, Any], model: str, task: str) -> list[list[str]]:
    """Edges ``[upstream_id, downstream_id, description]`` of the paper's intervention experiments."""
    edges = data.get("edges_for_intervention_experiments", {}).get(task, {}).get(model)
    if edges is None:
        raise NoReferenceCircuitError(f"no intervention-experiment edges for {model}/{task}")
    return [list(edge) for edge in edges]


#: method name of a reference circuit shipped beside a model's weights (the toy model organisms)
SHIPPED_REFERENCE = "Toy reference"


def with_shipped_reference(
    data: dict[str, Any], model: str, task: str, model_dir: str | None
) -> dict[str, Any]:
    """``data`` plus the reference circuit shipped as ``reference_circuit.json`` in ``model_dir``.

    The toy model organisms ship the circuit the framework computed for them (heads only); when the
    model has no literature circuit for ``task`` it becomes the canonical one, so ``compare`` works on
    toys like on pretrained models. Returns ``data`` unchanged when there is nothing to add.
    """
    if not model_dir:
        return data
    path = Path(model_dir) / "reference_circuit.json"
    if not path.is_file():
        return data
    import json

    ref = json.loads(path.read_text(encoding="utf-8"))
    if ref.get("task") != task:
        return data
    heads = [[int(layer), int(head)] for layer, head in ref.get("heads", [])]
    if not heads:
        raise AttncommError(f"{path}: reference circuit has no heads")
    merged = {**data, "circuits": {**data["circuits"]}}
    merged["circuits"][model] = {**merged["circuits"].get(model, {}), task: {SHIPPED_REFERENCE: heads}}
    canonical = {k: dict(v) for k, v in data.get("canonical", {}).items()}
    canonical.setdefault(task, {}).setdefault(model, SHIPPED_REFERENCE)
    merged["canonical"] = canonical
    excluded = {k: dict(v) for k, v in data.get("excluded_components", {}).items()}
    # the shipped reference ablates heads only: MLPs, biases and embeddings are outside its scope
    excluded.setdefault(task, {})[SHIPPED_REFERENCE] = ["AH bias", "Embedding", "MLP"]
    merged["excluded_components"] = excluded
    return merged
