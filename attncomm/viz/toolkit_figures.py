"""The figures and interactive heatmap panels of each toolkit analysis, built from its long-form table.

Each ``*_figures`` function returns ``(figures, pages)``: ``figures`` maps a name to a matplotlib
``Figure``; ``pages`` maps a name to the panels of one interactive HTML page
(:func:`attncomm.viz.heatmaps.write_heatmap_html`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from attncomm.viz.heatmaps import (
    bar_figure,
    heatmap_figure,
    heatmap_panel,
    line_figure,
    pivot,
    scatter_figure,
)

Figures = tuple[dict[str, Figure], dict[str, list[dict[str, Any]]]]


def dla_figures(df: pd.DataFrame, title: str, top_k: int = 10) -> Figures:
    """Layer x head heatmap of the mean head DLA, bar chart of the ``top_k`` heads by |DLA|, and the
    components (embeddings, attention, MLP per layer) as bars."""
    heads = df[df["kind"] == "head"]
    mat = pivot(heads, "layer", "head")
    figs: dict[str, Figure] = {
        "heads": heatmap_figure({"direct logit attribution": mat}, title, "head", "layer", colorbar="metric")
    }
    mean = heads.groupby(["layer", "head"], as_index=False)["value"].mean()
    top = mean.reindex(mean["value"].abs().sort_values(ascending=False).index).head(top_k)
    figs["top_heads"] = bar_figure(
        [f"L{r.layer}H{r.head}" for r in top.itertuples()],
        top["value"].tolist(),
        f"{title}: top heads",
        "DLA",
    )
    comps = df[df["kind"].isin(["embed", "pos_embed", "attn", "mlp", "unembed_bias"])]
    comps = comps.groupby(["kind", "layer"], as_index=False, sort=False)["value"].mean()
    labels = [
        k if layer < 0 else f"{layer}_{k}" for k, layer in zip(comps["kind"], comps["layer"], strict=True)
    ]
    figs["components"] = bar_figure(labels, comps["value"].tolist(), f"{title}: components", "DLA")
    pages = {"heads": [heatmap_panel("mean direct logit attribution per head", mat, "layer", "head")]}
    return figs, pages


def logit_lens_figures(df: pd.DataFrame, title: str) -> Figures:
    """The mean metric after each (sub)layer, with the per-prompt spread as faint lines."""
    order = df.drop_duplicates("step").sort_values("step")
    labels = order["label"].tolist()
    mean = df.groupby("step")["value"].mean().reindex(order["step"]).tolist()
    fig = line_figure(labels, {"mean over prompts": mean}, title, "task metric")
    return {"lens": fig}, {}


def patch_figures(df: pd.DataFrame, title: str, tokens: Sequence[str] | None = None) -> Figures:
    """One heatmap per (direction, kind): layer x position or layer x head (x position: one panel per
    head), of the normalised metric, with token labels on position axes."""
    figs: dict[str, Figure] = {}
    pages: dict[str, list[dict[str, Any]]] = {}
    for (direction, kind, by), sub in df.groupby(["direction", "kind", "grid"], sort=False):
        name = f"{direction}_{kind}_{by}"
        if by == "layer_pos":
            mat = pivot(sub, "layer", "pos", "normalised")
            figs[name] = heatmap_figure(
                {f"{kind} ({direction})": mat},
                title,
                "position",
                "layer",
                tokens,
                colorbar="normalised metric",
            )
            pages[name] = [heatmap_panel(f"{kind} ({direction})", mat, "layer", "pos", tokens)]
        elif by == "layer_head":
            mat = pivot(sub, "layer", "head", "normalised")
            figs[name] = heatmap_figure(
                {f"{kind} ({direction})": mat}, title, "head", "layer", colorbar="normalised metric"
            )
            pages[name] = [heatmap_panel(f"{kind} ({direction})", mat, "layer", "head")]
        else:  # layer_head_pos: rows are "L{layer}H{head}"
            sub = sub.assign(cell=[f"L{a}H{b}" for a, b in zip(sub["layer"], sub["head"], strict=True)])
            mat = sub.pivot_table(
                index="cell", columns="pos", values="normalised", aggfunc="mean", sort=False
            )
            figs[name] = heatmap_figure(
                {f"{kind} by position ({direction})": mat},
                title,
                "position",
                "head",
                tokens,
                colorbar="normalised metric",
            )
            pages[name] = [heatmap_panel(f"{kind} by position ({direction})", mat, "head", "pos", tokens)]
    return figs, pages


def head_grid_figures(df: pd.DataFrame, title: str, value: str, group: str, colorbar: str) -> Figures:
    """One layer x head heatmap per value of ``group`` (e.g. receiver, head type)."""
    panels = {str(g): pivot(sub, "layer", "head", value) for g, sub in df.groupby(group, sort=False)}
    fig = heatmap_figure(panels, title, "head", "layer", colorbar=colorbar)
    pages = {"heads": [heatmap_panel(name, mat, "layer", "head") for name, mat in panels.items()]}
    return {"heads": fig}, pages


def scatter_against(x: Sequence[float], y: Sequence[float], title: str, xlabel: str, ylabel: str) -> Figure:
    """A labelled scatter (attribution patching against activation patching)."""
    return scatter_figure(x, y, title, xlabel, ylabel)
