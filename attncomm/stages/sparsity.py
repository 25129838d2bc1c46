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
gpt2-small, pythia-160m, gemma-2-2b), and last from the tracing results themselves, where it is only
a lower bound (largest selected term index + 1; logged as a warning).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from attncomm.core.term_statistics import (
    SIDES,
    head_density,
    head_density_table,
    histogram,
    summary,
    term_counts_from_lengths,
    with_fraction,
)
from attncomm.errors import AttncommError
from attncomm.io.artifacts import atomic_write_text, write_table
from attncomm.io.results import STATUSES, FiringKey, open_results, parse_dataset_name
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage
from attncomm.viz.plots import head_density_heatmap, save_figure, sparsity_by_model_task, sparsity_histogram

log = logging.getLogger(__name__)

#: d_head of the published models (ACC-METHOD.md section 9), used when no config.json is at hand
PUBLISHED_D_HEAD: dict[str, int] = {
    "gpt2-small": 64,
    "pythia-160m": 64,
    "pythia-160m-deduped": 64,
    "gemma-2-2b": 256,
}

_DEST, _SRC = "svs_used_decomp_i", "svs_used_decomp_j"


# ----------------------------------------------------------------------------- reading


def tracing_result_files(ctx: RunContext) -> list[Path]:
    """The merged tracing results, else the shard files, else a MissingArtifactError."""
    from attncomm.io.completeness import require_complete_trace
    from attncomm.io.provenance import require_trace_inputs_match

    arts = ctx.artifacts
    require_trace_inputs_match(ctx.cfg, arts.tracing_results_dir, "sparsity", include_model=False)
    require_complete_trace(arts, ctx.cfg.model.name, "sparsity", ctx.cfg.allow_partial)
    merged = arts.tracing_results()
    if merged.is_file():
        return [merged]
    shards = sorted(arts.tracing_results_dir.glob(f"{arts.prefix}_{arts.seed}_shard*.h5"))
    if shards:
        log.info("sparsity: no merged tracing results; reading %d shard files", len(shards))
        return shards
    arts.require(merged, "tracing_results")
    return [merged]  # unreachable: require raised


def read_term_lengths(
    paths: list[Path],
) -> tuple[list[tuple[FiringKey, int, int]], int | None, int, dict[int, tuple[str, int]]]:
    """Per firing ``(key, n_dest_terms, n_src_terms)``, the number of heads (from the contribution
    shapes ``(layer, H+2, d+1)``), the largest selected term index + 1, and the prompt table.

    Reads dataset shapes only, except the term datasets themselves (small) for the index bound.
    """
    lengths: dict[FiringKey, dict[str, int]] = {}
    n_heads: int | None = None
    top = 0
    prompts: dict[int, tuple[str, int]] = {}
    for path in paths:
        with open_results(path) as f:
            if "prompts" in f:
                ids, codes, counts = (f[f"prompts/{k}"][()] for k in ("prompt", "status", "n_firings"))
                for p, c, n in zip(ids, codes, counts, strict=True):
                    prompts[int(p)] = (STATUSES[int(c)], int(n))
            names = [n for n in f.keys() if n != "prompts"]
            for name in tqdm(names, desc=f"read {path.name}", leave=False):
                kind, key = parse_dataset_name(name)
                if kind in (_DEST, _SRC):
                    ds = f[name]
                    lengths.setdefault(key, {})[kind] = int(ds.shape[0])
                    if ds.shape[0]:
                        top = max(top, int(np.max(ds[()])) + 1)
                elif n_heads is None:
                    n_heads = int(f[name].shape[1]) - 2
    rows = [(key, v.get(_DEST, 0), v.get(_SRC, 0)) for key, v in sorted(lengths.items())]
    return rows, n_heads, top, prompts


