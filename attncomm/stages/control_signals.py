"""``control_signals``: source signals of strong firings, clustered (section 9 of docs/METHOD.md).

Runs the model on the prompts ``control_signals.prompts`` (ids into the task's ``task.n_prompts``
prompts; published: IOI prompts 1, 2, 3 of N = 16) and enumerates, in every layer (layer 0
included) and head, every firing ``(l, h, d, s)`` with ``A >= control_signals.min_attention``
(``hook_pattern``) and ``d >= control_signals.min_dest``, not only the traced ones. Each is
decomposed exactly as the tracer does (the model run is
:func:`attncomm.methods.acc_tracing.collect_signals`); firings whose source side is traceable
(source-side ``sum(c) > 0``) give a source signal ``P_V x_s`` (normalized). Then
(:func:`attncomm.core.signal_clusters.analyse_signals`): average-linkage clustering on cosine distance
cut at ``control_signals.cut`` (None: 0.97 for non-rotary models such as GPT-2, 0.99 for rotary ones
such as Pythia and Gemma), the dominant (largest) cluster and its prototype, the share of its members
that are sink firings (source 0; for rotary models also a punctuation source, see
:data:`~attncomm.core.signal_clusters.PUNCTUATION`), inner products of the prototype with every
signal, and the per-head controlled flag (mean pairwise cosine distance of the head's sink signals
``< control_signals.controlled_max_distance``).

Outputs under ``control_signals/`` of the run directory (``{stem}`` = ``{model}_{task}``):

- ``{stem}_firings.parquet``: one row per analysed firing: ``prompt, layer, head, dest, src,
  attention, n_terms, src_token, is_punct, cluster, in_dominant, is_sink, ip_with_prototype``;
- ``{stem}_clusters.csv``: ``cluster, size, n_sink, sink_share, dominant`` (largest first);
- ``{stem}_summary.csv``: one row: firing counts, cut, number of clusters, dominant cluster (size,
  fraction, share of sink members), prototype firing and its mean distance, inner-product means,
  controlled heads;
- ``{stem}_heads.csv``: every ``(layer, head)``: ``n_firings, n_sink, n_in_dominant,
  mean_sink_distance, controlled``;

figures ``figures/control_signals_{stem}_{inner_products,cluster_sizes}.{png,pdf}``; tables, figures
and metrics are logged to wandb. The prompts are analysed whether or not the model answers them
correctly (the method does not filter them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from attncomm.core.signal_clusters import analyse_signals, default_cut
from attncomm.errors import ConfigError
from attncomm.io.artifacts import write_table
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.plots import cluster_size_bars, control_signal_histograms, save_figure

log = logging.getLogger(__name__)


def resolve_prompts(ids: Sequence[int], n_prompts: int) -> list[int]:
    """The configured prompt ids, checked against the task's ``n_prompts``."""
    out = [int(p) for p in ids]
    if not out:
        raise ConfigError("control_signals.prompts is empty; give prompt ids, e.g. [1,2,3]")
    bad = [p for p in out if not 0 <= p < n_prompts]
    if bad:
        raise ConfigError(
            f"control_signals.prompts {bad} are not prompt ids of task.n_prompts={n_prompts} "
            f"(0..{n_prompts - 1})"
        )
    if len(set(out)) != len(out):
        raise ConfigError(f"control_signals.prompts {out} holds duplicates")
    return out


@register_stage("control_signals", consumes=(), produces=("control_signals",), needs_model=True)
def run_control_signals(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Control signals: cluster the source signals of strong firings, prototype, sink share, heads."""
    from attncomm.io.provenance import guard_stage_outputs
    from attncomm.methods.acc_tracing import build_omega_cache, collect_signals

    cs = cfg.control_signals
    ids = resolve_prompts(cs.prompts, ctx.n_prompts)
    guard_stage_outputs(cfg, ctx, "control_signals")
    model = ctx.model
    rotary = bool(model.arch.rotary)
    cut = float(cs.cut) if cs.cut is not None else default_cut(rotary)
    log.info(
        "control signals %s/%s: prompts %s of N=%d, A >= %g, d >= %d, cut %g (%s), all layers",
        ctx.model_short,
        ctx.task_name,
        ids,
        ctx.n_prompts,
        cs.min_attention,
        cs.min_dest,
        cut,
        "control_signals.cut" if cs.cut is not None else ("rotary default" if rotary else "GPT-2 default"),
    )
    prompts = ctx.prompts.subset(ids)
    omega = build_omega_cache(model, ctx.dtype)
    collected = collect_signals(
        model,
        prompts,
        ids,
        omega,
        min_attention=cs.min_attention,
        min_dest=cs.min_dest,
        dtype=ctx.dtype,
        batch_size=max(1, cfg.task.batch_size),
    )
    res = analyse_signals(
        collected.table,
        collected.signals,
        rotary=rotary,
        cut=cut,
        controlled_max_distance=cs.controlled_max_distance,
        n_layers=model.arch.n_layers,
        n_heads=model.arch.n_heads,
    )
    model_name, task = ctx.model_short, ctx.task_name
    stem = ctx.artifacts.stem
    summary = {"model": model_name, "task": task, "prompts": str(ids), "rotary": rotary} | res.summary
    log.info(
        "control signals: %d firings (%d untraceable left out), %d clusters; dominant %s of size %s, "
        "sink share %s; %d controlled heads",
        res.summary["n_firings"],
        res.summary["n_untraceable"],
        res.summary["n_clusters"],
        res.summary.get("dominant_cluster"),
        res.summary.get("dominant_size"),
        res.summary.get("dominant_sink_share"),
        res.summary["n_controlled_heads"],
    )

    arts = ctx.artifacts
    out = arts.stage_dir("control_signals")
    written = [
        write_table(res.firings, out / f"{stem}_firings.parquet"),
        write_table(res.clusters, out / f"{stem}_clusters.csv"),
        write_table(pd.DataFrame([summary]), out / f"{stem}_summary.csv"),
        write_table(res.heads, out / f"{stem}_heads.csv"),
    ]
    f = res.firings
    sink = f["is_sink"].to_numpy(dtype=bool)
    ip = f["ip_with_prototype"].to_numpy(dtype=float)
    sink_rule = "source 0 or punctuation" if rotary else "source 0"
    figures = {
        "inner_products": control_signal_histograms(
            ip[sink], ip[~sink], f"{model_name} {task}: prototype . signal (sink = {sink_rule})"
        ),
        "cluster_sizes": cluster_size_bars(
            res.clusters, f"{model_name} {task}: control-signal clusters (cut {cut:g})"
        ),
    }
    for name, fig in figures.items():
        written += save_figure(fig, arts.figures_dir / f"control_signals_{stem}_{name}")
        ctx.tracker.log_figure(f"control_signals/{name}_figure", fig)

    metrics = {
        f"control_signals/{k}": v
        for k, v in res.summary.items()
        if isinstance(v, int | float | bool | np.integer | np.floating)
    }
    ctx.record("control_signals", [p for p in written if p.is_relative_to(arts.run_dir)], summary)
    ctx.tracker.log_table("control_signals/clusters", res.clusters)
    ctx.tracker.log_table("control_signals/heads", res.heads)
    ctx.tracker.log_table("control_signals/summary", pd.DataFrame([summary]))
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(out, f"{stem}_control_signals", "table")
    return metrics
