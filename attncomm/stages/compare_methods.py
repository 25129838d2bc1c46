"""``compare_methods``: the circuits of several methods side by side, and against the literature.

For each method of ``compare_methods.methods`` with an edges JSON in the run directory (``stage=discover``),
its circuit is the JSON's ``in_graph`` (pruned). The literature's canonical circuit (expanded to edges as
in :func:`attncomm.methods.circuit_sources.literature_edges`) joins when ``compare_methods.literature``.
Writes, under ``circuits/``:

- ``compare_{model}_{task}.csv``: node- and edge-level precision / recall / F1 of every pair (A the
  reference: the literature circuit, else the earlier method in the list);
- ``summary_{model}_{task}.csv``: per circuit its edges, nodes, and (from ``stage=evaluate``) CPR, CMD and
  faithfulness;

and the figure ``figures/methods_{model}_{task}.png/.pdf`` (:func:`attncomm.viz.method_plots.methods_figure`).
The paper's ACC-vs-literature node table stays the ``compare`` stage's (unchanged).
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch

from attncomm.core.edge_graph import EdgeGraph, GraphShape, prune
from attncomm.core.edge_overlap import LEVELS, circuit_items, compare_circuits
from attncomm.errors import AttncommError
from attncomm.io.artifacts import write_table
from attncomm.io.circuits_data import (
    NoReferenceCircuitError,
    canonical_method,
    load_circuits_data,
    with_shipped_reference,
)
from attncomm.io.mib_json import read_mib_json
from attncomm.io.provenance import RECORDS_DIR, require_same_model_and_task
from attncomm.methods.circuit_sources import check_method, edges_json, faithfulness_csv, literature_edges
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.method_plots import methods_figure
from attncomm.viz.plots import save_figure

log = logging.getLogger(__name__)


def _faithfulness_rows(path: Any) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


@register_stage("compare_methods", consumes=("edge_scores",), produces=("method_comparison",))
def run_compare_methods(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Node- and edge-level P/R/F1 between methods' circuits and the literature; summary and figure."""
    model, task = ctx.model_short, ctx.task_name
    circuits: dict[str, torch.Tensor] = {}
    graph: EdgeGraph | None = None
    shape: GraphShape | None = None
    for method in cfg.compare_methods.methods:
        check_method(method)
        path = edges_json(ctx.run_dir, method, model, task)
        if not path.is_file():
            log.info("no %s circuit (%s): skipped", method, path)
            continue
        record = ctx.run_dir / RECORDS_DIR / f"discover-{method}.json"
        require_same_model_and_task(cfg, ctx, "compare_methods", record, f"stage=discover method={method}")
        circuit = read_mib_json(path, expected=shape)
        shape = shape or circuit.graph.shape
        graph = graph or circuit.graph
        circuits[method] = prune(graph, circuit.in_graph)[0]
    if graph is None:
        raise AttncommError(
            f"no method circuits in {ctx.run_dir / 'circuits'} for methods "
            f"{list(cfg.compare_methods.methods)}; "
            f"run stage=discover method=NAME model={cfg.model.name} task={task} first"
        )
    reference: str | None = None
    if cfg.compare_methods.literature:
        data = with_shipped_reference(load_circuits_data(), model, task, cfg.model.path)
        try:
            lit = canonical_method(data, model, task)
            reference = f"literature:{lit}"
            circuits = {reference: literature_edges(graph, data, model, task, lit).in_graph, **circuits}
        except NoReferenceCircuitError:
            log.info("no literature circuit for %s/%s: methods compared with each other only", model, task)

    names = list(circuits)
    rows = []
    for ia, a in enumerate(names):
        for b in names[ia + 1 :]:
            result = compare_circuits(graph, circuits[a], circuits[b])
            for level in LEVELS:
                rows.append({"A": a, "B": b, "level": level, **result[level], "model": model, "task": task})
    pairs = pd.DataFrame(rows)
    written = [write_table(pairs, ctx.run_dir / "circuits" / f"compare_{model}_{task}.csv")]

    summary_rows, curves = [], []
    for name, edges in circuits.items():
        entry: dict[str, Any] = {
            "circuit": name,
            "n_edges": int(edges.sum()),
            "n_nodes": len(circuit_items(graph, edges, "node")),  # heads and MLPs
            "cpr": float("nan"),
            "cmd": float("nan"),
            "faithfulness": float("nan"),
        }
        if not name.startswith("literature:"):
            faith = _faithfulness_rows(faithfulness_csv(ctx.run_dir, name, model, task))
            if faith is not None:
                for key in ("CPR", "CMD"):
                    hit = faith[faith["circuit"] == key]
                    if len(hit):
                        entry[key.lower()] = float(hit["faithfulness"].iloc[0])
                own = faith[faith["circuit"] == f"{name} circuit"]
                if len(own):
                    entry["faithfulness"] = float(own["faithfulness"].iloc[0])
                curves.append(faith[faith["circuit"] == "budget"])
        summary_rows.append(entry)
    summary = pd.DataFrame(summary_rows).assign(model=model, task=task)
    written.append(write_table(summary, ctx.run_dir / "circuits" / f"summary_{model}_{task}.csv"))
    curve_table = (
        pd.concat(curves) if curves else pd.DataFrame(columns=["method", "budget_percent", "faithfulness"])
    )
    fig = methods_figure(curve_table, summary, title=f"{model} {task}")
    written += save_figure(fig, ctx.artifacts.figures_dir / f"methods_{model}_{task}")
    log.info("method comparison -> %s\n%s\n%s", written[0], pairs.to_string(), summary.to_string())
    ctx.record("compare_methods", written, {"methods": names})
    ctx.tracker.log_table("compare_methods/pairs", pairs)
    ctx.tracker.log_table("compare_methods/summary", summary)
    ctx.tracker.log_figure("compare_methods/figure", fig)
    metrics: dict[str, Any] = {"compare_methods/n_circuits": len(names)}
    if reference is not None:
        for row in rows:
            if row["A"] == reference:
                metrics[f"compare_methods/{row['B']}/{row['level']}_f1"] = row["f1"]
    return metrics
