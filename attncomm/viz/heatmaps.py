"""Toolkit figures: labelled heatmaps, bar, line and scatter plots (matplotlib), and self-contained
interactive HTML heatmaps whose cells show their coordinates (layer, head, position, token) and value
on hover. The HTML needs no network: styles and script are inline.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from attncomm.io.artifacts import atomic_write_text
from attncomm.viz.plots import new_figure


def pivot(df: pd.DataFrame, rows: str, cols: str, value: str = "value") -> pd.DataFrame:
    """The ``rows x cols`` matrix of ``value`` (mean over any other column)."""
    return (
        df.pivot_table(index=rows, columns=cols, values=value, aggfunc="mean").sort_index().sort_index(axis=1)
    )


def heatmap_figure(
    panels: Mapping[str, pd.DataFrame],
    title: str | None = None,
    xlabel: str = "",
    ylabel: str = "",
    xticklabels: Sequence[str] | None = None,
    diverging: bool = True,
    colorbar: str = "value",
) -> Figure:
    """One heatmap per panel (a matrix as a DataFrame: index = rows, columns = cols), row 0 at the top.

    ``xticklabels`` replaces the column labels (e.g. token labels for positions). A diverging colour map
    centred at 0 is used unless ``diverging=False``.
    """
    if not panels:
        raise ValueError("no heatmap panels to plot")
    n = len(panels)
    first = next(iter(panels.values()))
    R, C = first.shape
    fig = new_figure((1.5 + min(0.35 * C + 1.0, 14) * min(n, 3), 1.2 + (0.3 * R + 0.8) * ((n + 2) // 3)))
    axes = fig.subplots((n + 2) // 3, min(n, 3), squeeze=False).ravel()
    values = np.concatenate([np.asarray(p.values, dtype=float).ravel() for p in panels.values()])
    finite = values[np.isfinite(values)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax or 1.0
    kw: dict[str, Any] = {"cmap": "RdBu", "vmin": -vmax, "vmax": vmax} if diverging else {"cmap": "viridis"}
    image = None
    for ax, (name, mat) in zip(axes, panels.items(), strict=False):
        image = ax.imshow(np.ma.masked_invalid(np.asarray(mat.values, dtype=float)), aspect="auto", **kw)
        ax.set_title(name, fontsize=9)
        ax.set_yticks(range(mat.shape[0]), [str(i) for i in mat.index], fontsize=7)
        labels = (
            list(xticklabels)
            if xticklabels is not None and len(xticklabels) == mat.shape[1]
            else [str(c) for c in mat.columns]
        )
        ax.set_xticks(range(mat.shape[1]), labels, fontsize=7, rotation=90 if xticklabels is not None else 0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    for ax in axes[n:]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:n]), label=colorbar, shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def bar_figure(
    labels: Sequence[str], values: Sequence[float], title: str = "", ylabel: str = "value"
) -> Figure:
    """A bar chart (e.g. the top heads by direct logit attribution)."""
    fig = new_figure((1.5 + 0.4 * max(len(labels), 4), 3.5))
    ax = fig.subplots()
    colors = ["#b2182b" if v >= 0 else "#2166ac" for v in values]
    ax.bar(range(len(values)), list(values), color=colors)
    ax.set_xticks(range(len(labels)), list(labels), rotation=60, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def line_figure(
    x: Sequence[str], series: Mapping[str, Sequence[float]], title: str = "", ylabel: str = "value"
) -> Figure:
    """Lines over labelled steps (e.g. the logit lens after each layer)."""
    fig = new_figure((1.5 + 0.35 * max(len(x), 6), 3.5))
    ax = fig.subplots()
    for name, ys in series.items():
        ax.plot(range(len(ys)), list(ys), marker="o", label=name)
    ax.set_xticks(range(len(x)), list(x), rotation=60, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return fig


def scatter_figure(
    x: Sequence[float], y: Sequence[float], title: str = "", xlabel: str = "x", ylabel: str = "y"
) -> Figure:
    """A scatter with the diagonal (e.g. attribution patching against activation patching)."""
    fig = new_figure((4.5, 4.2))
    ax = fig.subplots()
    ax.scatter(list(x), list(y), s=8, alpha=0.7)
    both = [v for v in list(x) + list(y) if np.isfinite(v)]
    if both:
        lo, hi = min(both), max(both)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.7, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return fig


_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
table.hm {{ border-collapse: collapse; margin-bottom: 24px; }}
table.hm td {{ width: 18px; height: 18px; padding: 0; border: 1px solid #fff; }}
table.hm th {{ font-size: 10px; font-weight: normal; padding: 0 3px; white-space: nowrap; }}
th.col {{ writing-mode: vertical-rl; transform: rotate(180deg); }}
#tip {{ position: fixed; pointer-events: none; background: #222; color: #fff; font-size: 12px;
        padding: 4px 7px; border-radius: 4px; display: none; white-space: pre; }}
</style></head><body>
<h2>{title}</h2>
<div id="panels"></div><div id="tip"></div>
<script>
const DATA = {data};
function color(v, m) {{
  if (v === null || !isFinite(v)) return "#ddd";
  const t = Math.max(-1, Math.min(1, v / (m || 1)));
  const r = t > 0 ? 255 : Math.round(255 * (1 + t)), b = t < 0 ? 255 : Math.round(255 * (1 - t));
  const g = Math.round(255 * (1 - Math.abs(t)));
  return `rgb(${{r}},${{g}},${{b}})`;
}}
const tip = document.getElementById("tip");
for (const p of DATA) {{
  const h = document.createElement("h3"); h.textContent = p.title;
  document.getElementById("panels").appendChild(h);
  const t = document.createElement("table"); t.className = "hm";
  const head = t.insertRow();
  head.appendChild(document.createElement("th")).textContent = p.ylabel + " / " + p.xlabel;
  for (const c of p.cols) {{
    const th = document.createElement("th"); th.className = "col"; th.textContent = c; head.appendChild(th);
  }}
  p.values.forEach((row, i) => {{
    const tr = t.insertRow(); tr.appendChild(document.createElement("th")).textContent = p.rows[i];
    row.forEach((v, j) => {{
      const td = tr.insertCell(); td.style.background = color(v, p.vmax);
      td.dataset.info = p.hover[i][j];
      td.onmousemove = e => {{
        tip.style.display = "block"; tip.style.left = (e.clientX + 12) + "px";
        tip.style.top = (e.clientY + 12) + "px"; tip.textContent = td.dataset.info;
      }};
      td.onmouseleave = () => {{ tip.style.display = "none"; }};
    }});
  }});
  document.getElementById("panels").appendChild(t);
}}
</script></body></html>
"""


