"""``discover``: score every edge of the model's edge graph with ``method=eap|eap-ig|exact|acc``.

Writes ``circuits/{method}/{model}_{task}_edges.json`` in MIB / EAP-IG JSON: every edge's score and, as
``in_graph``, the method's circuit (``method.select`` at ``method.budget`` percent of edges, pruned; for
``acc`` the pruned ACC circuit at ``method.acc_threshold``, default ``compare.threshold``). The
computations are in :mod:`attncomm.methods.edge_patching` and :mod:`attncomm.methods.acc_edges`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from attncomm.core.edge_graph import EdgeGraph, GraphShape, check_budget, select
from attncomm.errors import ConfigError
from attncomm.io.graphml import read_graph
from attncomm.io.mib_json import EdgeCircuit, write_mib_json
from attncomm.io.provenance import guard_stage_outputs
from attncomm.methods.acc_edges import map_acc_graph
from attncomm.methods.circuit_sources import check_method, edges_json
from attncomm.methods.edge_patching import (
    IG_VARIANTS,
    check_supported,
    eap_scores,
    exact_scores,
    graph_shape,
    make_ablation,
)
from attncomm.models.dimensions import graph_dims
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage

log = logging.getLogger(__name__)

#: above this many edges ``exact`` logs a warning (one forward pass per edge and batch)
EXACT_WARN_EDGES = 5000


def batch_size(cfg: AppConfig) -> int:
    return int(cfg.method.batch_size or cfg.task.batch_size)


def task_metric(ctx: RunContext):
    """``metric(logits, idx)``: the task metric of the prompts ``idx``."""
    prompts, task = ctx.prompts, ctx.task

    def metric(logits: Tensor, idx: Tensor) -> Tensor:
        return task.metric(logits, prompts.subset(idx))

    return metric


def check_selection(cfg: AppConfig) -> None:
    """Validate ``method.select`` / ``method.budget`` / ``method.ig_variant`` before any work."""
    if cfg.method.select not in ("topn", "greedy", "threshold"):
        raise ConfigError(f"method.select={cfg.method.select!r} is not one of topn, greedy, threshold")
    if cfg.method.ig_variant not in IG_VARIANTS:
        choices = ", ".join(IG_VARIANTS)
        raise ConfigError(f"method.ig_variant={cfg.method.ig_variant!r} is not one of {choices}")
    if cfg.method.select != "threshold":
        check_budget(cfg.method.budget, "method.budget")


def acc_scores(cfg: AppConfig, ctx: RunContext, graph: EdgeGraph) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """ACC's intervention scores (the interventions graph, when present) and its pruned circuit."""
    arts = ctx.artifacts
    th = cfg.method.acc_threshold if cfg.method.acc_threshold is not None else cfg.compare.threshold
    pruned = read_graph(arts.require(arts.pruned_graph(th), "pruned_graphs"))
    _, circuit, report = map_acc_graph(graph, pruned)
    source = arts.interventions_graph(cfg.interventions.threshold)
    if source.is_file():
        scores, _, score_report = map_acc_graph(graph, read_graph(source))
    else:
        log.warning("no interventions graph %s: ACC edge scores come from the pruned graph only", source)
        scores, score_report = map_acc_graph(graph, pruned)[0], report
    scores = torch.where(circuit & torch.isnan(scores), torch.zeros_like(scores), scores)
    meta = {"acc_threshold": th, "acc_circuit_mapping": report, "acc_score_mapping": score_report}
    log.info("ACC pruned graph th=%s mapped: %s", th, report)
    return scores, circuit, meta


def discover_shape(cfg: AppConfig, ctx: RunContext, method: str) -> GraphShape:
    """The edge graph's shape: for ``acc`` (which only maps recorded graphs) from the model's
    ``config.json`` without loading the weights when it is at hand, else from the loaded model."""
    if method == "acc":
        dims = graph_dims(cfg.model, ctx.cache_dir)
        if dims is not None:
            return GraphShape(dims.n_layers, dims.n_heads, dims.parallel_attn, dims.d_model)
    model = ctx.model
    check_supported(model)
    return graph_shape(model)


