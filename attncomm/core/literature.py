"""Accessors of the parsed literature-circuit data (a plain dict): circuits, canonical method, exclusions.

Pure lookups, so that the circuit comparison in core needs no file I/O; the data is loaded by
:func:`attncomm.io.circuits_data.load_circuits_data`. Components are ``(layer, head)`` or ``(layer, 'MLP')``.
"""

from __future__ import annotations

from typing import Any

from attncomm.core.user_error import AttncommError

Component = tuple[int, int | str]


class NoReferenceCircuitError(AttncommError, LookupError):
    """No literature circuit exists for the requested model, task or method."""


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
