"""``evaluate``: faithfulness of a method's circuits over MIB's edge budgets, CPR and CMD.

Reads ``circuits/{method}/{model}_{task}_edges.json`` (``stage=discover``), ablates every edge outside
each circuit (``evaluate.ablation``: patching from the corrupted prompts, the mean over the task's
prompts, or zero) and reports the normalised metric ``(circuit - empty) / (clean - empty)`` at every
budget of ``evaluate.budgets`` (percent of all edges; ``evaluate.select`` topn or greedy, then pruned),
the method's own circuit (the JSON's ``in_graph``) and ``evaluate.circuit`` when set. CPR and CMD are
the areas of :mod:`attncomm.core.faithfulness`. Writes ``circuits/{method}/{model}_{task}_faithfulness.csv``
with one row per evaluated circuit plus two rows ``CPR`` and ``CMD`` (their value in ``faithfulness``).
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch

from attncomm.core.edge_graph import EdgeGraph, budget_edges, check_budget, prune, select
from attncomm.core.faithfulness import curve_areas, normalized_faithfulness
from attncomm.errors import ConfigError, MissingArtifactError
from attncomm.io.artifacts import write_table
from attncomm.io.circuits_data import load_circuits_data, with_shipped_reference
from attncomm.io.mib_json import read_mib_json
from attncomm.io.provenance import guard_stage_outputs
from attncomm.methods.acc_edges import complete_untraced_slots
from attncomm.methods.circuit_sources import check_method, edges_json, faithfulness_csv, load_fixed_circuit
from attncomm.methods.edge_patching import (
    ABLATIONS,
    check_supported,
    evaluate_circuits,
    graph_shape,
    make_ablation,
)
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.stages.discover import batch_size, task_metric

log = logging.getLogger(__name__)

COLUMNS = [
    "method",
    "model",
    "task",
    "ablation",
    "circuit",
    "budget_percent",
    "n_edges",
    "n_nodes",
    "metric",
    "faithfulness",
]


def check_evaluate_config(cfg: AppConfig) -> list[float]:
    """Validate ablation, selection and budgets (each in (0, 100], strictly increasing); return budgets."""
    ev = cfg.evaluate
    if ev.ablation not in ABLATIONS:
        raise ConfigError(f"evaluate.ablation={ev.ablation!r} is not one of {', '.join(ABLATIONS)}")
    if ev.select not in ("topn", "greedy"):
        raise ConfigError(f"evaluate.select={ev.select!r} is not one of topn, greedy")
    if ev.acc_untraced not in ("complete", "ablate"):
        raise ConfigError(f"evaluate.acc_untraced={ev.acc_untraced!r} is not one of complete, ablate")
    budgets = [float(b) for b in ev.budgets]
    for b in budgets:
        check_budget(b)
    if any(b2 <= b1 for b1, b2 in zip(budgets, budgets[1:], strict=False)):
        raise ConfigError(f"evaluate.budgets={budgets} must increase strictly")
    return budgets


def finish_acc(graph: EdgeGraph, edges: torch.Tensor, cfg: AppConfig) -> torch.Tensor:
    """An ACC circuit as evaluated: with ``evaluate.acc_untraced=complete`` its heads' value inputs and
    its MLPs' inputs come from every earlier circuit node, then it is pruned; with ``ablate`` it is
    taken as mapped, unpruned (ACC never traces into MLPs, so pruning would cut every path that starts
    at an MLP)."""
    if cfg.evaluate.acc_untraced == "ablate":
        return edges & graph.real
    return prune(graph, complete_untraced_slots(graph, edges))[0]


@register_stage("evaluate", consumes=("edge_scores",), produces=("faithfulness",), needs_model=True)
def run_evaluate(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Faithfulness curve, CPR and CMD of a method's edge scores (and of fixed circuits)."""
    method = check_method(cfg.method.name)
    budgets = check_evaluate_config(cfg)
    guard_stage_outputs(cfg, ctx, "evaluate")
    model = ctx.model
    check_supported(model)
    shape = graph_shape(model)
    graph = EdgeGraph(shape)
    model_name, task_name = ctx.model_short, ctx.task_name
    fixed: list[tuple[str, torch.Tensor]] = []
    if cfg.evaluate.circuit:
        data = with_shipped_reference(load_circuits_data(), model_name, task_name, cfg.model.path)
        label, circuit = load_fixed_circuit(cfg.evaluate.circuit, shape, data, model_name, task_name)
        fixed.append((label, circuit.in_graph))
    path = edges_json(ctx.run_dir, method, model_name, task_name)
    acc = method == "acc"
    scores = None
    if path.is_file():
        own = read_mib_json(path, expected=shape)
        scores = own.scores
        fixed.insert(0, (f"{method} circuit", finish_acc(graph, own.in_graph, cfg) if acc else own.in_graph))
    elif not fixed:
        raise MissingArtifactError(
            str(path),
            "discover",
            f"python run.py stage=discover method={method} model={cfg.model.name} task={task_name}",
        )

    circuits: list[tuple[str, float, torch.Tensor]] = [
        ("clean", 100.0, graph.full()),
        ("empty", 0.0, graph.empty()),
    ]
    if scores is not None:
        for b in budgets:
            edges = select(graph, scores, cfg.evaluate.select, b, cfg.method.absolute, do_prune=not acc)
            circuits.append(("budget", b, finish_acc(graph, edges, cfg) if acc else edges))
    for label, edges in fixed:
        if not (acc and label == f"{method} circuit"):  # ACC's own circuit is finished already
            edges = prune(graph, edges)[0]
        circuits.append((label, 100.0 * int(edges.sum()) / graph.n_edges, edges))

    prompts = ctx.prompts
    corrupted = None
    if cfg.evaluate.ablation == "patching":
        corrupted = prompts.require_corrupted("evaluate.ablation=patching")
    bs = batch_size(cfg)
    ablation = make_ablation(
        cfg.evaluate.ablation, model, graph, prompts.tokens, prompts.lengths, corrupted, bs
    )
    values = evaluate_circuits(
        model,
        graph,
        prompts.tokens,
        ablation,
        [c[2] for c in circuits],
        task_metric(ctx),
        bs,
        progress=True,
        positions=prompts.end,  # every task's metric reads the logits at ``end`` only
    ).tolist()
    clean_m, empty_m = values[0], values[1]
    rows = []
    for (label, budget, edges), value in zip(circuits, values, strict=True):
        rows.append(
            {
                "method": method,
                "model": model_name,
                "task": task_name,
                "ablation": cfg.evaluate.ablation,
                "circuit": label,
                "budget_percent": budget,
                "n_edges": int((edges & graph.real).sum()),
                "n_nodes": int(prune(graph, edges)[1].sum()),
                "metric": value,
                "faithfulness": normalized_faithfulness(value, clean_m, empty_m),
            }
        )
    metrics: dict[str, Any] = {"evaluate/clean_metric": clean_m, "evaluate/empty_metric": empty_m}
    curve = [r for r in rows if r["circuit"] == "budget"]
    if len(curve) >= 2:
        cpr, cmd = curve_areas(
            [r["budget_percent"] for r in curve], [r["faithfulness"] for r in curve], cfg.evaluate.log_x
        )
        for name, value in (("CPR", cpr), ("CMD", cmd)):
            rows.append({**{k: None for k in COLUMNS}, "method": method, "model": model_name})
            rows[-1].update({"task": task_name, "ablation": cfg.evaluate.ablation, "circuit": name})
            rows[-1]["faithfulness"] = value
        metrics.update({"evaluate/cpr": cpr, "evaluate/cmd": cmd})
    for r in rows:
        if r["circuit"] not in ("budget", "CPR", "CMD", "clean", "empty"):
            metrics[f"evaluate/faithfulness/{r['circuit']}"] = r["faithfulness"]
    table = pd.DataFrame(rows, columns=COLUMNS)
    out = write_table(table, faithfulness_csv(ctx.run_dir, method, model_name, task_name))
    log.info(
        "faithfulness of %s (%s ablation) -> %s\n%s", method, cfg.evaluate.ablation, out, table.to_string()
    )
    ctx.record("evaluate", [out], {"method": method, "ablation": cfg.evaluate.ablation})
    ctx.tracker.log_table(f"evaluate/{method}", table)
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if v is not None})
    return metrics


def budget_sizes(graph: EdgeGraph, budgets: list[float]) -> list[int]:
    """Edges per budget before pruning (for logs and docs)."""
    return [budget_edges(graph, b) for b in budgets]
