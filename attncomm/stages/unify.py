"""``unify``: combine the per-prompt traced graphs into the combined graphs (docs/METHOD.md section 6)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import networkx as nx
from tqdm.auto import tqdm

from attncomm.core.unification import unify
from attncomm.errors import MissingArtifactError
from attncomm.io.graphml import read_graph, traced_graph_prompt, write_graph
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage

log = logging.getLogger(__name__)


def read_traced_graphs(ctx: RunContext) -> dict[int, nx.MultiDiGraph]:
    """Every traced graph of this run (``{model}_{task}_n{N}_{prompt}_{seed}.graphml``), by prompt id."""
    arts = ctx.artifacts
    folder = arts.require(arts.traced_graphs_dir, "traced_graphs")
    files: dict[int, Path] = {}
    for path in sorted(folder.glob(f"{arts.prefix}_*_{arts.seed}.graphml")):
        prompt = traced_graph_prompt(path)
        if arts.traced_graph(prompt) == path:
            files[prompt] = path
    if not files:
        raise MissingArtifactError(
            str(arts.traced_graphs_dir / f"{arts.prefix}_{{prompt}}_{arts.seed}.graphml"),
            "trace",
            f"python run.py stage=trace model=<model> task={arts.task} task.n_prompts={arts.n}",
        )
    return {p: read_graph(f) for p, f in tqdm(sorted(files.items()), desc="read traced graphs", leave=False)}


@register_stage("unify", consumes=("traced_graphs",), produces=("combined_graphs",), needs_model=False)
def run_unify(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Combine the traced graphs of all prompts and filter them by node frequency (section 6)."""
    from attncomm.io.completeness import require_complete_trace
    from attncomm.io.provenance import guard_stage_outputs, require_trace_inputs_match

    require_trace_inputs_match(cfg, ctx.artifacts.tracing_results_dir, "unify", include_model=False)
    require_complete_trace(ctx.artifacts, cfg.model.name, "unify", cfg.allow_partial)
    guard_stage_outputs(cfg, ctx, "unify")
    graphs = read_traced_graphs(ctx)
    combined = unify(graphs, cfg.unify.thresholds)
    written = []
    metrics: dict[str, Any] = {"unify/n_traced": len(graphs)}
    for th, G in sorted(combined.items()):
        path = write_graph(G, ctx.artifacts.combined_graph(th))
        written.append(path)
        metrics[f"unify/nodes@{th}"] = G.number_of_nodes()
        metrics[f"unify/edges@{th}"] = G.number_of_edges()
        log.info(
            "combined graph th=%s: %d nodes, %d edges -> %s",
            th,
            G.number_of_nodes(),
            G.number_of_edges(),
            path,
        )
    ctx.record("unify", written, {"n_traced": len(graphs), "prompts": sorted(graphs)})
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(
        ctx.artifacts.combined_graphs_dir, f"{ctx.artifacts.prefix}_combined_graphs", "graphs"
    )
    return metrics
