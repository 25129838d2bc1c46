"""Figures (matplotlib), returned as ``Figure`` objects and saved as PNG and PDF.

Figures are built with :class:`matplotlib.figure.Figure` on an Agg canvas directly (no pyplot
state, no GUI backend, the global backend untouched), so they render headless and never leak.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

METRIC_ORDER: tuple[str, ...] = ("Precision", "Recall", "F1-Score")
OURS_PREFIX = "Ours"


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A ``Figure`` with an Agg canvas and constrained layout (no pyplot involved)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _check_comparison(df: pd.DataFrame) -> None:
    missing = {"Method B", "Metric", "Value"} - set(df.columns)
    if missing:
        raise ValueError(f"comparison table lacks columns {sorted(missing)}")


def comparison_bar_plot(df: pd.DataFrame, title: str | None = None, reference: str | None = None) -> Figure:
    """Grouped bars of precision, recall and F1 per method (one comparison table, one threshold).

    ``df`` has the published columns ``Method B, Metric, Value[, Model, Task]``; ``reference``
    names the canonical circuit the rows are compared with (for the axis label).
    """
    _check_comparison(df)
    methods = list(dict.fromkeys(df["Method B"]))
    metrics = [m for m in METRIC_ORDER if m in set(df["Metric"])]
    table = df.pivot_table(index="Method B", columns="Metric", values="Value", aggfunc="first")
    # wide enough for the legend's three entries even with one method
    fig = new_figure((max(4.2, 1.6 + 1.4 * len(methods)), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(metrics))
    for i, metric in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(methods))]
        values = [float(table.loc[m, metric]) for m in methods]
        bars = ax.bar(xs, values, width=width, label=metric)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(methods)), methods, rotation=15, ha="right")
    ax.set_ylim(0, 1.12)  # room for the label of a bar at 1.00
    ax.set_ylabel("score" if reference is None else f"score vs {reference}")
    # outside the axes, below the tick labels: a legend inside hid the bar labels of values near 1
    fig.legend(loc="outside lower center", fontsize=8, ncols=len(metrics), frameon=False)
    if title is None and {"Model", "Task"} <= set(df.columns) and len(df):
        title = f"{df['Model'].iloc[0]} {df['Task'].iloc[0]}"
    if title:
        ax.set_title(title)
    return fig


def comparison_across_thresholds(
    df_by_th: Mapping[float, pd.DataFrame], title: str | None = None, metrics: Sequence[str] = METRIC_ORDER
) -> Figure:
    """Ours' precision/recall/F1 against the pruning threshold, literature methods as dashed lines.

    ``df_by_th`` maps each pruning threshold to its comparison table (published format).
    """
    if not df_by_th:
        raise ValueError("no comparison tables to plot")
    ths = sorted(df_by_th)
    fig = new_figure((4.0 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    first = df_by_th[ths[0]]
    _check_comparison(first)
    literature = [m for m in dict.fromkeys(first["Method B"]) if not str(m).startswith(OURS_PREFIX)]
    for ax, metric in zip(axes, metrics, strict=True):
        ours = []
        for th in ths:
            df = df_by_th[th]
            _check_comparison(df)
            rows = df[(df["Metric"] == metric) & df["Method B"].astype(str).str.startswith(OURS_PREFIX)]
            ours.append(float(rows["Value"].iloc[0]) if len(rows) else float("nan"))
        ax.plot(ths, ours, marker="o", ms=3, label="ACC (ours)", color="black")
        for i, method in enumerate(literature):
            rows = first[(first["Metric"] == metric) & (first["Method B"] == method)]
            if len(rows):
                ax.axhline(float(rows["Value"].iloc[0]), ls="--", lw=1, color=f"C{i}", label=method)
        ax.set_title(metric)
        ax.set_xlabel("pruning threshold (logit diff)")
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("score")
    axes[-1].legend(fontsize=8)
    if title is None and {"Model", "Task"} <= set(first.columns) and len(first):
        title = f"{first['Model'].iloc[0]} {first['Task'].iloc[0]}"
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path_without_suffix: str | Path, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``<path>.png`` and ``<path>.pdf``, each atomically; return both paths."""
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in ("png", "pdf"):
        final = base.with_name(base.name + f".{fmt}")
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fig.savefig(fh, format=fmt, dpi=dpi)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(final)
    log.debug("saved figure %s.{png,pdf}", base)
    return written


