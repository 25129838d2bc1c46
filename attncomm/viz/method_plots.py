"""Figures of the circuit-discovery methods: faithfulness curves, CPR/CMD bars, circuit sizes.

Inputs are the tables the stages write (``*_faithfulness.csv`` rows and the summary table), so the
figures can be redrawn from files alone.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from attncomm.viz.plots import new_figure


def _check(df: pd.DataFrame, columns: set[str], what: str) -> None:
    missing = columns - set(df.columns)
    if missing:
        raise ValueError(f"{what} lacks columns {sorted(missing)}")


def methods_figure(curves: pd.DataFrame, summary: pd.DataFrame, title: str | None = None) -> Figure:
    """One figure per model/task: (a) faithfulness against the edge budget for every method,
    (b) CPR and CMD per method, (c) the size of each method's circuit (edges and nodes).

    ``curves``: the ``budget`` rows of the faithfulness tables (``method, budget_percent,
    faithfulness``); ``summary``: one row per circuit with ``circuit, cpr, cmd, n_edges, n_nodes``.
    """
    _check(curves, {"method", "budget_percent", "faithfulness"}, "curves")
    _check(summary, {"circuit", "cpr", "cmd", "n_edges", "n_nodes"}, "summary")
    fig = new_figure((13.0, 4.0))
    ax_curve, ax_area, ax_size = fig.subplots(1, 3)
    for i, (method, rows) in enumerate(curves.groupby("method", sort=False)):
        rows = rows.sort_values("budget_percent")
        ax_curve.plot(
            rows["budget_percent"], rows["faithfulness"], marker="o", ms=3, color=f"C{i}", label=method
        )
    ax_curve.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax_curve.set_xscale("log")
    ax_curve.set_xlabel("edges in circuit (% of all edges)")
    ax_curve.set_ylabel("faithfulness (circuit - empty) / (clean - empty)")
    ax_curve.set_title("faithfulness curves")
    if len(curves):
        ax_curve.legend(fontsize=8)

    scored = summary.dropna(subset=["cpr"])
    xs = list(range(len(scored)))
    width = 0.38
    bars = ax_area.bar([x - width / 2 for x in xs], scored["cpr"], width, label="CPR (higher is better)")
    ax_area.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    bars = ax_area.bar([x + width / 2 for x in xs], scored["cmd"], width, label="CMD (lower is better)")
    ax_area.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax_area.set_xticks(xs, list(scored["circuit"]), rotation=15, ha="right")
    ax_area.set_title("area under / above the curve")
    ax_area.legend(fontsize=8)
    ax_area.margins(y=0.15)

    xs = list(range(len(summary)))
    bars = ax_size.bar([x - width / 2 for x in xs], summary["n_edges"], width, label="edges")
    ax_size.bar_label(bars, fmt="%d", fontsize=7, padding=1)
    twin = ax_size.twinx()
    bars = twin.bar([x + width / 2 for x in xs], summary["n_nodes"], width, color="C1", label="nodes")
    twin.bar_label(bars, fmt="%d", fontsize=7, padding=1)
    ax_size.set_xticks(xs, list(summary["circuit"]), rotation=15, ha="right")
    ax_size.set_ylabel("edges")
    twin.set_ylabel("nodes (heads, MLPs)")
    ax_size.set_title("circuit sizes")
    ax_size.margins(y=0.15)
    twin.margins(y=0.15)
    ax_size.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    handles = ax_size.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax_size.legend(handles, ["edges", "nodes"], fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def gathered_figure(table: pd.DataFrame) -> Figure:
    """CPR and CMD of every method on every model/task (``model, task, method, cpr, cmd`` rows)."""
    _check(table, {"model", "task", "method", "cpr", "cmd"}, "gathered table")
    groups = list(dict.fromkeys(zip(table["model"], table["task"], strict=True)))
    methods = list(dict.fromkeys(table["method"]))
    fig = new_figure((max(6.0, 1.2 + 1.3 * len(groups) * max(1, len(methods)) / 2), 6.0))
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / max(1, len(methods))
    for ax, column, label in (
        (axes[0], "cpr", "CPR (higher is better)"),
        (axes[1], "cmd", "CMD (lower is better)"),
    ):
        for i, method in enumerate(methods):
            values = []
            for model, task in groups:
                rows = table[
                    (table["model"] == model) & (table["task"] == task) & (table["method"] == method)
                ]
                values.append(float(rows[column].iloc[0]) if len(rows) else float("nan"))
            xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, values, width, label=method, color=f"C{i}")
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.set_ylabel(label)
        ax.margins(y=0.15)
    axes[1].set_xticks(range(len(groups)), [f"{m}\n{t}" for m, t in groups])
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=max(1, len(methods)))
    return fig
