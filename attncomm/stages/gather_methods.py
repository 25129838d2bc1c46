"""``gather_methods``: every run's CPR and CMD under one root, as one table and one figure.

Finds ``{root}/**/circuits/{method}/{model}_{task}_faithfulness.csv`` (written by ``stage=evaluate``),
reads each file's ``CPR`` / ``CMD`` rows and its method's own circuit faithfulness, and writes
``{out_dir}/methods_cpr_cmd.csv`` and ``{out_dir}/methods_cpr_cmd.png/.pdf``
(:func:`attncomm.viz.method_plots.gathered_figure`); the table is logged to wandb as one table. ``root``
defaults to ``paths.root`` and ``out_dir`` to ``{root}/methods_summary``. Needs no model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from attncomm.errors import AttncommError
from attncomm.io.artifacts import write_table
from attncomm.io.provenance import IN_PROGRESS, RECORDS_DIR, read_key_file
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.method_plots import gathered_figure
from attncomm.viz.plots import save_figure

log = logging.getLogger(__name__)

COLUMNS = ["model", "task", "method", "ablation", "cpr", "cmd", "circuit_faithfulness", "run_dir"]


def gather_faithfulness(root: Path) -> pd.DataFrame:
    """One row per faithfulness CSV under ``root`` with its CPR, CMD and own-circuit faithfulness (a CSV
    whose ``evaluate`` run was interrupted, by its provenance record, is skipped with a warning)."""
    rows = []
    for path in sorted(Path(root).glob("**/circuits/*/*_faithfulness.csv")):
        record = path.parents[2] / RECORDS_DIR / f"evaluate-{path.parent.name}.json"
        key = read_key_file(record)
        if key is not None and key.get(IN_PROGRESS):
            log.warning(
                "%s: skipped, its evaluate run did not finish (%s); rerun that run's stage=evaluate",
                path,
                record,
            )
            continue
        table = pd.read_csv(path)
        if not {"circuit", "faithfulness", "method", "model", "task"} <= set(table.columns) or not len(table):
            log.warning("%s is not a faithfulness table: skipped", path)
            continue
        by_name = dict(zip(table["circuit"], table["faithfulness"], strict=False))
        method = str(table["method"].iloc[0])
        rows.append(
            {
                "model": str(table["model"].iloc[0]),
                "task": str(table["task"].iloc[0]),
                "method": method,
                "ablation": str(table["ablation"].iloc[0]) if "ablation" in table else "",
                "cpr": by_name.get("CPR", float("nan")),
                "cmd": by_name.get("CMD", float("nan")),
                "circuit_faithfulness": by_name.get(f"{method} circuit", float("nan")),
                "run_dir": str(path.parents[2]),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


@register_stage(
    "gather_methods", consumes=("faithfulness",), produces=("methods_summary",), needs_model=False
)
def run_gather_methods(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Gather every run's CPR/CMD into one table and figure (logged to wandb as one table)."""
    root = Path(cfg.gather_methods.root or cfg.paths.root)
    out_dir = Path(cfg.gather_methods.out_dir or root / "methods_summary")
    table = gather_faithfulness(root)
    if not len(table):
        raise AttncommError(
            f"no faithfulness tables (circuits/*/*_faithfulness.csv) under {root}; run stage=evaluate "
            "first, or point gather_methods.root at the sweep's paths.root"
        )
    table = table.sort_values(["model", "task", "method", "ablation"]).reset_index(drop=True)
    written = [write_table(table, out_dir / "methods_cpr_cmd.csv")]
    fig = gathered_figure(table)
    written += save_figure(fig, out_dir / "methods_cpr_cmd")
    log.info("gathered %d runs -> %s\n%s", len(table), written[0], table.to_string())
    ctx.tracker.log_table("gather_methods/cpr_cmd", table)
    ctx.tracker.log_figure("gather_methods/cpr_cmd", fig)
    return {"gather_methods/n_runs": len(table)}
