"""Shared helpers of the toolkit analyses: the metric contract, prompt repetition, input checks.

Every analysis is a pure function of a loaded :class:`~attncomm.models.adapter.ModelAdapter`, a
:class:`~attncomm.tasks.base.Task` and its :class:`~attncomm.tasks.base.TaskPrompts` (plus, for the
patching methods, a corrupted token tensor of the same shape as ``prompts.tokens``). The metric of a
run is always the task's own ``task.metric(logits, prompts)``, one value per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attncomm.errors import AttncommError

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.tasks.base import Task, TaskPrompts


class AnalysisInputError(AttncommError, ValueError):
    """A toolkit option out of range or malformed (a layer, head, position, receiver spec...)."""


def repeat_prompts(prompts: TaskPrompts, k: int) -> TaskPrompts:
    """``k`` copies of the batch stacked along the batch dim (copy ``j`` is rows ``j*n .. (j+1)*n-1``)."""
    return prompts.subset(torch.arange(len(prompts)).repeat(k))


def metric_from_final(
    task: Task, prompts: TaskPrompts, final: Float[Tensor, "batch d_vocab"]
) -> Float[Tensor, " batch"]:
    """The task metric of logits given only at each prompt's ``end`` position."""
    at_zero = dataclasses.replace(prompts, end=torch.zeros_like(prompts.end))
    return task.metric(final[:, None, :], at_zero)


@torch.no_grad()
def prompt_metrics(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    batch_size: int = 100,
    desc: str = "evaluate prompts",
) -> tuple[Float[Tensor, " batch"], Bool[Tensor, " batch"]]:
    """The task metric and correctness of every prompt (float64, on the CPU), in batches of ``batch_size``."""
    from tqdm.auto import tqdm

    n = len(prompts)
    metrics, correct = [], []
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        sub = prompts.subset(list(range(start, min(n, start + batch_size))))
        logits, _ = model.run_with_cache(sub.tokens, [])
        logits = logits.to(torch.float64).cpu()
        metrics.append(task.metric(logits, sub))
        correct.append(task.is_correct(logits, sub))
    return torch.cat(metrics), torch.cat(correct)


def unembed_bias_metric(model: ModelAdapter, task: Task, prompts: TaskPrompts) -> Float[Tensor, " batch"]:
    """The part of the metric that comes from the unembedding bias ``b_U`` alone (no residual)."""
    b_U = model.weights.b_U
    return metric_from_final(task, prompts, b_U.expand(len(prompts), -1))


def check_corrupted(
    clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"] | None, what: str
) -> Int[Tensor, "batch pos"]:
    """The corrupted tokens, checked to have the clean tokens' shape."""
    if corrupted is None:
        raise AnalysisInputError(
            f"{what} needs corrupted prompts (a clean/corrupted pair per prompt), but the task has none; "
            "use a task that defines corrupted counterparts (e.g. task=ioi)"
        )
    if tuple(corrupted.shape) != tuple(clean.shape):
        raise AnalysisInputError(
            f"{what}: corrupted tokens have shape {tuple(corrupted.shape)} but the clean tokens have "
            f"{tuple(clean.shape)}; clean and corrupted prompts must be padded to the same width"
        )
    return corrupted


def check_index(option: str, value: int, n: int, what: str) -> int:
    """``value`` as an int in ``0..n-1``; a clear error naming ``option`` and the range otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise AnalysisInputError(f"{option}: {what} must be an integer in 0..{n - 1}, got {value!r}")
    if not 0 <= int(value) < n:
        raise AnalysisInputError(f"{option}: {what} {value} is out of range; valid {what}s are 0..{n - 1}")
    return int(value)


def check_heads(option: str, heads: Sequence[Any], n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """``[[layer, head], ...]`` validated against the model's shape."""
    out = []
    for spec in heads:
        if not isinstance(spec, Sequence) or isinstance(spec, str) or len(spec) != 2:
            raise AnalysisInputError(
                f"{option}: each head must be [layer, head], got {spec!r}; e.g. {option}=[[0,1],[2,3]]"
            )
        out.append(
            (check_index(option, spec[0], n_layers, "layer"), check_index(option, spec[1], n_heads, "head"))
        )
    return out


def check_positions(option: str, positions: Sequence[Any] | None, n_pos: int) -> list[int] | None:
    """Positions validated against the padded prompt width (``None``: every position)."""
    if positions is None:
        return None
    return [check_index(option, p, n_pos, "position") for p in positions]


def normalised(value: Tensor | float, clean: Tensor | float, corrupted: Tensor | float) -> Tensor | float:
    """``(value - corrupted) / (clean - corrupted)``: 0 at the corrupted metric, 1 at the clean one."""
    gap = clean - corrupted
    if isinstance(gap, float) and gap == 0.0:
        return float("nan")  # the two runs agree: nothing to normalise against
    return (value - corrupted) / gap


def position_labels(model: ModelAdapter, tokens: Int[Tensor, "batch pos"], prompt: int = 0) -> list[str]:
    """Token labels ``"{pos}:{token}"`` of one prompt's positions, for heatmap axes."""
    tok = model.tokenizer
    return [f"{p}:{tok.decode([int(t)])}" for p, t in enumerate(tokens[prompt].tolist())]
