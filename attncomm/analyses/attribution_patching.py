"""Attribution patching (node level): the first-order estimate of activation patching,
``(source activation - base activation) . d metric / d activation`` at the base run, for every cell of
head outputs (``z``), head query/key/value (``q``/``k``/``v``, key/value heads for grouped-query
models) and MLP outputs, by position and summed over positions, from one forward and one backward pass.

Normalised like activation patching (0 = corrupted, 1 = clean): denoising (base = corrupted) gives
``attribution / (clean - corrupted)``, noising (base = clean) ``1 + attribution / (clean - corrupted)``.
The estimate is exact where the metric is linear in the activation. TransformerLens's
``tools.analysis.attribution_patching.attribution_patch`` scores writer nodes and edges but not
per-head query/key/value inputs by position, hence this module (hook names as in
:mod:`attncomm.analyses.activation_patching`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from attncomm.analyses.activation_patching import (
    Cell,
    base_metrics,
    check_direction,
    check_kind,
    hook_name,
    patched_metrics,
)
from attncomm.analyses.common import AnalysisInputError, check_corrupted, position_labels

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.tasks.base import Task, TaskPrompts

ATTR_KINDS = ("z", "q", "k", "v", "mlp_out", "attn_out", "resid_pre")


def gradients(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    tokens: Tensor,
    names: Sequence[str],
    extra_hooks: Sequence[tuple[str, Any]] = (),
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Activations and gradients of the summed per-prompt metric at ``names`` (one forward + backward)."""
    acts: dict[str, Tensor] = {}

    def keep(name: str) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            if not act.requires_grad:
                act = act.detach().requires_grad_(True)
            act.retain_grad()
            acts[name] = act
            return act

        return hook

    hooks = [(name, keep(name)) for name in names] + list(extra_hooks)
    params = [p for p in model.bridge.parameters() if p.requires_grad]
    for p in params:  # gradients are needed for the activations only, not the weights
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits = model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=hooks)
            task.metric(logits, prompts).sum().backward()
    finally:
        for p in params:
            p.requires_grad_(True)
    grads = {}
    for name in names:
        if acts[name].grad is None:
            raise RuntimeError(f"no gradient reached {name}; the metric does not depend on it")
        grads[name] = acts[name].grad.detach()
    return {k: v.detach() for k, v in acts.items()}, grads


def attribution_patching(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    corrupted: Tensor | None,
    kinds: Iterable[str] = ("z", "q", "k", "v", "mlp_out"),
    direction: str = "denoising",
    tokens: Tensor | None = None,
    extra_hooks: Sequence[tuple[str, Any]] = (),
) -> pd.DataFrame:
    """One row per cell: ``direction``, ``kind``, ``grid`` (``layer_head_pos`` / ``layer_head`` for head
    kinds, ``layer_pos`` / ``layer`` for residual kinds; the second of each pair is summed over
    positions), ``layer``, ``head``, ``pos`` (-1: summed/none), ``token``, ``value`` (mean attribution
    over prompts: the estimated change of the metric), ``normalised``, ``clean``, ``corrupted``."""
    clean = prompts.tokens if tokens is None else tokens
    corrupted = check_corrupted(clean, corrupted, "attr_patch")
    check_direction(direction, "attr_patch.direction")
    kinds = [check_kind(k, "attr_patch.kinds") for k in kinds]
    if "pattern" in kinds:
        raise AnalysisInputError(
            "attr_patch.kinds: 'pattern' is not supported; use z, q, k, v, mlp_out, attn_out, resid_pre"
        )
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    L = model.arch.n_layers
    names = [hook_name(kind, layer) for kind in kinds for layer in range(L)]
    _, src_cache = model.run_with_cache(source, names)
    acts, grads = gradients(model, task, prompts, base, names, extra_hooks)
    clean_m, corr_m = base_metrics(model, task, prompts, clean, corrupted)
    c, r = float(clean_m.mean()), float(corr_m.mean())
    labels = position_labels(model, clean)
    offset = 0.0 if direction == "denoising" else 1.0
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        for layer in range(L):
            name = hook_name(kind, layer)
            attr = ((src_cache[name].to(acts[name].dtype) - acts[name]) * grads[name]).sum(-1).mean(0)
            if attr.ndim == 1:  # [pos]
                grids = {"layer_pos": attr[None, :], "layer": attr.sum(0)[None, None]}
            else:  # [pos head]
                grids = {"layer_head_pos": attr.T, "layer_head": attr.sum(0)[:, None]}
            for grid, mat in grids.items():
                for i in range(mat.shape[0]):
                    for p in range(mat.shape[1]):
                        head = i if grid.startswith("layer_head") else -1
                        pos = p if grid in ("layer_pos", "layer_head_pos") else -1
                        v = float(mat[i, p])
                        rows.append(
                            {
                                "direction": direction,
                                "kind": kind,
                                "grid": grid,
                                "layer": layer,
                                "head": head,
                                "pos": pos,
                                "token": labels[pos] if pos >= 0 else "",
                                "value": v,
                                "normalised": offset + v / (c - r) if c != r else float("nan"),
                                "clean": c,
                                "corrupted": r,
                            }
                        )
    return pd.DataFrame(rows)


def compare_with_activation_patching(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    corrupted: Tensor,
    attr: pd.DataFrame,
    max_batch: int = 256,
    tokens: Tensor | None = None,
    extra_hooks: Sequence[tuple[str, Any]] = (),
) -> pd.DataFrame:
    """``attr`` with ``act_value`` / ``act_normalised``: activation patching of the very same cells."""
    clean = prompts.tokens if tokens is None else tokens
    out = []
    for (direction, kind), sub in attr.groupby(["direction", "kind"], sort=False):
        base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
        cells = [
            Cell(int(la), None if h < 0 else int(h), None if p < 0 else int(p))
            for la, h, p in zip(sub["layer"], sub["head"], sub["pos"], strict=True)
        ]
        values = patched_metrics(
            model, task, prompts, base, source, kind, cells, max_batch, extra_hooks=extra_hooks
        )
        mean = values.mean(1)
        c, r = sub["clean"].iloc[0], sub["corrupted"].iloc[0]
        act_change = mean - (r if direction == "denoising" else c)
        out.append(sub.assign(act_value=act_change.tolist(), act_normalised=((mean - r) / (c - r)).tolist()))
    return pd.concat(out)


def correlations(df: pd.DataFrame) -> pd.DataFrame:
    """Pearson correlation of attribution and activation patching per (direction, kind, grid)."""
    rows = []
    for (direction, kind, grid), sub in df.groupby(["direction", "kind", "grid"], sort=False):
        x = torch.tensor(sub["value"].to_numpy(), dtype=torch.float64)
        y = torch.tensor(sub["act_value"].to_numpy(), dtype=torch.float64)
        corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if len(sub) > 1 else float("nan")
        rows.append(
            {"direction": direction, "kind": kind, "grid": grid, "n_cells": len(sub), "pearson": corr}
        )
    return pd.DataFrame(rows)