def _model_config_json(cfg: AppConfig) -> dict[str, Any] | None:
    """The model's HF ``config.json`` when it is on disk (no weights loaded, no network)."""
    candidates: list[Path] = []
    if cfg.model.path:
        candidates.append(Path(cfg.model.path).expanduser() / "config.json")
    if cfg.model.builder:
        candidates.append(
            Path(cfg.paths.cache_dir).expanduser() / "models" / cfg.model.builder / "config.json"
        )
    if cfg.model.hf_name:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(cfg.model.hf_name, "config.json", revision=cfg.model.revision)
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception as err:  # noqa: BLE001 - any cache problem just means "not available"
            log.debug("sparsity: HF cache lookup of %s failed: %s", cfg.model.hf_name, err)
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                log.warning("sparsity: cannot read %s: %s", path, err)
    return None


def dims_from_config(hf: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """``(d_head, n_layers, n_heads)`` from an HF config dict (GPT-2, GPT-NeoX, Gemma-2 keys)."""
    n_heads = hf.get("n_head", hf.get("num_attention_heads"))
    n_layers = hf.get("n_layer", hf.get("num_hidden_layers"))
    d_model = hf.get("n_embd", hf.get("hidden_size", hf.get("d_model")))
    d_head = hf.get("head_dim")
    if d_head is None and d_model and n_heads:
        d_head = int(d_model) // int(n_heads)
    as_int = [int(v) if v is not None else None for v in (d_head, n_layers, n_heads)]
    return as_int[0], as_int[1], as_int[2]


def resolve_d_head(cfg: AppConfig, lower_bound: int) -> tuple[int, str, int | None, int | None]:
    """``(d_head, where it came from, n_layers, n_heads)``; see the module docstring for the order."""
    explicit = getattr(cfg.sparsity, "d_head", None)
    hf = _model_config_json(cfg)
    n_layers = n_heads = None
    from_config = None
    if hf is not None:
        from_config, n_layers, n_heads = dims_from_config(hf)
    if explicit:
        return int(explicit), "sparsity.d_head", n_layers, n_heads
    if from_config:
        return from_config, "model config.json", n_layers, n_heads
    if cfg.model.short_name in PUBLISHED_D_HEAD:
        return PUBLISHED_D_HEAD[cfg.model.short_name], "published value (section 9)", n_layers, n_heads
    log.warning(
        "sparsity: d_head of model %s is unknown (no config.json on disk); using the tracing results' "
        "lower bound %d (largest selected term index + 1)",
        cfg.model.name,
        lower_bound,
    )
    return max(lower_bound, 1), "tracing results (lower bound)", n_layers, n_heads


def _sibling_tables(ctx: RunContext, own: Path) -> list[Path]:
    """Sparsity tables of other runs under the same artifact root (standard layout only)."""
    if ctx.cfg.paths.run_dir:
        return []
    root = Path(ctx.cfg.paths.root)
    found = []
    for path in sorted(root.glob("*/*/*/sparsity/*_term_counts.parquet")):
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
    files = tracing_result_files(ctx)
    rows, n_heads_results, lower_bound, prompts = read_term_lengths(files)
    if not rows:
        traced = sum(1 for s, _ in prompts.values() if s == "traced")
        raise AttncommError(
            f"sparsity: the tracing results {', '.join(str(p) for p in files)} hold no firings "
            f"({len(prompts)} prompts listed, {traced} traced): there is nothing to measure. Check the "
            "trace's log for why every prompt was skipped (e.g. trace.skip_incorrect=false traces "
            "prompts the model gets wrong)"
        )
    d_head, d_head_source, n_layers, n_heads = resolve_d_head(cfg, lower_bound)
    if lower_bound > d_head:
        from attncomm.io.provenance import StaleArtifactError

        raise StaleArtifactError(
            f"tracing results select term index {lower_bound - 1}, but d_head={d_head} ({d_head_source}); "
            "the tracing results do not belong to this model: retrace with this model "
            "(trace.overwrite=true) or use a new paths.run_dir"
        )
    n_heads = n_heads or n_heads_results
    df, untraced = term_counts_from_lengths(rows)
    df = with_fraction(df, d_head)
    n_layers = n_layers or (int(df["layer"].max()) + 1 if len(df) else 0)
    n_heads = n_heads or (int(df["head"].max()) + 1 if len(df) else 0)
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

    out = arts.stage_dir("sparsity")
    stem = f"{model}_{task}"
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
        "sparsity/n_prompts_traced": sum(1 for s, _ in prompts.values() if s == "traced"),
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
