"""Tiny test models: ``load_tiny(builder, dtype)`` (the fixtures ``tiny_gpt2`` & co. are in conftest.py).

Models are built once per version of ``attncomm/models/random_models.py`` into a directory under the
system temp dir (or ``$ATTNCOMM_TEST_CACHE``) and loaded once per process (``load_tiny`` is cached), so
float64 variants are available too: ``load_tiny("tiny-gemma2", torch.float64)``. The adapters are shared:
tests must not change their state (e.g. ``set_split_qkv_input``): load a fresh one for that, or
restore the state after each test as ``tests/test_edge_methods.py`` does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import torch

import attncomm.models.random_models
from attncomm.models.adapter import ModelAdapter, load_model
from attncomm.runtime.config import ModelConfig

FAMILIES = {
    "tiny-gpt2": "gpt2",
    "tiny-pythia": "neox",
    "tiny-gemma2": "gemma2",
    "tiny-llama": "llama",
    "tiny-qwen2": "qwen2",
    "tiny-mistral": "mistral",
    "gpt2-small-random": "gpt2",
}
#: the random tiny models of the Llama family (RMSNorm, rotary, GQA; Qwen2 with q/k/v biases)
LLAMA_LIKE = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]


def test_cache_dir() -> Path:
    """Where test models are built: keyed by the builders' source, so an edited builder rebuilds."""
    source = Path(attncomm.models.random_models.__file__).read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    root = os.environ.get("ATTNCOMM_TEST_CACHE") or str(Path(tempfile.gettempdir()) / "attncomm-test-models")
    return Path(root) / digest


test_cache_dir.__test__ = False  # type: ignore[attr-defined]  # not a test despite its name


def tiny_model_config(builder: str) -> ModelConfig:
    """The ModelConfig of a builder-made test model."""
    return ModelConfig(name=builder, short_name=builder, family=FAMILIES[builder], builder=builder)


def load_tiny(builder: str, dtype: torch.dtype = torch.float32) -> ModelAdapter:
    """Load (once per process) the test model ``builder`` in ``dtype`` on the CPU.

    ``load_tiny(b)`` and ``load_tiny(b, torch.float32)`` are the same adapter (one load)."""
    return _load_tiny_cached(builder, dtype)


@functools.cache
def _load_tiny_cached(builder: str, dtype: torch.dtype) -> ModelAdapter:
    return load_model(tiny_model_config(builder), device="cpu", dtype=dtype, cache_dir=test_cache_dir())
