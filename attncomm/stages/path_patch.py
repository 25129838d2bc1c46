"""``path_patch``: path patching from sender heads to configured receivers (heads' q/k/v inputs, logits).

Computation in :mod:`attncomm.analyses.path_patching` (TransformerLens has no general path patching).
"""

from __future__ import annotations

from typing import Any

from attncomm.analyses.path_patching import parse_receivers, path_patching
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.act_patch import directions
from attncomm.stages.dla import publish
from attncomm.stages.toolkit_report import StageReport, corrupted_tokens
from attncomm.viz.toolkit_figures import head_grid_figures


@register_stage("path_patch", produces=("path_patch",), needs_model=True)
def run_path_patch(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Path patching from every (or each configured) sender head to ``path_patch.receivers``."""
    pc = cfg.path_patch
    dirs = directions(pc.direction, "path_patch.direction")
    parse_receivers(pc.receivers, ctx.model)  # fail on a bad spec before any model run
    corrupted = corrupted_tokens(ctx, "path_patch")
    import pandas as pd

    df = pd.concat(
        [
            path_patching(
                ctx.model,
                ctx.task,
                ctx.prompts,
                corrupted,
                pc.receivers,
                pc.senders,
                pc.positions,
                direction,
                pc.max_batch,
            )
            for direction in dirs
        ],
        ignore_index=True,
    ).assign(model=ctx.model_short, task=ctx.task_name)
    report = StageReport(ctx, "path_patch")
    report.table(df)
    title = f"{ctx.model_short} {ctx.task_name}: path patching to {df['receivers'].iloc[0]}"
    publish(report, head_grid_figures(df, title, "normalised", "direction", "normalised metric"), title)
    metrics: dict[str, Any] = {}
    for direction, sub in df.groupby("direction"):
        top = sub.loc[sub["normalised"].abs().idxmax()]
        metrics[f"{direction}/top_sender"] = f"L{int(top.layer)}H{int(top['head'])}"
        metrics[f"{direction}/top_normalised"] = float(top["normalised"])
    return report.finish(metrics)
