"""``qk_ov``: full QK/OV circuits of chosen heads as factored matrices (top-k tables, OV copying score,
positional QK pattern) and Q/K/V composition scores between consecutive layers.

Computation in :mod:`attncomm.analyses.qk_ov_circuits` (TransformerLens's ``FactoredMatrix`` and
``composition_scores``).
"""

from __future__ import annotations

from typing import Any

from attncomm.analyses.common import AnalysisInputError
from attncomm.analyses.qk_ov_circuits import qk_ov_tables
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.dla import publish
from attncomm.stages.toolkit_report import StageReport
from attncomm.viz.heatmaps import heatmap_figure, heatmap_panel


def resolve_tokens(ctx: RunContext, words: list[str]) -> list[int]:
    """Ids of ``qk_ov.tokens`` (each one token), or the answer tokens of the first three prompts."""
    if not words:
        return sorted({int(t) for t in ctx.prompts.correct[:3].tolist()})
    ids = []
    for word in words:
        enc = ctx.model.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise AnalysisInputError(
                f"qk_ov.tokens: {word!r} is {len(enc)} tokens, not one; list single tokens"
            )
        ids.append(int(enc[0]))
    return ids


@register_stage("qk_ov", produces=("qk_ov",), needs_model=True)
def run_qk_ov(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """QK/OV circuits of ``qk_ov.heads`` through embedding and unembedding; composition scores."""
    qc = cfg.qk_ov
    model = ctx.model
    from attncomm.analyses.common import check_heads

    check_heads("qk_ov.heads", qc.heads, model.arch.n_layers, model.arch.n_heads)
    tables = qk_ov_tables(model, qc.heads, resolve_tokens(ctx, qc.tokens), qc.top_k)
    report = StageReport(ctx, "qk_ov")
    report.table(tables["top_k"].assign(model=ctx.model_short, task=ctx.task_name))
    for name in ("copying", "positional", "composition"):
        report.table(tables[name].assign(model=ctx.model_short), name)
    figs: dict[str, Any] = {}
    pages: dict[str, list[dict[str, Any]]] = {}
    comp = tables["composition"]
    if len(comp):
        comp = comp.assign(src=[f"L{a}H{b}" for a, b in zip(comp["layer"], comp["head"], strict=True)])
        comp = comp.assign(dst=[f"L{a}H{b}" for a, b in zip(comp["layer_to"], comp["head_to"], strict=True)])
        mats = {
            f"{kind}-composition": sub.pivot_table(index="src", columns="dst", values="value", sort=False)
            for kind, sub in comp.groupby("kind", sort=False)
        }
        figs["composition"] = heatmap_figure(
            mats,
            f"{ctx.model_short}: composition scores",
            "later head",
            "earlier head",
            diverging=False,
            colorbar="score",
        )
        pages["composition"] = [heatmap_panel(k, m, "earlier head", "later head") for k, m in mats.items()]
    pos = tables["positional"]
    if len(pos):
        mats = {
            f"L{la}H{h}": sub.pivot_table(index="pos", columns="key_pos", values="value")
            for (la, h), sub in pos.groupby(["layer", "head"], sort=False)
        }
        figs["positional"] = heatmap_figure(
            mats,
            f"{ctx.model_short}: positional QK pattern",
            "key position",
            "query position",
            diverging=False,
            colorbar="attention",
        )
        pages["positional"] = [heatmap_panel(k, m, "query pos", "key pos") for k, m in mats.items()]
    title = f"{ctx.model_short}: QK/OV circuits"
    publish(report, (figs, pages), title)
    metrics = {
        f"L{r.layer}H{r.head}/ov_copying_score": r.copying_score for r in tables["copying"].itertuples()
    }
    return report.finish(metrics)