# ----------------------------------------------------------------------------- sparsity (section 9)

SPARSITY_SIDES: tuple[str, ...] = ("dest", "src")
_SIDE_TITLES = {"dest": "dest side (query)", "src": "source side (key)"}


def sparsity_histogram(df: pd.DataFrame, d_head: int | None = None, title: str | None = None) -> Figure:
    """Distribution of the number of selected singular terms per traced side (one panel per side).

    ``df`` is :func:`attncomm.core.term_statistics.term_counts`' table (``side``, ``n_terms``); with
    ``d_head`` the x range is ``1..d_head``, a top axis reads the fraction of ``d_head``, and the
    legend gives the mean.
    """
    import numpy as np

    fig = new_figure((9.0, 3.4))
    axes = fig.subplots(1, len(SPARSITY_SIDES), sharey=False, squeeze=False)[0]
    top = d_head or (int(df["n_terms"].max()) if len(df) else 1)
    bins = np.arange(0.5, top + 1.5, 1.0)
    for ax, side in zip(axes, SPARSITY_SIDES, strict=True):
        n = df.loc[df["side"] == side, "n_terms"].to_numpy()
        color = "C0" if side == "dest" else "C1"
        if len(n):
            ax.hist(n, bins=bins, color=color, alpha=0.85, rwidth=0.85)
            ax.axvline(
                n.mean(), color="black", ls="--", lw=1, label=f"mean {n.mean():.2f} ({len(n)} firings)"
            )
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no traced side", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0.5, top + 0.5)
        ax.set_xlabel("selected singular terms")
        ax.set_title(_SIDE_TITLES[side])
        if d_head:
            sec = ax.secondary_xaxis("top", functions=(lambda x, d=d_head: x / d, lambda f, d=d_head: f * d))
            sec.set_xlabel(f"fraction of d_head = {d_head}", fontsize=8)
    axes[0].set_ylabel("traced firings")
    if title:
        fig.suptitle(title)
    return fig