def warn_if_pruned_away(graph: EdgeGraph, scores: torch.Tensor, cfg: AppConfig, kept: int) -> None:
    """Warn when the selection kept edges but pruning (edges not on a path from the input to the logits)
    left none: a silently empty circuit. Top-n picks the highest-scoring edges wherever they are, so on
    a small graph a few percent may not connect; the greedy selection grows a connected circuit."""
    if kept:
        return
    value = cfg.method.threshold if cfg.method.select == "threshold" else cfg.method.budget
    chosen = int(select(graph, scores, cfg.method.select, value, cfg.method.absolute, do_prune=False).sum())
    if chosen == 0:
        log.warning(
            "the circuit is empty: method.select=%s selects no edge of %d (method.budget=%s%%, "
            "method.threshold=%s); raise method.budget or lower method.threshold",
            cfg.method.select,
            graph.n_edges,
            cfg.method.budget,
            cfg.method.threshold,
        )
        return
    log.warning(
        "the circuit is empty: method.select=%s picked %d of %d edges, but none lies on a path from the "
        "input to the logits, so pruning removed them all; use method.select=greedy (a connected circuit "
        "grown from the logits) or a larger method.budget",
        cfg.method.select,
        chosen,
        graph.n_edges,
    )


@register_stage("discover", consumes=(), produces=("edge_scores",), needs_model=True)
def run_discover(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Score every edge with the chosen method and write the MIB / EAP-IG JSON."""
    method = check_method(cfg.method.name)
    check_selection(cfg)
    guard_stage_outputs(cfg, ctx, "discover")
    graph = EdgeGraph(discover_shape(cfg, ctx, method))
    meta: dict[str, Any] = {
        "method": method,
        "model": ctx.model_short,
        "task": ctx.task_name,
        "n_prompts": ctx.n_prompts,
        "seed": ctx.seed,
        "sign": "clean - corrupted",
    }
    if method == "acc":
        scores, in_graph, extra = acc_scores(cfg, ctx, graph)
        meta.update(extra)
    else:
        model = ctx.model
        prompts = ctx.prompts
        corrupted = prompts.require_corrupted(f"method={method}")
        metric = task_metric(ctx)
        bs = batch_size(cfg)
        if method in ("eap", "eap-ig"):
            steps = 1 if method == "eap" else int(cfg.method.ig_steps)
            variant = "inputs" if method == "eap" else str(cfg.method.ig_variant)
            scores = eap_scores(
                model, graph, prompts.tokens, corrupted, metric, bs, steps, progress=True, ig_variant=variant
            )
            meta["ig_steps"] = steps
            if method == "eap-ig":
                meta["ig_variant"] = variant
        else:
            if graph.n_edges > EXACT_WARN_EDGES:
                log.warning(
                    "method=exact patches %d edges one at a time (%d forward passes per batch); "
                    "meant for toy and tiny models",
                    graph.n_edges,
                    graph.n_edges,
                )
            ablation = make_ablation(
                cfg.evaluate.ablation, model, graph, prompts.tokens, prompts.lengths, corrupted, bs
            )
            scores = exact_scores(
                model, graph, prompts.tokens, ablation, metric, bs, progress=True, positions=prompts.end
            )
            meta["ablation"] = cfg.evaluate.ablation
        value = cfg.method.threshold if cfg.method.select == "threshold" else cfg.method.budget
        in_graph = select(graph, scores, cfg.method.select, value, cfg.method.absolute)
        warn_if_pruned_away(graph, scores, cfg, int(in_graph.sum()))
        meta.update(
            {"select": cfg.method.select, "budget": cfg.method.budget, "threshold": cfg.method.threshold}
        )
    circuit = EdgeCircuit(graph, scores, in_graph, meta=meta)
    path = write_mib_json(circuit, edges_json(ctx.run_dir, method, ctx.model_short, ctx.task_name))
    finite = scores[graph.real & ~torch.isnan(scores)]
    top = torch.topk(finite.abs(), min(5, finite.numel())).values.tolist() if finite.numel() else []
    log.info(
        "%s: %d of %d edges scored, circuit %d edges -> %s; top |scores| %s",
        method,
        finite.numel(),
        graph.n_edges,
        circuit.n_edges,
        path,
        [round(v, 4) for v in top],
    )
    ctx.record("discover", [path], {"method": method})
    metrics = {
        "discover/n_edges": graph.n_edges,
        "discover/n_scored": int(finite.numel()),
        "discover/circuit_edges": circuit.n_edges,
        "discover/circuit_nodes": int(circuit.nodes_in_graph.sum()),
    }
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(path, f"{ctx.model_short}_{ctx.task_name}_{method}_edges", "circuit")
    return metrics
