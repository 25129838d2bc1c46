"""``prune``: prune the intervention graph at thresholds 0..1 (docs/METHOD.md section 7)."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from attncomm.core.node_ids import GraphFormatError
from attncomm.core.pruning import prune, prune_thresholds
from attncomm.errors import ConfigError
from attncomm.io.graphml import read_graph, write_graph
from attncomm.io.provenance import guard_stage_outputs
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage

log = logging.getLogger(__name__)


def resolve_n_min(cfg: AppConfig) -> int:
    """``prune.n_min`` if set, else the model's published value for the task, else ``prune.n_min_default``."""
    n_min = cfg.prune.n_min
    if n_min is None:
        n_min = cfg.model.n_min.get(cfg.task.name, cfg.prune.n_min_default)
    if n_min < 1:
        raise ConfigError(f"prune.n_min={n_min} must be at least 1")
    return int(n_min)


@register_stage("prune", consumes=("interventions_graph",), produces=("pruned_graphs",), needs_model=False)
def run_prune(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Keep edges seen in >= n_min prompts with |mean logit diff| >= th, for th = 0..1 (section 7)."""
    arts = ctx.artifacts
    source = arts.require(arts.interventions_graph(cfg.interventions.threshold), "interventions_graph")
    guard_stage_outputs(cfg, ctx, "prune")
    G = read_graph(source)
    n_min = resolve_n_min(cfg)
    rows, written = [], []
    for th in tqdm(prune_thresholds(cfg.prune.step), desc="prune", leave=False):
        try:
            P = prune(G, th, n_min)
        except GraphFormatError as exc:
            raise GraphFormatError(f"{source}: {exc}") from None
        written.append(write_graph(P, arts.pruned_graph(th)))
        rows.append({"threshold": th, "nodes": P.number_of_nodes(), "edges": P.number_of_edges()})
    table = pd.DataFrame(rows)
    log.info("pruned %s with n_min=%d:\n%s", source.name, n_min, table.to_string(index=False))
    ctx.record("prune", written, {"n_min": n_min, "source": source.name})
    metrics: dict[str, Any] = {"prune/n_min": n_min}
    for row in rows:
        metrics[f"prune/nodes@{row['threshold']}"] = row["nodes"]
        metrics[f"prune/edges@{row['threshold']}"] = row["edges"]
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_table("prune/sizes", table)
    ctx.tracker.log_artifact(arts.pruned_graphs_dir, f"{arts.prefix}_pruned_graphs", "graphs")
    return metrics
