"""``control_signals``: source signals of strong firings, clustered (section 9 of ACC-METHOD.md).

Runs the model on the prompts ``control_signals.prompts`` (ids into the task's ``task.n_prompts``
prompts; published: IOI prompts 1, 2, 3 of N = 16) and enumerates, in every layer (layer 0
included) and head, every firing ``(l, h, d, s)`` with ``A >= control_signals.min_attention``
(``hook_pattern``) and ``d >= control_signals.min_dest``, not only the traced ones. Each is
decomposed exactly as the tracer does; firings whose source side is traceable (source-side
``sum(c) > 0``) give a source signal ``P_V x_s`` (normalized). Then
(:mod:`attncomm.core.signal_clusters`): average-linkage clustering on cosine distance cut at
``control_signals.cut`` (None: 0.97 for non-rotary models such as GPT-2, 0.99 for rotary ones such as
Pythia and Gemma), the dominant (largest) cluster and its prototype, the share of its members that are
sink firings (source 0; for rotary models also a punctuation source, see
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from attncomm.core.omega_factors import OmegaCache
from attncomm.core.signal_clusters import (
    cluster_signals,
    default_cut,
    dominant_cluster,
    head_control,
    is_punctuation,
    layer_source_signals,
    normalize_rows,
    prototype,
    sink_mask,
)
from attncomm.errors import ConfigError
from attncomm.io.artifacts import write_table
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.plots import cluster_size_bars, control_signal_histograms, save_figure

log = logging.getLogger(__name__)

FIRING_COLUMNS: tuple[str, ...] = (
    "prompt",
    "layer",
    "head",
    "dest",
    "src",
    "attention",
    "n_terms",
    "src_token",
    "is_punct",
)


@dataclass
class CollectedSignals:
    """Every firing passing the filters (``table``, one row each) and the signals of the traceable ones.

    ``signals[i]`` is the unnormalized ``P_V x_s`` of ``table`` row ``i`` (zero where ``n_terms == 0``).
    """

    table: pd.DataFrame
    signals: np.ndarray


def collect_signals(
    model: Any,
    prompts: Any,
    prompt_ids: Sequence[int],
    omega: OmegaCache,
    *,
    min_attention: float,
    min_dest: int,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = True,
) -> CollectedSignals:
    """Run ``model`` on ``prompts`` (row ``i`` has id ``prompt_ids[i]``) and decompose every firing.

    All layers (0 included) and heads; positions ``0..end`` of each prompt.
    """
    a = model.arch
    names = [n for layer in range(a.n_layers) for n in (model.ln1_normalized(layer), model.pattern(layer))]
    tok = model.tokenizer
    rows: list[dict[str, Any]] = []
    signals: list[np.ndarray] = []
    bar = tqdm(total=len(prompts), desc="control signals: prompts", disable=None if progress else True)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(len(prompts), start + batch_size)))
        sub = prompts.subset(idx)
        width = int(sub.lengths.max())
        _, cache = model.run_with_cache(sub.tokens[:, :width], names)
        for i, row in enumerate(idx):
            pid = int(prompt_ids[row])
            end = int(sub.end[i])
            n = end + 1
            tokens = [int(t) for t in sub.tokens[i, :n]]
            texts = [tok.decode([t]) for t in tokens]
            punct = [is_punctuation(t) for t in texts]
            cos = sin = None
            if a.rotary:
                cos, sin = omega.tables(n)
                cos, sin = cos.to(dtype), sin.to(dtype)
            for layer in range(a.n_layers):
                x = cache[model.ln1_normalized(layer)][i, :n].to("cpu", dtype)
                pattern = cache[model.pattern(layer)][i, :, :n, :n].to("cpu", dtype)
                sig = layer_source_signals(
                    x,
                    pattern,
                    omega,
                    layer,
                    min_attention=min_attention,
                    min_dest=min_dest,
                    cos=cos,
                    sin=sin,
                    adjacent=a.rotary_adjacent_pairs,
                    selection_dtype=dtype,
                )
                for f in range(int(sig.heads.numel())):
                    s = int(sig.srcs[f])
                    rows.append(
                        {
                            "prompt": pid,
                            "layer": layer,
                            "head": int(sig.heads[f]),
                            "dest": int(sig.dests[f]),
                            "src": s,
                            "attention": float(sig.attention[f]),
                            "n_terms": int(sig.n_terms[f]),
                            "src_token": texts[s],
                            "is_punct": punct[s],
                        }
                    )
                signals.append(sig.signal.to(torch.float64).numpy())
            bar.update(1)
        del cache
    bar.close()
    table = pd.DataFrame(rows, columns=list(FIRING_COLUMNS))
    d_model = int(a.d_model)
    matrix = np.concatenate(signals, axis=0) if signals else np.zeros((0, d_model))
    return CollectedSignals(table=table.astype({"is_punct": bool}), signals=matrix)


@dataclass
class Analysis:
    """The tables of the analysis (see the module docstring) and the prototype's row in ``firings``."""

    firings: pd.DataFrame
    clusters: pd.DataFrame
    heads: pd.DataFrame
    summary: dict[str, Any]
    prototype_row: int | None


