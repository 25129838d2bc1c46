"""``attr_patch``: node-level attribution patching, with a scatter against activation patching of the
same cells and their correlation.

Computation in :mod:`attncomm.analyses.attribution_patching`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from attncomm.analyses.attribution_patching import (
    attribution_patching,
    compare_with_activation_patching,
    correlations,
)
from attncomm.analyses.common import position_labels
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.act_patch import directions
from attncomm.stages.dla import publish
from attncomm.stages.toolkit_report import StageReport, corrupted_tokens
from attncomm.viz.toolkit_figures import patch_figures, scatter_against


@register_stage("attr_patch", produces=("attr_patch",), needs_model=True)
def run_attr_patch(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Attribution patching of head outputs, q/k/v and MLPs by position and summed; vs activation patching."""
    ac = cfg.attr_patch
    dirs = directions(ac.direction, "attr_patch.direction")
    corrupted = corrupted_tokens(ctx, "attr_patch")
    model, task, prompts = ctx.model, ctx.task, ctx.prompts
    df = pd.concat(
        [attribution_patching(model, task, prompts, corrupted, ac.kinds, d) for d in dirs], ignore_index=True
    )
    report = StageReport(ctx, "attr_patch")
    title = f"{ctx.model_short} {ctx.task_name}: attribution patching"
    metrics: dict[str, Any] = {}
    figs, pages = patch_figures(df[df["grid"] != "layer"], title, position_labels(model, prompts.tokens))
    if ac.compare:
        df = compare_with_activation_patching(model, task, prompts, corrupted, df, ac.max_batch)
        corr = correlations(df).assign(model=ctx.model_short, task=ctx.task_name)
        report.table(corr, "correlation")
        for row in corr.itertuples():
            metrics[f"{row.direction}/{row.kind}/{row.grid}/pearson"] = row.pearson
        for (direction, grid), sub in df.groupby(["direction", "grid"], sort=False):
            figs[f"scatter_{direction}_{grid}"] = scatter_against(
                sub["act_normalised"],
                sub["normalised"],
                f"{title} ({direction}, {grid})",
                "activation patching (normalised)",
                "attribution patching (normalised)",
            )
    report.table(df.assign(model=ctx.model_short, task=ctx.task_name))
    publish(report, (figs, pages), title)
    return report.finish(metrics)
