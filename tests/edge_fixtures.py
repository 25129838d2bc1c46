"""Shared helpers of the edge-method tests: toy-ioi prompts with hand-built corrupted prompts."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from attncomm.models.adapter import ModelAdapter, load_model
from attncomm.runtime.config import ModelConfig, package_path
from attncomm.tasks import get_task
from attncomm.tasks.base import TaskPrompts
from tests.models_fixtures import test_cache_dir


@functools.cache
def load_toy_ioi(dtype: torch.dtype = torch.float64) -> ModelAdapter:
    """The shipped toy-ioi model (a fresh adapter per dtype; edge methods turn split q/k/v on)."""
    cfg = ModelConfig(name="toy-ioi", short_name="toy-ioi", family="gpt2", path=package_path("toys/toy-ioi"))
    return load_model(cfg, device="cpu", dtype=dtype, cache_dir=test_cache_dir())


def ioi_prompts(model: ModelAdapter, n: int = 6, seed: int = 0) -> TaskPrompts:
    return get_task("ioi").make_prompts(model.tokenizer, n, seed=seed, prepend_bos=False)


def hand_corrupted(prompts: TaskPrompts) -> Tensor:
    """The clean tokens with the IO and S1 names replaced by the IO names of two other prompts."""
    tokens = prompts.tokens.clone()
    n = len(prompts)
    for i in range(n):
        a = int(prompts.tokens[(i + 1) % n, prompts.roles[(i + 1) % n]["IO"]])
        b = int(prompts.tokens[(i + 2) % n, prompts.roles[(i + 2) % n]["S1"]])
        tokens[i, prompts.roles[i]["IO"]] = a
        tokens[i, prompts.roles[i]["S1"]] = b
    return tokens


def task_metric(prompts: TaskPrompts):
    """``metric(logits, idx)`` of the IOI task on the prompts ``idx``."""
    task = get_task("ioi")

    def metric(logits: Tensor, idx: Tensor) -> Tensor:
        return task.metric(logits, prompts.subset(idx))

    return metric