def sparsity_by_model_task(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Fraction of ``d_head`` used, per model and task (columns ``model, task, side, frac_d_head``).

    One panel per side; a box per ``model task`` with the mean marked, so runs of models with
    different ``d_head`` compare on one axis.
    """
    missing = {"model", "task", "side", "frac_d_head"} - set(df.columns)
    if missing:
        raise ValueError(f"sparsity table lacks columns {sorted(missing)}")
    groups = sorted({(str(m), str(t)) for m, t in zip(df["model"], df["task"], strict=True)})
    fig = new_figure((2.0 + 1.3 * len(groups), 3.6))
    axes = fig.subplots(1, len(SPARSITY_SIDES), sharey=True, squeeze=False)[0]
    for ax, side in zip(axes, SPARSITY_SIDES, strict=True):
        data, labels = [], []
        for model, task in groups:
            sel = (df["model"] == model) & (df["task"] == task) & (df["side"] == side)
            data.append(df.loc[sel, "frac_d_head"].to_numpy(dtype=float))
            labels.append(f"{model}\n{task}")
        keep = [i for i, d in enumerate(data) if len(d)]
        if keep:
            ax.boxplot(
                [data[i] for i in keep],
                positions=[i + 1 for i in keep],
                showmeans=True,
                showfliers=False,
                widths=0.6,
            )
        ax.set_xticks(range(1, len(groups) + 1), labels, fontsize=8)
        ax.set_title(_SIDE_TITLES[side])
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("fraction of d_head used")
    if title:
        fig.suptitle(title)
    return fig


def head_density_heatmap(densities: Mapping[str, object], title: str | None = None) -> Figure:
    """Heatmaps of the mean number of selected terms per ``(layer, head)``, one per side.

    ``densities`` maps a side name to a ``[n_layers, n_heads]`` array (NaN: the head never fired);
    layer 0 is at the bottom, as in the graphs. Small grids are annotated with their values.
    """
    import matplotlib
    import numpy as np

    mats = {k: np.asarray(v, dtype=float) for k, v in densities.items()}
    if not mats:
        raise ValueError("no densities to plot")
    L, H = next(iter(mats.values())).shape
    finite = [m[np.isfinite(m)] for m in mats.values()]
    vmax = max((float(f.max()) for f in finite if f.size), default=1.0)
    fig = new_figure((1.5 + (0.45 * H + 1.2) * len(mats), 1.5 + 0.32 * L))
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = None
    for ax, (side, mat) in zip(axes, mats.items(), strict=True):
        image = ax.imshow(
            np.ma.masked_invalid(mat), origin="lower", aspect="auto", cmap=cmap, vmin=0, vmax=vmax
        )
        ax.set_title(_SIDE_TITLES.get(side, side))
        ax.set_xlabel("head")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        if L * H <= 400:
            for (layer, head), value in np.ndenumerate(mat):
                if np.isfinite(value):
                    ax.text(head, layer, f"{value:.1f}", ha="center", va="center", fontsize=6, color="white")
    axes[0].set_ylabel("layer")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="mean selected terms", shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- control signals (section 9)


def control_signal_histograms(
    ip_sink: Sequence[float], ip_other: Sequence[float], title: str | None = None
) -> Figure:
    """Distributions of the inner product of the prototype signal with sink-firing and other signals.

    Both are unit vectors, so the inner product is the cosine similarity (``[-1, 1]``); the two
    histograms share bins and are normalized to densities so groups of different sizes compare.
    """
    import numpy as np

    fig = new_figure((6.0, 3.4))
    ax = fig.add_subplot()
    bins = np.linspace(-1.0, 1.0, 41)
    for values, label, color in ((ip_sink, "sink firings", "C3"), (ip_other, "other firings", "C0")):
        v = np.asarray(values, dtype=float)
        if len(v):
            ax.hist(v, bins=bins, density=True, alpha=0.6, color=color, label=f"{label} (n={len(v)})")
    if not len(ip_sink) and not len(ip_other):
        ax.text(0.5, 0.5, "no firings", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel("inner product with the prototype signal")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    return fig


def cluster_size_bars(clusters: pd.DataFrame, title: str | None = None, max_bars: int = 40) -> Figure:
    """Bar chart of cluster sizes, largest first, each bar split into sink and other firings.

    ``clusters`` has columns ``cluster, size, n_sink`` (and optionally ``dominant``); only the
    ``max_bars`` largest clusters are drawn (the rest are counted in the axis label).
    """
    missing = {"cluster", "size", "n_sink"} - set(clusters.columns)
    if missing:
        raise ValueError(f"cluster table lacks columns {sorted(missing)}")
    df = clusters.sort_values(["size", "cluster"], ascending=[False, True]).reset_index(drop=True)
    shown = df.head(max_bars)
    fig = new_figure((max(5.5, 1.8 + 0.25 * len(shown)), 3.4))
    ax = fig.add_subplot()
    xs = list(range(len(shown)))
    sink = shown["n_sink"].to_numpy()
    other = shown["size"].to_numpy() - sink
    ax.bar(xs, sink, color="C3", label="sink firings")
    ax.bar(xs, other, bottom=sink, color="C0", label="other firings")
    ax.set_xticks(xs, [str(c) for c in shown["cluster"]], fontsize=7, rotation=90)
    rest = len(df) - len(shown)
    ax.set_xlabel("cluster (largest first)" + (f"; {rest} smaller clusters not shown" if rest else ""))
    ax.set_ylabel("firings")
    if len(shown):
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


# ----------------------------------------------------------------- intervention experiments (section 9)

#: the published operations, in the published loop order, and their colours
EXPERIMENT_OPERATIONS: tuple[str, ...] = (
    "Removing (SVs)",
    "Removing (Random)",
    "Boosting (SVs)",
    "Boosting (Random)",
)
_OPERATION_COLORS = {
    "Removing (SVs)": "C3",
    "Removing (Random)": "C7",
    "Boosting (SVs)": "C0",
    "Boosting (Random)": "C8",
}


def _check_experiment_table(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = set(columns) - set(df.columns)
    if missing:
        raise ValueError(f"intervention-experiment table lacks columns {sorted(missing)}")


def experiment_effect_boxes(
    df: pd.DataFrame,
    value: str = "logit_diff_metric",
    ylabel: str = "relative logit-diff change (after - before) / before",
    title: str | None = None,
) -> Figure:
    """Box plots of ``value`` per chosen edge (``edge_labeled_group``) and operation, ablated prompts only.

    ``df`` is the experiment table (published columns of ``intervention_data/{model}_{task}.parquet``);
    each edge is a group of four boxes (remove/boost x selected/random terms), a line marks 0.
    """
    import numpy as np

    _check_experiment_table(df, (value, "edge_labeled_group", "operation_performed", "is_ablated"))
    abl = df[df["is_ablated"]]
    groups = list(dict.fromkeys(df["edge_labeled_group"]))
    ops = [o for o in EXPERIMENT_OPERATIONS if o in set(df["operation_performed"])]
    fig = new_figure((2.5 + 2.2 * max(1, len(groups)), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(ops))
    for i, op in enumerate(ops):
        data, pos = [], []
        for g, group in enumerate(groups):
            v = abl.loc[(abl["edge_labeled_group"] == group) & (abl["operation_performed"] == op), value]
            v = v.to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if len(v):
                data.append(v)
                pos.append(g + (i - (len(ops) - 1) / 2) * width)
        if data:
            parts = ax.boxplot(
                data,
                positions=pos,
                widths=width * 0.85,
                patch_artist=True,
                showfliers=False,
                medianprops={"color": "black"},
            )
            for box in parts["boxes"]:
                box.set_facecolor(_OPERATION_COLORS.get(op, "C1"))
                box.set_alpha(0.75)
        ax.plot([], [], marker="s", ls="", color=_OPERATION_COLORS.get(op, "C1"), label=op)
    ax.axhline(0.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], fontsize=8, rotation=10, ha="right")
    ax.set_xlim(-0.6, max(1, len(groups)) - 0.4)
    ax.set_ylabel(ylabel, fontsize=9)
    if not len(abl):
        ax.text(0.5, 0.5, "no ablated prompts", ha="center", va="center", transform=ax.transAxes)
    ax.legend(fontsize=8, ncols=2)
    if title:
        ax.set_title(title)
    return fig


def experiment_attention_boxes(df: pd.DataFrame, title: str | None = None) -> Figure:
    """The downstream head's attention ``A[d, s]`` before and after each operation, one panel per edge.

    Boxes over the ablated prompts: the clean ``scores_dest_src_downstream_ah`` first, then
    ``scores_dest_src_downstream_ah_interv`` of each operation.
    """
    columns = (
        "scores_dest_src_downstream_ah",
        "scores_dest_src_downstream_ah_interv",
        "edge_labeled_group",
        "operation_performed",
        "is_ablated",
    )
    _check_experiment_table(df, columns)
    abl = df[df["is_ablated"]]
    groups = list(dict.fromkeys(df["edge_labeled_group"])) or ["(no edges)"]
    ops = [o for o in EXPERIMENT_OPERATIONS if o in set(df["operation_performed"])]
    fig = new_figure((1.0 + 3.4 * len(groups), 3.8))
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, group in zip(axes, groups, strict=True):
        sub = abl[abl["edge_labeled_group"] == group]
        first = sub[sub["operation_performed"] == ops[0]] if ops else sub
        data = [first["scores_dest_src_downstream_ah"].to_numpy(dtype=float)]
        labels, colors = ["clean"], ["white"]
        for op in ops:
            data.append(
                sub.loc[sub["operation_performed"] == op, "scores_dest_src_downstream_ah_interv"].to_numpy(
                    float
                )
            )
            labels.append(op.replace(" (", "\n("))
            colors.append(_OPERATION_COLORS.get(op, "C1"))
        keep = [i for i, d in enumerate(data) if len(d)]
        if keep:
            parts = ax.boxplot(
                [data[i] for i in keep],
                positions=keep,
                widths=0.6,
                patch_artist=True,
                showfliers=False,
                medianprops={"color": "black"},
            )
            for box, i in zip(parts["boxes"], keep, strict=True):
                box.set_facecolor(colors[i])
                box.set_alpha(0.75)
        else:
            ax.text(0.5, 0.5, "no ablated prompts", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(str(group), fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("attention A[d, s] of the downstream head")
    if title:
        fig.suptitle(title)
    return fig
