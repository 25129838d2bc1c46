"""``act_patch``: activation patching clean <-> corrupted, many cells per forward pass.

Computation in :mod:`attncomm.analyses.activation_patching` (batched; TransformerLens's
``transformer_lens.patching`` does one forward per cell and serves as the speed baseline).
"""

from __future__ import annotations

from typing import Any

from attncomm.analyses.activation_patching import activation_patching, check_direction
from attncomm.analyses.common import position_labels
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.dla import publish
from attncomm.stages.toolkit_report import StageReport, corrupted_tokens
from attncomm.viz.toolkit_figures import patch_figures


def directions(value: str, option: str) -> list[str]:
    """``both`` -> both directions; otherwise the one (validated)."""
    return ["denoising", "noising"] if value == "both" else [check_direction(value, option)]


@register_stage("act_patch", produces=("act_patch",), needs_model=True)
def run_act_patch(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Activation patching of residual, attention/MLP outputs and head outputs/q/k/v/patterns."""
    dirs = directions(cfg.act_patch.direction, "act_patch.direction")
    corrupted = corrupted_tokens(ctx, "act_patch")
    df = activation_patching(
        ctx.model,
        ctx.task,
        ctx.prompts,
        corrupted,
        kinds=cfg.act_patch.kinds,
        directions=dirs,
        by_position=cfg.act_patch.by_position,
        max_batch=cfg.act_patch.max_batch,
    )
    df = df.assign(model=ctx.model_short, task=ctx.task_name)
    report = StageReport(ctx, "act_patch")
    report.table(df)
    title = f"{ctx.model_short} {ctx.task_name}: activation patching"
    publish(report, patch_figures(df, title, position_labels(ctx.model, ctx.prompts.tokens)), title)
    metrics: dict[str, Any] = {
        "clean": float(df["clean"].iloc[0]),
        "corrupted": float(df["corrupted"].iloc[0]),
    }
    for (direction, kind), sub in df.groupby(["direction", "kind"]):
        top = sub.loc[sub["normalised"].abs().idxmax()]
        metrics[f"{direction}/{kind}/max_abs_normalised"] = float(top["normalised"])
    return report.finish(metrics)
