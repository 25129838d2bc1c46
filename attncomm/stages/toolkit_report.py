"""Shared output of the toolkit stages: long-form tables, figures and interactive heatmaps in the run
directory, all logged to wandb, and the manifest entry.

Layout in the run directory (``{stem}`` = ``{model}_{task}``):

* ``analyses/{stage}/{stem}.parquet`` and ``.csv``: the stage's long-form table (one row per cell);
  extra tables ``analyses/{stage}/{stem}_{name}.parquet`` / ``.csv``
* ``figures/{stage}_{stem}_{name}.png`` / ``.pdf``
* ``analyses/{stage}/{stem}_{name}.html``: self-contained interactive heatmaps (hover for the cell)

This module also resolves the corrupted prompts of the job's task for the methods that need them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import Tensor

from attncomm.io.artifacts import write_table
from attncomm.viz.heatmaps import write_heatmap_html
from attncomm.viz.plots import save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from attncomm.runtime.registry import RunContext

log = logging.getLogger(__name__)

#: rows of a table logged to wandb (the full table is always in the run directory)
WANDB_MAX_ROWS = 20000


def corrupted_tokens(ctx: RunContext, what: str) -> Tensor:
    """The corrupted counterpart of the job's prompts (equal lengths, same padded width), or a clear
    error (:meth:`TaskPrompts.require_corrupted`) naming the task and the method."""
    return ctx.prompts.require_corrupted(what, equal_lengths=True)


class StageReport:
    """Collects what one toolkit stage writes, logs it to wandb and records it in the manifest."""

    def __init__(self, ctx: RunContext, stage: str) -> None:
        from attncomm.io.provenance import guard_stage_outputs

        guard_stage_outputs(ctx.cfg, ctx, stage)  # before anything of it is written
        self.ctx = ctx
        self.stage = stage
        self.stem = f"{ctx.model_short}_{ctx.task_name}"
        self.dir = ctx.run_dir / "analyses" / stage
        self.figures_dir = ctx.artifacts.figures_dir
        self.files: list[Path] = []

    def table(self, df: pd.DataFrame, name: str | None = None) -> Path:
        """Write ``df`` as parquet and CSV and log it (its first rows) as a wandb table."""
        stem = self.stem if name is None else f"{self.stem}_{name}"
        self.files.append(write_table(df, self.dir / f"{stem}.parquet"))
        self.files.append(write_table(df, self.dir / f"{stem}.csv"))
        self.ctx.tracker.log_table(f"{self.stage}/{name or 'table'}", df.head(WANDB_MAX_ROWS))
        return self.files[-2]

    def figure(self, name: str, fig: Figure) -> list[Path]:
        """Save ``fig`` as PNG and PDF and log the PNG to wandb."""
        saved = save_figure(fig, self.figures_dir / f"{self.stage}_{self.stem}_{name}")
        self.files += saved
        self.ctx.tracker.log_figure(f"{self.stage}/{name}_figure", str(saved[0]))
        return saved

    def html(self, name: str, title: str, panels: Sequence[dict[str, Any]]) -> Path:
        """Write an interactive heatmap page and log it to wandb as an HTML panel."""
        path = write_heatmap_html(self.dir / f"{self.stem}_{name}.html", title, panels)
        self.files.append(path)
        self.ctx.tracker.log_html(f"{self.stage}/{name}_html", path)
        return path

    def finish(self, metrics: dict[str, Any], extra: Any = None) -> dict[str, Any]:
        """Log the metrics and the stage directory; write the manifest entry; return the metrics."""
        metrics = {
            k if k.startswith(f"{self.stage}/") else f"{self.stage}/{k}": v for k, v in metrics.items()
        }
        self.ctx.tracker.log_metrics(metrics)
        self.ctx.tracker.log_artifact(self.dir, f"{self.stem}_{self.stage}", "table")
        run_dir = self.ctx.run_dir
        self.ctx.record(self.stage, [p for p in self.files if p.is_relative_to(run_dir)], extra)
        log.info("%s: wrote %d files under %s", self.stage, len(self.files), self.dir)
        return metrics
