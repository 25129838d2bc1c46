"""The architecture families the adapter supports, read from a checkpoint's ``config.json``.

``model=hf model.path=DIR`` (or ``model.hf_name=ID`` through the HF cache) needs no YAML per
checkpoint: the family comes from ``config.json`` (``architectures``, else ``model_type``) and the
short name used in run directories from the directory name or the hub id. Any model of a supported
family works; an architecture outside them gets one message listing the families.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from attncomm.errors import AttncommError, ConfigError
from attncomm.runtime.config import ModelConfig

#: HF architecture class -> family
ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "neox",
    "Gemma2ForCausalLM": "gemma2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
#: HF ``model_type`` -> family (for a config.json without ``architectures``)
MODEL_TYPES: dict[str, str] = {
    "gpt2": "gpt2",
    "gpt_neox": "neox",
    "gemma2": "gemma2",
    "llama": "llama",
    "qwen2": "qwen2",
    "mistral": "mistral",
}
#: what each family is, for messages and the README
FAMILIES: dict[str, str] = {
    "gpt2": "GPT-2 (LayerNorm, learned positions)",
    "neox": "GPT-NeoX / Pythia (parallel attention, partial rotary)",
    "gemma2": "Gemma-2 (RMSNorm with post-norms, softcaps, GQA)",
    "llama": "Llama-2/3.x (RMSNorm, rotary, GQA)",
    "qwen2": "Qwen2 / Qwen2.5 (Llama layout with q/k/v biases)",
    "mistral": "Mistral (Llama layout, GQA)",
}
#: the value of ``model.family`` / ``model.short_name`` that asks for them to be read / derived
AUTO = "auto"


class UnsupportedArchitectureError(AttncommError, ValueError):
    """A checkpoint whose architecture the adapter does not support."""


def supported_list() -> str:
    """The supported families, one phrase each."""
    return "; ".join(f"{name}: {what}" for name, what in FAMILIES.items())


def family_of_config(config: dict[str, Any], where: str) -> str:
    """The family of a checkpoint from its ``config.json`` contents (``where`` names it in errors)."""
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = config.get("model_type")
    if not config.get("architectures") and model_type in MODEL_TYPES:
        return MODEL_TYPES[str(model_type)]
    found = config.get("architectures") or model_type or "no 'architectures' or 'model_type'"
    raise UnsupportedArchitectureError(
        f"{where}: architecture {found} is not supported by attncomm's model adapter; supported "
        f"families: {supported_list()}. Use a causal LM checkpoint of one of them"
    )


def read_family(model_dir: str | Path) -> str:
    """The family of the HF checkpoint in ``model_dir`` (from its ``config.json``)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UnsupportedArchitectureError(
            f"{path}: cannot read the checkpoint's config.json ({err})"
        ) from None
    return family_of_config(config, str(path))


def derived_short_name(cfg: ModelConfig) -> str:
    """The name of ``model.path``'s directory, else the last part of ``model.hf_name``."""
    if cfg.path:
        return Path(str(cfg.path)).expanduser().resolve().name
    if cfg.hf_name:
        return str(cfg.hf_name).rstrip("/").split("/")[-1]
    raise ConfigError(
        f"model={cfg.name} reads any HF checkpoint: set model.path=DIR (a local HF-format directory) "
        "or model.hf_name=ORG/NAME (through the HF cache)"
    )


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``short_name: auto`` derived and, when the weights are a local directory
    (``model.path``), ``family`` read from its ``config.json`` (so a YAML's family never lies)."""
    changes: dict[str, Any] = {}
    if cfg.short_name == AUTO:
        changes["short_name"] = derived_short_name(cfg)
    if cfg.path and (Path(str(cfg.path)).expanduser() / "config.json").is_file():
        changes["family"] = read_family(Path(str(cfg.path)).expanduser())
    return dataclasses.replace(cfg, **changes) if changes else cfg
