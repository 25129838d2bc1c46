"""``sparsity``: sparse attention decomposition statistics from the tracing results (section 9).

Reads only the selected-term datasets of the tracing results (their lengths; never the
contribution tensors, whose shapes alone give the number of heads) and writes under
``sparsity/`` of the run directory:

- ``{model}_{task}_term_counts.parquet``: one row per traced side of a firing
  (``prompt, layer, head, dest, src, side, n_terms, frac_d_head, model, task, d_head``);
- ``{model}_{task}_summary.csv``: per side counts, untraced sides, mean/median/std/min/max terms,
  mean fraction of ``d_head``;
- ``{model}_{task}_histogram.csv``: traced sides per number of terms;
- ``{model}_{task}_head_density.csv``: mean terms per ``(layer, head)`` and side;

and figures ``figures/sparsity_{model}_{task}_{histogram,head_density}.{png,pdf}``. When other runs
of the same artifact root hold sparsity tables of other models or tasks, a figure comparing the
fraction of ``d_head`` across them is added (``figures/sparsity_by_model_task``).

``d_head`` comes, in order, from ``sparsity.d_head`` (if the config has that key), the model's
``config.json`` read without loading weights (``model.path``, the built test model in
``paths.cache_dir``, or the HF cache), the published values of section 9 (64, 64, 256 for
gpt2-small, pythia-160m, gemma-2-2b; both in :mod:`attncomm.models.dimensions`), and last from the
tracing results themselves, where it is only a lower bound (largest selected term index + 1; logged
as a warning). The tracing results are read by :func:`attncomm.io.results.read_term_lengths`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from attncomm.core.term_statistics import (
    SIDES,
    head_density,
    head_density_table,
    head_grid,
    histogram,
    summary,
    term_counts_from_lengths,
    with_fraction,
)
from attncomm.errors import AttncommError
from attncomm.io.artifacts import RUN_DIR_GLOB, atomic_write_text, write_table
from attncomm.io.completeness import require_complete_trace
from attncomm.io.provenance import StaleArtifactError, guard_stage_outputs, require_trace_inputs_match
from attncomm.io.results import read_term_lengths, result_files
from attncomm.models.dimensions import dims_from_config, model_dims
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.plots import head_density_heatmap, save_figure, sparsity_by_model_task, sparsity_histogram

log = logging.getLogger(__name__)

__all__ = ["dims_from_config", "resolve_d_head", "run_sparsity"]  # dims_from_config: re-exported


def resolve_d_head(cfg: AppConfig, lower_bound: int) -> tuple[int, str, int | None, int | None]:
    """``(d_head, where it came from, n_layers, n_heads)``: ``sparsity.d_head``, else
    :func:`attncomm.models.dimensions.model_dims`, else the tracing results' lower bound (a warning)."""
    dims = model_dims(cfg.model, cfg.paths.cache_dir)
    explicit = getattr(cfg.sparsity, "d_head", None)
    if explicit:
        return int(explicit), "sparsity.d_head", dims.n_layers, dims.n_heads
    if dims.d_head:
        return dims.d_head, dims.source, dims.n_layers, dims.n_heads
    log.warning(
        "sparsity: d_head of model %s is unknown (no config.json on disk); using the tracing results' "
        "lower bound %d (largest selected term index + 1)",
        cfg.model.name,
        lower_bound,
    )
    return max(lower_bound, 1), "tracing results (lower bound)", dims.n_layers, dims.n_heads


def _sibling_tables(ctx: RunContext, own: Path) -> list[Path]:
    """Sparsity tables of other runs under the same artifact root (standard layout only)."""
    if ctx.cfg.paths.run_dir:
        return []
    root = Path(ctx.cfg.paths.root)
    found = []
    for path in sorted(root.glob(f"{RUN_DIR_GLOB}/sparsity/*_term_counts.parquet")):
        if path.resolve() != own.resolve():
            found.append(path)
    return found


# ----------------------------------------------------------------------------- stage


def _log_figure(ctx: RunContext, key: str, fig: Any, saved: list[Path], written: list[Path]) -> None:
    """Log a figure to wandb through its saved PNG (wandb's own matplotlib path needs pyplot)."""
    written += saved
    png = next((p for p in saved if p.suffix == ".png"), None)
    ctx.tracker.log_figure(key, str(png) if png is not None else fig)


