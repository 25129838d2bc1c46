"""``ablate``: knock out heads (zero / mean / resample) and report the metric and head DLA before/after.

Computation in :mod:`attncomm.analyses.ablation` (DLA through TransformerLens's ``ActivationCache``).
"""

from __future__ import annotations

from typing import Any

from attncomm.analyses.ablation import METHODS, ablate_heads
from attncomm.analyses.common import AnalysisInputError
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.dla import publish
from attncomm.stages.toolkit_report import StageReport, corrupted_tokens
from attncomm.viz.heatmaps import bar_figure
from attncomm.viz.toolkit_figures import head_grid_figures


@register_stage("ablate", produces=("ablate",), needs_model=True)
def run_ablate(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Ablate ``ablate.heads`` with ``ablate.method`` at ``ablate.positions``; metric and DLA before/after."""
    ac = cfg.ablate
    if ac.method not in METHODS:
        raise AnalysisInputError(f"ablate.method={ac.method!r} is not valid; use one of {', '.join(METHODS)}")
    corrupted = corrupted_tokens(ctx, "ablate.method=resample") if ac.method == "resample" else None
    df = ablate_heads(ctx.model, ctx.task, ctx.prompts, ac.heads, ac.method, ac.positions, corrupted)
    df = df.assign(model=ctx.model_short, task=ctx.task_name)
    report = StageReport(ctx, "ablate")
    report.table(df)
    title = f"{ctx.model_short} {ctx.task_name}: ablating {df['ablated'].iloc[0]} ({ac.method})"
    metric = df[df["kind"] == "metric"].groupby("condition")["value"].mean()
    figs, pages = head_grid_figures(df[df["kind"] == "head"], title, "value", "condition", "DLA")
    figs["metric"] = bar_figure(
        ["before", "after"], [metric["before"], metric["after"]], title, "task metric"
    )
    publish(report, (figs, pages), title)
    return report.finish({"metric_before": float(metric["before"]), "metric_after": float(metric["after"])})
