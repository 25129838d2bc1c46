"""``compare``: compare the pruned ACC circuit with the literature circuits (docs/METHOD.md section 8)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pandas as pd

from attncomm.core.circuit_overlap import circuit_components, compare_with_literature, ours_label
from attncomm.errors import ConfigError
from attncomm.io.artifacts import atomic_write_text
from attncomm.io.circuits_data import canonical_method, load_circuits_data, with_shipped_reference
from attncomm.io.graphml import read_graph
from attncomm.io.provenance import guard_stage_outputs
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.plots import comparison_across_thresholds, comparison_bar_plot, save_figure

log = logging.getLogger(__name__)


def pruned_thresholds_on_disk(ctx: RunContext) -> list[float]:
    """Thresholds of the pruned graphs present in the run directory."""
    arts = ctx.artifacts
    pattern = re.compile(rf"^{re.escape(arts.prefix)}_(\d+(?:\.\d+)?)\.graphml$")
    found = []
    if arts.pruned_graphs_dir.is_dir():
        for path in arts.pruned_graphs_dir.iterdir():
            match = pattern.match(path.name)
            if match and arts.pruned_graph(float(match.group(1))) == path:
                found.append(float(match.group(1)))
    return sorted(found)


@register_stage("compare", consumes=("pruned_graphs",), produces=("circuit_comparison",), needs_model=False)
def run_compare(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Precision, recall and F1 of the pruned circuit against the canonical literature circuit."""
    arts = ctx.artifacts
    th = cfg.compare.threshold
    produced = pruned_thresholds_on_disk(ctx)
    if produced and not arts.pruned_graph(th).is_file():
        raise ConfigError(
            f"compare.threshold={th} is not among the pruned thresholds produced in "
            f"{arts.pruned_graphs_dir}: valid values are {', '.join(str(t) for t in produced)}"
        )
    G = read_graph(arts.require(arts.pruned_graph(th), "pruned_graphs"))
    guard_stage_outputs(cfg, ctx, "compare")
    model, task = ctx.model_short, ctx.task_name
    data = with_shipped_reference(load_circuits_data(), model, task, cfg.model.path)
    methods = list(cfg.compare.methods) or None
    df = compare_with_literature(G, model, task, data, methods=methods, threshold=th)
    csv_path = arts.comparison_csv(th)
    atomic_write_text(csv_path, df.to_csv(index=False))
    reference = canonical_method(data, model, task)
    log.info(
        "circuit comparison vs %s at th=%s -> %s\n%s", reference, th, csv_path, df.to_string(index=False)
    )

    written = [csv_path]
    fig = comparison_bar_plot(df, reference=reference)
    written += save_figure(fig, arts.figures_dir / f"circuit_comparison_{arts.stem}_{th}")
    ctx.tracker.log_figure("compare/bars", fig)
    by_th = {
        t: compare_with_literature(
            read_graph(arts.pruned_graph(t)), model, task, data, methods=methods, threshold=t
        )
        for t in pruned_thresholds_on_disk(ctx)
    }
    if len(by_th) > 1:
        fig = comparison_across_thresholds(by_th)
        written += save_figure(fig, arts.figures_dir / f"circuit_comparison_{arts.stem}_by_threshold")
        ctx.tracker.log_figure("compare/by_threshold", fig)
        ctx.tracker.log_table(
            "compare/by_threshold", pd.concat([d.assign(threshold=t) for t, d in by_th.items()])
        )

    ours = df[df["Method B"] == ours_label(th)].set_index("Metric")["Value"]
    metrics: dict[str, Any] = {
        "compare/reference": reference,
        "compare/precision": float(ours["Precision"]),
        "compare/recall": float(ours["Recall"]),
        "compare/f1": float(ours["F1-Score"]),
        "compare/n_components": len(circuit_components(G)),
    }
    ctx.record("compare", written, {"reference": reference, "threshold": th})
    ctx.tracker.log_table("compare/table", df)
    ctx.tracker.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, str)})
    ctx.tracker.log_artifact(csv_path, f"{arts.stem}_circuit_comparison", "table")
    return metrics
