"""Shared setup of the toolkit tests: the shipped toys in float64, prompts and hand-built corrupted tokens."""

from __future__ import annotations

import functools

import torch

from attncomm.models.adapter import ModelAdapter, load_model
from attncomm.runtime.config import ModelConfig, package_path
from attncomm.tasks import get_task
from attncomm.tasks.base import Task, TaskPrompts
from tests.models_fixtures import test_cache_dir


@functools.cache
def load_toy(name: str, dtype: torch.dtype = torch.float64) -> ModelAdapter:
    """A shipped toy model (``toy-ioi`` or ``toy-induction``), loaded once per process."""
    cfg = ModelConfig(name=name, short_name=name, family="gpt2", path=package_path(f"toys/{name}"))
    return load_model(cfg, device="cpu", dtype=dtype, cache_dir=test_cache_dir())


def ioi_setup(model: ModelAdapter, n: int = 6, mode: str = "flip") -> tuple[Task, TaskPrompts, torch.Tensor]:
    """IOI prompts and a hand-built corruption of S2: ``flip`` puts the IO name there (the answer flips),
    ``abc`` a third name taken from another prompt (the repeated-name signal is gone)."""
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, n, seed=1)
    corrupted = prompts.tokens.clone()
    names = [int(prompts.tokens[i, r["IO"]]) for i, r in enumerate(prompts.roles)]
    names += [int(prompts.tokens[i, r["S1"]]) for i, r in enumerate(prompts.roles)]
    for i, roles in enumerate(prompts.roles):
        io, s = int(prompts.tokens[i, roles["IO"]]), int(prompts.tokens[i, roles["S1"]])
        third = next(t for t in names[i:] + names[:i] if t not in (io, s))
        corrupted[i, roles["S2"]] = io if mode == "flip" else third
    return task, prompts, corrupted


def induction_setup(model: ModelAdapter, n: int = 6) -> tuple[Task, TaskPrompts, torch.Tensor]:
    """Induction prompts and a corruption: the first copy of the sequence replaced by other tokens."""
    task = get_task("induction", seq_len=8)
    prompts = task.make_prompts(model.tokenizer, n, seed=1)
    corrupted = prompts.tokens.clone()
    L = 8
    corrupted[:, :L] = prompts.tokens[torch.arange(n).roll(1), :L]
    return task, prompts, corrupted
