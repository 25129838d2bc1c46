"""Head ablation: knock out a set of heads' outputs (``hook_z``) at chosen positions and measure the metric
and every head's direct logit attribution before and after.

Methods: ``zero`` (z = 0), ``mean`` (z = its mean over the task's prompts at that position) and
``resample`` (z from the corrupted run of the same prompt). The attention output bias is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from attncomm.analyses.common import AnalysisInputError, check_corrupted, check_heads, check_positions
from attncomm.analyses.logit_attribution import direct_logit_attribution

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.tasks.base import Task, TaskPrompts

METHODS = ("zero", "mean", "resample")


def ablation_hooks(
    model: ModelAdapter,
    heads: Sequence[tuple[int, int]],
    method: str,
    tokens: Tensor,
    positions: Sequence[int] | None = None,
    corrupted: Tensor | None = None,
) -> list[tuple[str, Any]]:
    """Forward hooks on ``hook_z`` replacing the listed heads' outputs at ``positions`` (None: all)."""
    if method not in METHODS:
        raise AnalysisInputError(f"ablate.method={method!r} is not valid; use one of {', '.join(METHODS)}")
    layers = sorted({layer for layer, _ in heads})
    names = {layer: f"blocks.{layer}.attn.hook_z" for layer in layers}
    replacement: dict[int, Tensor] = {}
    if method == "mean":
        _, cache = model.run_with_cache(tokens, list(names.values()))
        replacement = {layer: cache[names[layer]].mean(0, keepdim=True) for layer in layers}
    elif method == "resample":
        corrupted = check_corrupted(tokens, corrupted, "ablate.method=resample")
        _, cache = model.run_with_cache(corrupted, list(names.values()))
        replacement = {layer: cache[names[layer]] for layer in layers}
    p: Any = slice(None) if positions is None else torch.tensor(list(positions))

    def make(layer: int) -> Any:
        hs = [h for lay, h in heads if lay == layer]

        def hook(z: Tensor, hook: Any) -> Tensor:
            z = z.clone()
            for h in hs:
                if method == "zero":
                    z[:, p, h] = 0
                else:
                    new = replacement[layer][:, :, h].to(z.dtype).expand(z.shape[0], -1, -1)
                    z[:, p, h] = new[:, p]
            return z

        return hook

    return [(names[layer], make(layer)) for layer in layers]


def ablate_heads(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    heads: Sequence[Any],
    method: str = "mean",
    positions: Sequence[int] | None = None,
    corrupted: Tensor | None = None,
    tokens: Tensor | None = None,
) -> pd.DataFrame:
    """The DLA table (:func:`direct_logit_attribution`) before and after ablation, with a ``condition``
    column (``before`` / ``after``) and ``method`` / ``ablated`` (the heads as text)."""
    tokens = prompts.tokens if tokens is None else tokens
    pairs = check_heads("ablate.heads", heads, model.arch.n_layers, model.arch.n_heads)
    if not pairs:
        raise AnalysisInputError(
            "ablate.heads is empty; list heads to knock out, e.g. ablate.heads=[[1,0],[1,1]]"
        )
    pos = check_positions("ablate.positions", positions, tokens.shape[1])
    hooks = ablation_hooks(model, pairs, method, tokens, pos, corrupted)
    before = direct_logit_attribution(model, task, prompts, tokens).assign(condition="before")
    after = direct_logit_attribution(model, task, prompts, tokens, fwd_hooks=hooks).assign(condition="after")
    text = ";".join(f"L{layer}H{head}" for layer, head in pairs)
    return pd.concat([before, after], ignore_index=True).assign(method=method, ablated=text)