def analyse_signals(
    table: pd.DataFrame,
    signals: np.ndarray,
    *,
    rotary: bool,
    cut: float,
    controlled_max_distance: float = 0.5,
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> Analysis:
    """Cluster the signals of the traceable firings of ``table`` and build the output tables.

    ``table`` needs ``prompt, layer, head, dest, src, n_terms`` (and ``is_punct`` when ``rotary``);
    ``signals[i]`` belongs to row ``i``. Rows with ``n_terms == 0`` (untraceable source side) or a zero
    signal are left out.
    """
    signals = np.asarray(signals, dtype=np.float64)
    if len(table) != len(signals):
        raise ValueError(f"{len(table)} firings but {len(signals)} signals")
    norms = np.linalg.norm(signals, axis=1) if len(signals) else np.zeros(0)
    traceable = table["n_terms"].to_numpy() > 0
    keep = traceable & (norms > 0)
    n_zero = int((traceable & ~keep).sum())
    if n_zero:
        log.warning("control signals: %d traceable firings have a zero source signal; left out", n_zero)
    df = table[keep].reset_index(drop=True).copy()
    unit = normalize_rows(signals[keep]) if keep.any() else np.zeros((0, signals.shape[1]))
    punct = df["is_punct"].to_numpy(dtype=bool) if rotary else None
    sink = sink_mask(df["src"].to_numpy(), punct)
    labels = cluster_signals(unit, cut)
    df["cluster"] = labels
    df["is_sink"] = sink
    summary: dict[str, Any] = {
        "n_firings_filtered": len(table),
        "n_untraceable": int((~traceable).sum()),
        "n_zero_signal": n_zero,
        "n_firings": len(df),
        "n_sink": int(sink.sum()),
        "cut": float(cut),
        "n_clusters": int(len(np.unique(labels))),
    }
    proto_row: int | None = None
    if len(df):
        dom = dominant_cluster(labels)
        members = np.flatnonzero(labels == dom)
        j, mean_dist = prototype(unit[members])
        proto_row = int(members[j])
        ip = unit @ unit[proto_row]
        df["in_dominant"] = labels == dom
        df["ip_with_prototype"] = ip
        p = df.iloc[proto_row]
        summary |= {
            "dominant_cluster": dom,
            "dominant_size": len(members),
            "dominant_fraction": len(members) / len(df),
            "dominant_sink_share": float(sink[members].mean()),
            "sink_in_dominant_share": float((labels[sink] == dom).mean()) if sink.any() else float("nan"),
            "prototype_prompt": int(p["prompt"]),
            "prototype_layer": int(p["layer"]),
            "prototype_head": int(p["head"]),
            "prototype_dest": int(p["dest"]),
            "prototype_src": int(p["src"]),
            "prototype_mean_distance": mean_dist,
            "ip_sink_mean": float(ip[sink].mean()) if sink.any() else float("nan"),
            "ip_other_mean": float(ip[~sink].mean()) if (~sink).any() else float("nan"),
        }
    else:
        df["in_dominant"] = pd.Series(dtype=bool)
        df["ip_with_prototype"] = pd.Series(dtype=float)

    values, counts = np.unique(labels, return_counts=True)
    n_sink = [int(sink[labels == v].sum()) for v in values]
    clusters = pd.DataFrame({"cluster": values.astype(int), "size": counts.astype(int), "n_sink": n_sink})
    clusters["sink_share"] = clusters["n_sink"] / clusters["size"]
    clusters["dominant"] = clusters["cluster"] == summary.get("dominant_cluster", -1)
    clusters = clusters.sort_values(["size", "cluster"], ascending=[False, True]).reset_index(drop=True)

    control = head_control(
        df["layer"].to_numpy(), df["head"].to_numpy(), unit, sink, max_distance=controlled_max_distance
    )
    L = n_layers if n_layers is not None else (int(df["layer"].max()) + 1 if len(df) else 0)
    H = n_heads if n_heads is not None else (int(df["head"].max()) + 1 if len(df) else 0)
    grouped = df.groupby(["layer", "head"])
    n_fire = grouped.size().to_dict()
    n_dom = grouped["in_dominant"].sum().to_dict() if len(df) else {}
    head_rows = []
    for layer in range(L):
        for head in range(H):
            n_s, dist, controlled = control.get((layer, head), (0, float("nan"), False))
            head_rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "n_firings": int(n_fire.get((layer, head), 0)),
                    "n_sink": n_s,
                    "n_in_dominant": int(n_dom.get((layer, head), 0)),
                    "mean_sink_distance": dist,
                    "controlled": controlled,
                }
            )
    heads = pd.DataFrame(head_rows)
    summary["n_controlled_heads"] = int(heads["controlled"].sum()) if len(heads) else 0
    summary["n_heads_with_sink"] = int((heads["n_sink"] > 0).sum()) if len(heads) else 0
    firings = df[
        [
            "prompt",
            "layer",
            "head",
            "dest",
            "src",
            "attention",
            "n_terms",
            *(c for c in ("src_token", "is_punct") if c in df.columns),
            "cluster",
            "in_dominant",
            "is_sink",
            "ip_with_prototype",
        ]
    ]
    return Analysis(firings=firings, clusters=clusters, heads=heads, summary=summary, prototype_row=proto_row)


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
    from attncomm.methods.acc_tracing import build_omega_cache

    cs = cfg.control_signals
    ids = resolve_prompts(cs.prompts, ctx.n_prompts)
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
    stem = f"{model_name}_{task}"
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
