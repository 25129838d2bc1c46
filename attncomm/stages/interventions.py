"""``interventions``: the causal effect of every edge of the combined graph (ACC-METHOD.md section 7).

Reads the combined graph at ``interventions.threshold`` (published: 0.01) and the tracing results,
removes each non-root edge's signal from its downstream head in every prompt the edge appeared in,
and writes the intervention graph: the combined graph's attributes plus ``upstream_node``,
``downstream_node`` and ``logit_diff`` (per prompt, task metric after - before, with the task's own
sign; the reference's greater-than values have the opposite sign). The maths is in
:mod:`attncomm.core.edge_interventions`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from torch import Tensor

from attncomm.core.edge_interventions import intervention_graph
from attncomm.core.node_ids import is_root, read_graph, write_graph
from attncomm.core.omega_factors import OmegaCache
from attncomm.errors import AttncommError
from attncomm.io.results import FiringKey, TracingResults
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage

log = logging.getLogger(__name__)


class MissingFiringError(AttncommError, KeyError):
    """A graph edge whose downstream firing has no record in the tracing results."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SelectedTerms:
    """``terms(firing, side)`` from a tracing result file, loaded one prompt at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._results = TracingResults(path)
        self._by_prompt: dict[int, dict[FiringKey, tuple[list[int], list[int]]]] = {}

    def __call__(self, key: FiringKey, side: str) -> list[int]:
        prompt = int(key[0])
        if prompt not in self._by_prompt:
            self._by_prompt[prompt] = {
                k: (rec.dest_terms.tolist(), rec.src_terms.tolist())
                for k, rec in self._results.firings(prompt).items()
            }
        firing = self._by_prompt[prompt].get(tuple(int(k) for k in key))  # type: ignore[arg-type]
        if firing is None:
            raise MissingFiringError(
                f"{self.path} holds no firing (prompt, layer, head, dest, src) = {key}: the combined graph "
                "and the tracing results come from different runs; re-run stage=trace then stage=unify"
            )
        return firing[0] if side == "d" else firing[1]


def label_positions(ctx: RunContext, with_tokens: bool) -> list[dict[str, int]]:
    """Label -> position for each prompt: role labels, or token labels with ``trace.with_tokens``."""
    prompts = ctx.prompts
    per_prompt = prompts.token_labels(ctx.model.tokenizer) if with_tokens else prompts.labels
    return [{label: int(pos) for pos, label in labels.items()} for labels in per_prompt]


@dataclass
class InterventionInputs:
    """What an edge-intervention job reads: the combined graph, the tracing results' selected terms, the
    Omega SVDs the tracer used, the task metric on a subset of prompts, and label positions per prompt."""

    source: Path
    results: Path
    graph: nx.MultiDiGraph
    terms: SelectedTerms
    omega: OmegaCache
    metric: Callable[[Tensor, list[int]], Tensor]
    positions: list[dict[str, int]]


def load_intervention_inputs(cfg: AppConfig, ctx: RunContext, threshold: float) -> InterventionInputs:
    """Read the combined graph at ``threshold`` and the tracing results (clear errors naming the stage
    that produces a missing one), and build the model-side pieces both intervention stages need."""
    from attncomm.methods.acc_tracing import build_omega_cache

    arts = ctx.artifacts
    source = arts.require(arts.combined_graph(threshold), "combined_graphs")
    from attncomm.io.completeness import require_merged_results
    from attncomm.io.provenance import require_trace_inputs_match

    require_trace_inputs_match(cfg, arts.tracing_results_dir, "interventions", include_model=True)
    results = require_merged_results(arts, cfg.model.name, "interventions", cfg.allow_partial)
    task, prompts = ctx.task, ctx.prompts

    def metric(logits: Tensor, ids: list[int]) -> Tensor:
        return task.metric(logits, prompts.subset(ids))

    return InterventionInputs(
        source=source,
        results=results,
        graph=read_graph(source),
        terms=SelectedTerms(results),
        omega=build_omega_cache(ctx.model, ctx.dtype),
        metric=metric,
        positions=label_positions(ctx, cfg.trace.with_tokens),
    )


@register_stage(
    "interventions",
    consumes=("combined_graphs", "tracing_results"),
    produces=("interventions_graph",),
    needs_model=True,
)
def run_interventions(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Remove each combined-graph edge's signal and record the per-prompt logit-diff change (section 7)."""
    ic = cfg.interventions
    arts = ctx.artifacts
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