def heatmap_panel(
    title: str,
    mat: pd.DataFrame,
    row_name: str,
    col_name: str,
    col_labels: Sequence[str] | None = None,
    extra: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """One HTML panel: a matrix with hover text ``row_name=r, col_name=c[, token=...], value=v``.

    ``col_labels`` names each column (e.g. the token at a position) and is shown as ``token``.
    """
    values = np.asarray(mat.values, dtype=float)
    cols = [str(c) for c in mat.columns]
    tokens = list(col_labels) if col_labels is not None and len(col_labels) == len(cols) else None
    hover = []
    for i, r in enumerate(mat.index):
        line = []
        for j, c in enumerate(mat.columns):
            parts = [f"{row_name}: {r}", f"{col_name}: {c}"]
            if tokens is not None:
                parts.append(f"token: {tokens[j]}")
            for key, labels in (extra or {}).items():
                parts.append(f"{key}: {labels[i]}")
            parts.append(f"value: {values[i, j]:.6g}")
            line.append("\n".join(parts))
        hover.append(line)
    finite = values[np.isfinite(values)]
    return {
        "title": title,
        "rows": [str(r) for r in mat.index],
        "cols": [f"{c} {tokens[j]}" if tokens else c for j, c in enumerate(cols)],
        "xlabel": col_name,
        "ylabel": row_name,
        "values": [[float(v) if np.isfinite(v) else None for v in row] for row in values],
        "vmax": float(np.abs(finite).max()) if finite.size else 1.0,
        "hover": hover,
    }


def write_heatmap_html(path: str | Path, title: str, panels: Sequence[dict[str, Any]]) -> Path:
    """Write a self-contained interactive heatmap page (one table per panel, tooltips on hover)."""
    data = json.dumps(list(panels)).replace("</", "<\\/")
    path = Path(path)
    atomic_write_text(path, _HTML.format(title=html.escape(title), data=data))
    return path
