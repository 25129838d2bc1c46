"""``logit_lens``: the task metric read from the accumulated residual after each (sub)layer.

Calls TransformerLens's ``ActivationCache.accumulated_resid`` and the model's own ``ln_final``
(see :mod:`attncomm.analyses.logit_attribution`).
"""

from __future__ import annotations

from typing import Any

from attncomm.analyses.logit_attribution import logit_lens
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.dla import publish
from attncomm.stages.toolkit_report import StageReport
from attncomm.viz.toolkit_figures import logit_lens_figures


@register_stage("logit_lens", produces=("logit_lens",), needs_model=True)
def run_logit_lens(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """The metric after every layer (and mid-layer) through the final norm and unembedding."""
    df = logit_lens(ctx.model, ctx.task, ctx.prompts, incl_mid=cfg.logit_lens.incl_mid)
    df = df.assign(model=ctx.model_short, task=ctx.task_name)
    report = StageReport(ctx, "logit_lens")
    report.table(df)
    title = f"{ctx.model_short} {ctx.task_name}: logit lens"
    publish(report, logit_lens_figures(df, title), title)
    mean = df.groupby("label", sort=False)["value"].mean()
    return report.finish({f"{label}": float(v) for label, v in mean.items()})