@register_stage("sparsity", consumes=("tracing_results",), produces=("sparsity",), needs_model=False)
def run_sparsity(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Selected singular terms per traced side, fraction of d_head used, per-head densities."""
    arts = ctx.artifacts
    require_trace_inputs_match(cfg, arts.tracing_results_dir, "sparsity", include_model=False)
    require_complete_trace(arts, cfg.model.name, "sparsity", cfg.allow_partial)
    files = result_files(arts)
    lengths = read_term_lengths(files)
    rows = lengths.rows
    if not rows:
        traced = sum(1 for s, _ in lengths.prompts.values() if s == "traced")
        raise AttncommError(
            f"sparsity: the tracing results {', '.join(str(p) for p in files)} hold no firings "
            f"({len(lengths.prompts)} prompts listed, {traced} traced): there is nothing to measure. Check "
            "the trace's log for why every prompt was skipped (e.g. trace.skip_incorrect=false traces "
            "prompts the model gets wrong)"
        )
    d_head, d_head_source, n_layers, n_heads = resolve_d_head(cfg, lengths.term_bound)
    if lengths.term_bound > d_head:
        raise StaleArtifactError(
            f"tracing results select term index {lengths.term_bound - 1}, but d_head={d_head} "
            f"({d_head_source}); the tracing results do not belong to this model: retrace with this "
            "model (trace.overwrite=true) or use a new paths.run_dir"
        )
    n_heads = n_heads or lengths.n_heads
    df, untraced = term_counts_from_lengths(rows)
    df = with_fraction(df, d_head)
    n_layers, n_heads = head_grid(df, n_layers or None, n_heads or None)
    model, task = ctx.model_short, ctx.task_name
    log.info(
        "sparsity: %d firings (%d traced dest sides, %d traced source sides) from %s; d_head=%d (%s)",
        len(rows),
        int((df["side"] == "dest").sum()),
        int((df["side"] == "src").sum()),
        ", ".join(p.name for p in files),
        d_head,
        d_head_source,
    )

    guard_stage_outputs(cfg, ctx, "sparsity")
    out = arts.stage_dir("sparsity")
    stem = arts.stem
    table = df.assign(model=model, task=task, d_head=d_head)
    summ = summary(df, untraced).assign(model=model, task=task, d_head=d_head)
    hist = histogram(df, d_head)
    dens = head_density_table(df)
    written = [
        write_table(table, out / f"{stem}_term_counts.parquet"),
        write_table(summ, out / f"{stem}_summary.csv"),
        write_table(hist, out / f"{stem}_histogram.csv"),
        write_table(dens, out / f"{stem}_head_density.csv"),
    ]
    log.info("sparsity summary (d_head=%d):\n%s", d_head, summ.to_string(index=False))

    title = f"{model} {task}: selected singular terms per firing"
    fig = sparsity_histogram(df, d_head, title)
    _log_figure(
        ctx,
        "sparsity/histogram_figure",
        fig,
        save_figure(fig, arts.figures_dir / f"sparsity_{stem}_histogram"),
        written,
    )
    mats = {side: head_density(df, side, n_layers, n_heads) for side in SIDES}
    fig = head_density_heatmap(mats, f"{model} {task}: mean selected terms per head")
    _log_figure(
        ctx,
        "sparsity/head_density_figure",
        fig,
        save_figure(fig, arts.figures_dir / f"sparsity_{stem}_head_density"),
        written,
    )

    siblings = _sibling_tables(ctx, out / f"{stem}_term_counts.parquet")
    if siblings:
        columns = ["model", "task", "side", "frac_d_head"]
        frames = [table[columns]] + [pd.read_parquet(p, columns=columns) for p in siblings]
        both = pd.concat(frames, ignore_index=True)
        if len(both.groupby(["model", "task"])) > 1:
            fig = sparsity_by_model_task(both, "fraction of d_head used per firing")
            saved = save_figure(fig, Path(cfg.paths.root) / "figures" / "sparsity_by_model_task")
            _log_figure(ctx, "sparsity/by_model_task_figure", fig, saved, written)

    metrics: dict[str, Any] = {
        "sparsity/d_head": d_head,
        "sparsity/n_firings": len(rows),
        "sparsity/n_prompts_traced": sum(1 for s, _ in lengths.prompts.values() if s == "traced"),
    }
    for rec in summ.to_dict("records"):
        side = rec["side"]
        for key in ("n_traced", "n_untraced", "mean_terms", "median_terms", "max_terms", "mean_frac_d_head"):
            metrics[f"sparsity/{side}/{key}"] = rec[key]
    extra = {"d_head": d_head, "d_head_source": d_head_source, "inputs": [str(p) for p in files]}
    meta = out / f"{stem}_meta.json"
    atomic_write_text(meta, json.dumps(extra | {"n_layers": n_layers, "n_heads": n_heads}, indent=2))
    written.append(meta)
    ctx.record("sparsity", [p for p in written if p.is_relative_to(arts.run_dir)], extra)
    ctx.tracker.log_table("sparsity/summary", summ)
    ctx.tracker.log_table("sparsity/histogram", hist)
    ctx.tracker.log_table("sparsity/head_density", dens)
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(out, f"{stem}_sparsity", "table")
    return metrics
