"""``experiments``: intervention experiments on chosen edges (docs/METHOD.md section 9).

Reads the combined graph at ``experiments.threshold`` (published: 0.7) and the tracing results. For
each chosen edge (``experiments.edges`` = ``[[upstream_id, downstream_id, description], ...]``; None:
the packaged ``edges_for_intervention_experiments`` of the model's short name and task) and each
prompt the edge appeared in, four operations: remove or boost the edge's signal, built on the
firing's selected singular terms or on an equally sized random set of the complement. One random
generator seeded with ``experiments.seed`` (published: 0) serves the whole run; the draw order is in
:mod:`attncomm.core.edge_experiments`.

Writes ``intervention_data/{model}_{task}.parquet``: one row per edge x operation x prompt for all
``task.n_prompts`` prompts (``is_ablated`` False where the edge does not appear), with the published
column names (plus ``edge_type, n_terms, terms``); ``intervention_data/{model}_{task}_summary.csv``:
one row per chosen edge and operation (``rows`` 0 for an edge that is not in the graph); figures
``figures/experiments_{model}_{task}_{logit_diff,attention,norm_ratio}.{png,pdf}``. Tables, figures
and summary metrics are logged to wandb. Batches hold ``task.batch_size`` rows.

An edge that is not in the graph is a warning and gets no rows (not an error); a malformed edge id
is an error naming it. ``logit_diff`` uses the task's own sign (published greater-than values have
the opposite sign; ``logit_diff_metric`` is unaffected).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from attncomm.core.edge_experiments import (
    ExperimentEdge,
    ExperimentResult,
    parse_experiment_edges,
    run_experiments,
    summarize,
)
from attncomm.core.node_ids import format_node_id
from attncomm.errors import ConfigError
from attncomm.io.artifacts import write_table
from attncomm.io.circuits_data import (
    NoReferenceCircuitError,
    intervention_experiment_edges,
    load_circuits_data,
)
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.plots import experiment_attention_boxes, experiment_effect_boxes, save_figure

log = logging.getLogger(__name__)


def chosen_edges(cfg: AppConfig, model_short: str, task: str) -> list[ExperimentEdge]:
    """``experiments.edges``, or the packaged published edges of ``model_short``/``task``."""
    raw = cfg.experiments.edges
    if raw is None:
        try:
            raw = intervention_experiment_edges(load_circuits_data(), model_short, task)
        except NoReferenceCircuitError:
            raise ConfigError(
                f"no published intervention-experiment edges for {model_short}/{task}; choose edges with "
                'experiments.edges=\'[["(upstream id)", "(downstream id)", "description"]]\' '
                "(node ids as in the combined graph)"
            ) from None
    edges = parse_experiment_edges([list(e) if not isinstance(e, str) else e for e in raw])
    if not edges:
        raise ConfigError("experiments.edges is empty; give at least one [upstream_id, downstream_id]")
    return edges


def check_edges_fit_model(edges: list[ExperimentEdge], n_layers: int, n_heads: int, model: str) -> None:
    """Every node of ``edges`` names a layer and head that exist in the model (else a ConfigError)."""
    for i, edge in enumerate(edges):
        for node in (edge.upstream, edge.downstream):
            layer, comp = node[0], node[1]
            if not 0 <= int(layer) < n_layers or (isinstance(comp, int) and not 0 <= comp < n_heads):
                raise ConfigError(
                    f"experiments.edges[{i}]: node {format_node_id(node)} is outside model {model} "
                    f"({n_layers} layers of {n_heads} heads); use node ids of this model's combined graph"
                )


def _metrics(result: ExperimentResult, summary: pd.DataFrame) -> dict[str, Any]:
    table = result.table
    metrics: dict[str, Any] = {
        "experiments/edges": len(result.edges),
        "experiments/edges_missing": len(result.missing),
        "experiments/rows": len(table),
        "experiments/ablated_rows": int(table["is_ablated"].sum()) if len(table) else 0,
    }
    for row in summary.itertuples(index=False):
        key = f"experiments/edge{row.edge_index}/{row.operation}"
        metrics[f"{key}/rows"] = int(row.rows)
        metrics[f"{key}/ablated"] = int(row.ablated)
        for name in ("mean_logit_diff_metric", "mean_attention_change", "mean_norm_ratio"):
            value = float(getattr(row, name))
            if np.isfinite(value):
                metrics[f"{key}/{name}"] = value
    return metrics


@register_stage(
    "experiments",
    consumes=("combined_graphs", "tracing_results"),
    produces=("intervention_data",),
    needs_model=True,
)
def run_experiments_stage(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Intervention experiments: remove/boost chosen edges' signals, selected or random terms (section 9)."""
    from attncomm.io.provenance import guard_stage_outputs
    from attncomm.methods.intervention_inputs import load_intervention_inputs

    ec = cfg.experiments
    arts = ctx.artifacts
    edges = chosen_edges(cfg, ctx.model_short, ctx.task_name)
    arts.require(arts.combined_graph(ec.threshold), "combined_graphs")
    guard_stage_outputs(cfg, ctx, "experiments")
    inputs = load_intervention_inputs(cfg, ctx, ec.threshold)
    arch = ctx.model.arch
    check_edges_fit_model(edges, arch.n_layers, arch.n_heads, cfg.model.name)
    source = inputs.source
    log.info(
        "experiments %s/%s: %d edges on %s (threshold %g), seed %d",
        ctx.model_short,
        ctx.task_name,
        len(edges),
        source.name,
        ec.threshold,
        ec.seed,
    )
    result = run_experiments(
        inputs.graph,
        edges,
        ctx.model,
        ctx.prompts.tokens,
        inputs.metric,
        inputs.positions,
        inputs.terms,
        inputs.omega,
        seed=ec.seed,
        model_name=ctx.model_short,
        batch_size=max(1, cfg.task.batch_size),
        graph_name=source.name,
    )
    summary = summarize(result)
    stem = arts.stem
    path = write_table(result.table, arts.intervention_data)
    summary_path = write_table(summary, arts.intervention_data.with_name(f"{stem}_summary.csv"))
    written = [path, summary_path]
    title = f"{ctx.model_short} {ctx.task_name}"
    figures = {
        "logit_diff": experiment_effect_boxes(result.table, title=f"{title}: relative logit-diff change"),
        "attention": experiment_attention_boxes(result.table, title=f"{title}: downstream attention A[d, s]"),
        "norm_ratio": experiment_effect_boxes(
            result.table,
            "norm_ratio",
            "||x +/- r|| / ||x|| of the head input",
            f"{title}: size of the intervention",
        ),
    }
    for name, fig in figures.items():
        written += save_figure(fig, arts.figures_dir / f"experiments_{stem}_{name}")
        ctx.tracker.log_figure(f"experiments/{name}_figure", fig)

    metrics = _metrics(result, summary)
    for row in summary.itertuples(index=False):
        if row.operation == "remove_svs" and row.in_graph:
            log.info(
                "experiments: %s [%s]: %d/%d prompts ablated; mean relative logit-diff change: %s",
                row.edge_labeled,
                row.edge_labeled_group,
                row.ablated,
                ctx.n_prompts,
                ", ".join(
                    f"{s.operation_performed} {s.mean_logit_diff_metric:+.4g}"
                    for s in summary[summary["edge_index"] == row.edge_index].itertuples(index=False)
                ),
            )
    ctx.record(
        "experiments",
        [p for p in written if p.is_relative_to(arts.run_dir)],
        {
            "source": source.name,
            "tracing_results": inputs.results.name,
            "threshold": ec.threshold,
            "seed": ec.seed,
            "edges": [
                [format_node_id(e.upstream), format_node_id(e.downstream), e.description] for e in edges
            ],
            "missing_edges": [e.label for e in result.missing],
            **metrics,
        },
    )
    ctx.tracker.log_table("experiments/summary", summary)
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(path, f"{stem}_intervention_data", "table")
    return metrics
