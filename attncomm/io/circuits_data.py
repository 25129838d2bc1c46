"""Literature circuits (docs/METHOD.md section 8), shipped as ``attncomm/data/circuits.yaml``.

The packaged file is the project's curated copy of the published circuits (a test checks it against the
reference data), so ``compare`` needs nothing outside the package. Components are ``(layer, head)`` or
``(layer, 'MLP')``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from attncomm.core.literature import (
    Component,
    NoReferenceCircuitError,
    available_methods,
    canonical_method,
    excluded_components,
    intervention_experiment_edges,
    literature_circuit,
)
from attncomm.errors import AttncommError

__all__ = [
    "SHIPPED_REFERENCE",
    "Component",
    "NoReferenceCircuitError",
    "available_methods",
    "canonical_method",
    "excluded_components",
    "intervention_experiment_edges",
    "literature_circuit",
    "load_circuits_data",
    "with_shipped_reference",
]


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
