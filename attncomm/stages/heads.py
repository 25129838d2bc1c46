"""``heads``: previous-token, duplicate-token, induction and BOS-attention scores for every head.

Computation in :mod:`attncomm.analyses.head_detection` (TransformerLens's ``head_detector``).
"""

from __future__ import annotations

from typing import Any

from attncomm.analyses.head_detection import head_scores, top_heads
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.dla import publish
from attncomm.stages.toolkit_report import StageReport
from attncomm.viz.toolkit_figures import head_grid_figures


@register_stage("heads", produces=("heads",), needs_model=True)
def run_heads(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Head-type scores for every head (heatmaps) and the top heads per type (table)."""
    hc = cfg.heads
    df = head_scores(ctx.model, ctx.prompts, hc.seq_len, hc.n_sequences, hc.seed)
    df = df.assign(model=ctx.model_short, task=ctx.task_name)
    report = StageReport(ctx, "heads")
    report.table(df)
    top = top_heads(df, hc.top_k)
    report.table(top, "top")
    title = f"{ctx.model_short}: head types"
    publish(report, head_grid_figures(df, title, "value", "type", "score"), title)
    first = top[top["rank"] == 1]
    metrics: dict[str, Any] = {}
    for row in first.itertuples():
        metrics[f"{row.type}/top_head"] = f"L{row.layer}H{row.head}"
        metrics[f"{row.type}/top_score"] = float(row.value)
    return report.finish(metrics)
