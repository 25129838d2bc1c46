"""What the edge-intervention stages (``interventions``, ``experiments``) read, loaded in one place.

:func:`load_intervention_inputs` reads the combined graph at a threshold and the tracing results (a
clear error names the stage producing a missing one) and builds the model-side pieces: the Omega
SVDs the tracer used (:func:`~attncomm.methods.acc_tracing.build_omega_cache`), the task metric on a
subset of prompts, and each prompt's label -> position map (:func:`label_positions`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
from torch import Tensor

from attncomm.core.omega_factors import OmegaCache
from attncomm.io.completeness import require_merged_results
from attncomm.io.graphml import read_graph
from attncomm.io.provenance import require_trace_inputs_match
from attncomm.io.results import SelectedTerms
from attncomm.methods.acc_tracing import build_omega_cache
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext

__all__ = ["InterventionInputs", "label_positions", "load_intervention_inputs"]


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
    arts = ctx.artifacts
    source = arts.require(arts.combined_graph(threshold), "combined_graphs")
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
