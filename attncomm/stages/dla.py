"""``dla``: direct logit attribution of the task metric at the answer position.

Calls TransformerLens's ``ActivationCache.decompose_resid``, ``stack_head_results`` and
``apply_ln_to_stack`` (see :mod:`attncomm.analyses.logit_attribution`).
"""

from __future__ import annotations

import logging
from typing import Any

from attncomm.analyses.logit_attribution import direct_logit_attribution, dla_summary
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.toolkit_report import StageReport
from attncomm.viz.toolkit_figures import dla_figures

log = logging.getLogger(__name__)


def publish(report: StageReport, figures: tuple[dict[str, Any], dict[str, Any]], title: str) -> None:
    """Save and log every figure and interactive page of an analysis."""
    figs, pages = figures
    for name, fig in figs.items():
        report.figure(name, fig)
    for name, panels in pages.items():
        report.html(name, f"{title}: {name}", panels)


@register_stage("dla", produces=("dla",), needs_model=True)
def run_dla(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Direct logit attribution of the metric to embeddings, attention/MLP per layer and every head."""
    df = direct_logit_attribution(ctx.model, ctx.task, ctx.prompts)
    df = df.assign(model=ctx.model_short, task=ctx.task_name)
    report = StageReport(ctx, "dla")
    report.table(df)
    summary = dla_summary(df)
    report.table(summary, "mean")
    title = f"{ctx.model_short} {ctx.task_name}"
    publish(report, dla_figures(df, title, cfg.dla.top_k), title)
    err = df.loc[df["kind"] == "residual_error", "value"].abs().max()
    metric = df.loc[df["kind"] == "metric", "value"].mean()
    if err > 1e-3 * max(1.0, abs(metric)):
        log.warning(
            "dla: components miss the metric by up to %.3g (a final logit softcap is not linear)", err
        )
    heads = summary[summary["kind"] == "head"].sort_values("value")
    top = heads.iloc[-1] if len(heads) else None
    metrics = {"metric_mean": float(metric), "max_residual_error": float(err)}
    if top is not None:
        metrics |= {"top_head": f"L{int(top.layer)}H{int(top['head'])}", "top_head_value": float(top.value)}
    return report.finish(metrics)
