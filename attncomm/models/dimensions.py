"""A model's dimensions without loading its weights: ``d_head``, ``n_layers``, ``n_heads``.

For stages that run no model (``sparsity``) but must know its head size. The facts come, in order,
from the model's HF ``config.json`` on disk (``model.path``, the built test model of
``model.builder`` under the cache root, or the HF cache; never the network) and then from the
published values of the paper's models (:data:`PUBLISHED_D_HEAD`). A loaded model's own facts are
:class:`attncomm.models.adapter.ArchFacts`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attncomm.runtime.cache_root import built_model_dir
from attncomm.runtime.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["PUBLISHED_D_HEAD", "ModelDims", "dims_from_config", "model_config_json", "model_dims"]

#: d_head of the published models (docs/METHOD.md section 9), used when no config.json is at hand
PUBLISHED_D_HEAD: dict[str, int] = {
    "gpt2-small": 64,
    "pythia-160m": 64,
    "pythia-160m-deduped": 64,
    "gemma-2-2b": 256,
}

CONFIG_JSON = "config.json"


def model_config_json(cfg: ModelConfig, cache_dir: str | Path) -> dict[str, Any] | None:
    """The model's HF ``config.json`` when it is on disk (no weights loaded, no network)."""
    candidates: list[Path] = []
    if cfg.path:
        candidates.append(Path(cfg.path).expanduser() / CONFIG_JSON)
    if cfg.builder:
        candidates.append(built_model_dir(cfg.builder, Path(cache_dir).expanduser()) / CONFIG_JSON)
    if cfg.hf_name:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(cfg.hf_name, CONFIG_JSON, revision=cfg.revision)
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception as err:  # noqa: BLE001 - any cache problem just means "not available"
            log.debug("HF cache lookup of %s failed: %s", cfg.hf_name, err)
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                log.warning("cannot read %s: %s", path, err)
    return None


def dims_from_config(hf: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """``(d_head, n_layers, n_heads)`` from an HF config dict (GPT-2, GPT-NeoX, Gemma-2 keys)."""
    n_heads = hf.get("n_head", hf.get("num_attention_heads"))
    n_layers = hf.get("n_layer", hf.get("num_hidden_layers"))
    d_model = hf.get("n_embd", hf.get("hidden_size", hf.get("d_model")))
    d_head = hf.get("head_dim")
    if d_head is None and d_model and n_heads:
        d_head = int(d_model) // int(n_heads)
    as_int = [int(v) if v is not None else None for v in (d_head, n_layers, n_heads)]
    return as_int[0], as_int[1], as_int[2]


@dataclass(frozen=True)
class ModelDims:
    """What is known of a model's dimensions without loading it; ``source`` says where ``d_head`` came
    from (``"model config.json"``, ``"published value (section 9)"``, or ``""`` when it is unknown)."""

    d_head: int | None
    n_layers: int | None
    n_heads: int | None
    source: str


def model_dims(cfg: ModelConfig, cache_dir: str | Path) -> ModelDims:
    """The model's dimensions from its ``config.json`` on disk, else its published ``d_head``."""
    hf = model_config_json(cfg, cache_dir)
    d_head = n_layers = n_heads = None
    if hf is not None:
        d_head, n_layers, n_heads = dims_from_config(hf)
    if d_head:
        return ModelDims(d_head, n_layers, n_heads, "model config.json")
    if cfg.short_name in PUBLISHED_D_HEAD:
        return ModelDims(PUBLISHED_D_HEAD[cfg.short_name], n_layers, n_heads, "published value (section 9)")
    return ModelDims(None, n_layers, n_heads, "")


@dataclass(frozen=True)
class GraphDims:
    """What fixes a model's edge graph, read from its ``config.json``: layers, query heads, whether
    attention and MLP run in parallel (GPT-NeoX's ``use_parallel_residual``), and ``d_model``."""

    n_layers: int
    n_heads: int
    parallel_attn: bool
    d_model: int


def graph_dims(cfg: ModelConfig, cache_dir: str | Path) -> GraphDims | None:
    """The edge-graph dimensions of ``cfg``'s model from its ``config.json`` on disk (no weights loaded),
    or None when the file is not at hand or lacks a key (then load the model)."""
    hf = model_config_json(cfg, cache_dir)
    if hf is None:
        return None
    _, n_layers, n_heads = dims_from_config(hf)
    d_model = hf.get("n_embd", hf.get("hidden_size", hf.get("d_model")))
    if not (n_layers and n_heads and d_model):
        return None
    parallel = hf.get("model_type") == "gpt_neox" and bool(hf.get("use_parallel_residual", True))
    return GraphDims(int(n_layers), int(n_heads), parallel, int(d_model))
