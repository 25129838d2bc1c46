"""``interventions``: the causal effect of every edge of the combined graph (docs/METHOD.md section 7).

Reads the combined graph at ``interventions.threshold`` (published: 0.01) and the tracing results,
removes each non-root edge's signal from its downstream head in every prompt the edge appeared in,
and writes the intervention graph: the combined graph's attributes plus ``upstream_node``,
``downstream_node`` and ``logit_diff`` (per prompt, task metric after - before, with the task's own
sign; the reference's greater-than values have the opposite sign). The maths is in
:mod:`attncomm.core.edge_interventions`; the inputs are read by
:func:`attncomm.methods.intervention_inputs.load_intervention_inputs`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from attncomm.core.edge_interventions import intervention_graph
from attncomm.core.node_ids import is_root
from attncomm.io.graphml import write_graph
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage

log = logging.getLogger(__name__)


@register_stage(
    "interventions",
    consumes=("combined_graphs", "tracing_results"),
    produces=("interventions_graph",),
    needs_model=True,
)
def run_interventions(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Remove each combined-graph edge's signal and record the per-prompt logit-diff change (section 7)."""
    from attncomm.io.provenance import guard_stage_outputs
    from attncomm.methods.intervention_inputs import load_intervention_inputs

    ic = cfg.interventions
    arts = ctx.artifacts
    arts.require(arts.combined_graph(ic.threshold), "combined_graphs")
    guard_stage_outputs(cfg, ctx, "interventions")
    inputs = load_intervention_inputs(cfg, ctx, ic.threshold)
    source, results = inputs.source, inputs.results
    out = intervention_graph(
        inputs.graph,
        ctx.model,
        ctx.prompts.tokens,
        inputs.metric,
        inputs.positions,
        inputs.terms,
        inputs.omega,
        batch_size=max(1, ic.batch_size),
    )
    path = write_graph(out, arts.interventions_graph(ic.threshold))

    diffs = [ld for u, v, ld in out.edges(data="logit_diff") if not is_root(v)]
    values = np.concatenate([np.asarray(ld, dtype=np.float64) for ld in diffs]) if diffs else np.zeros(0)
    edge_means = [abs(float(np.mean(ld))) for ld in diffs if len(ld)]
    metrics: dict[str, Any] = {
        "interventions/edges": len(diffs),
        "interventions/root_edges": out.number_of_edges() - len(diffs),
        "interventions/sites": int(values.size),
        "interventions/prompts": len(
            {p for _, v, ps in out.edges(data="prompts_appeared") if not is_root(v) for p in ps}
        ),
        "interventions/mean_abs_logit_diff": float(np.abs(values).mean()) if values.size else 0.0,
        "interventions/mean_abs_avg_logit_diff": float(np.mean(edge_means)) if edge_means else 0.0,
    }
    log.info(
        "intervention graph: %d edges, %d (edge, prompt) interventions, mean |logit_diff| %.4g -> %s",
        metrics["interventions/edges"],
        metrics["interventions/sites"],
        metrics["interventions/mean_abs_logit_diff"],
        path,
    )
    ctx.record(
        "interventions",
        [path],
        {"source": source.name, "tracing_results": results.name, "threshold": ic.threshold, **metrics},
    )
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(path, f"{arts.prefix}_interventions_graph", "graphs")
    return metrics
