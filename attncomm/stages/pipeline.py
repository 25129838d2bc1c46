"""``pipeline``: run a chain of stages in dependency order inside one job.

A stage is skipped when the manifest says it already ran with the same relevant configuration
(model, task, dtype, tracing settings, and the parameter sections of this and every earlier stage of
the chain) and all the files it recorded still exist;
once one stage runs, every later stage runs too, so downstream artifacts never go stale.
``pipeline.force=true`` reruns everything. Each stage's metrics land in the job's wandb run under
``{stage}/...``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import pandas as pd

from attncomm.errors import ConfigError
from attncomm.io.circuits_data import NoReferenceCircuitError
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import (
    RunContext,
    StageSpec,
    missing_inputs,
    pipeline_order,
    register_stage,
)
from attncomm.runtime.tracking import PrefixedTracker

log = logging.getLogger(__name__)

#: config sections every stage's artifacts depend on (tracing settings shape everything downstream)
COMMON_SECTIONS = ("model", "task", "device", "trace", "omega")


def fingerprint(config: dict[str, Any], sections: tuple[str, ...]) -> str:
    """Hash of the config sections that determine a stage's artifacts (not where/how they are logged)."""
    relevant = {k: config.get(k) for k in sections}
    if isinstance(relevant.get("device"), dict):
        relevant["device"] = {k: v for k, v in relevant["device"].items() if k != "name"}
    speed_only = (("model", "weight_cache"), ("trace", "max_memory_gb"), ("device", "threads"))
    for section, key in speed_only:
        if isinstance(relevant.get(section), dict):
            relevant[section] = {k: v for k, v in relevant[section].items() if k != key}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_sections(order: list[StageSpec], stage: str) -> tuple[str, ...]:
    """A stage depends on the common sections and on its own and earlier stages' parameter sections."""
    names = [s.name for s in order]
    earlier = order[: names.index(stage) + 1]
    return COMMON_SECTIONS + tuple(dict.fromkeys(s.section for s in earlier if s.section))


def is_up_to_date(ctx: RunContext, stage: str, sections: tuple[str, ...]) -> bool:
    """Whether the manifest records ``stage`` with the same relevant config and all its files exist."""
    from attncomm.io.manifest import read_manifest
    from attncomm.io.provenance import stage_outputs_current

    entry = read_manifest(ctx.run_dir).get("stages", {}).get(stage)
    if not entry or fingerprint(entry.get("config", {}), sections) != fingerprint(ctx.config_dict, sections):
        return False
    if not all((ctx.run_dir / f).exists() for f in entry.get("files", [])):
        return False
    return stage_outputs_current(ctx.cfg, ctx, stage)  # its outputs' provenance key is this config's


@register_stage("pipeline")
def run_pipeline(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Run the stages of ``pipeline.stages`` in order, skipping those already complete."""
    names = list(cfg.pipeline.stages)
    if not names:
        raise ConfigError("pipeline.stages is empty; list stages, e.g. pipeline.stages=[trace,unify]")
    if "pipeline" in names:
        raise ConfigError("pipeline.stages cannot contain 'pipeline' itself")
    specs = pipeline_order(names)
    if [s.name for s in specs] != list(dict.fromkeys(names)):
        log.info("pipeline: running in dependency order: %s", ", ".join(s.name for s in specs))
    missing = missing_inputs(specs, ctx.artifacts.has)
    if missing:
        lines = [f"  {stage} needs {kind}, made by the '{prod}' stage" for stage, kind, prod in missing]
        fix = sorted({prod for _, _, prod in missing})
        raise ConfigError(
            "pipeline.stages cannot run: inputs are neither in the run directory nor made by an earlier "
            f"stage of the pipeline ({ctx.run_dir}):\n"
            + "\n".join(lines)
            + f"\n  add {fix} to pipeline.stages, or point paths.run_dir at a directory that holds them"
        )
    from attncomm.io.provenance import discard_stage_records

    base_tracker = ctx.tracker
    summary: dict[str, Any] = {}
    rerun = cfg.pipeline.force
    for spec in specs:
        if not rerun and is_up_to_date(ctx, spec.name, stage_sections(specs, spec.name)):
            log.info("pipeline: %s is up to date, skipped", spec.name)
            summary[f"{spec.name}/skipped"] = True
            continue
        rerun = True
        log.info("pipeline: running %s (%s)", spec.name, spec.description)
        start = time.perf_counter()
        ctx.tracker = PrefixedTracker(base_tracker, spec.name)
        try:
            metrics = spec.run(cfg, ctx) or {}
        except NoReferenceCircuitError as err:
            if spec.name != "compare":
                raise
            log.info("pipeline: compare skipped: %s (sparsity and export still run)", err)
            discard_stage_records(ctx)
            summary["compare/skipped"] = True
            continue
        finally:
            ctx.tracker = base_tracker
        summary.update(
            {k if k.startswith(f"{spec.name}/") else f"{spec.name}/{k}": v for k, v in metrics.items()}
        )
        summary[f"{spec.name}/seconds"] = time.perf_counter() - start
    report = closing_summary(cfg, ctx, summary)
    log.info("\n%s", report)
    return summary


def _traced_counts(ctx: RunContext) -> dict[str, int] | None:
    from attncomm.io.results import TracingResults

    path = ctx.artifacts.tracing_results()
    if not path.is_file():
        return None
    counts: dict[str, int] = {}
    for status, _ in TracingResults(path).prompts().values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def closing_summary(cfg: AppConfig, ctx: RunContext, summary: dict[str, Any]) -> str:
    """What a person wants to read when the run ends: prompts, circuit, scores, where things are."""
    lines = [f"== attncomm pipeline: {cfg.model.short_name} / {cfg.task.name}, N={cfg.task.n_prompts} =="]
    counts = _traced_counts(ctx)
    if counts is not None:
        skipped = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != "traced")
        line = f"prompts traced: {counts.get('traced', 0)} of {sum(counts.values())}"
        lines.append(line + (f" (skipped: {skipped})" if skipped else ""))
    th = cfg.compare.threshold
    pruned = ctx.artifacts.pruned_graph(th)
    if pruned.is_file():
        from attncomm.core.circuit_overlap import circuit_components
        from attncomm.io.graphml import read_graph

        G = read_graph(pruned)
        comps = sorted(circuit_components(G), key=str)
        lines.append(
            f"circuit at th={th}: {G.number_of_nodes()} nodes, {G.number_of_edges()} edges, "
            f"{len(comps)} components: " + ", ".join(f"{layer}.{c}" for layer, c in comps)
        )
    csv = ctx.artifacts.comparison_csv(th)
    if csv.is_file():
        table = pd.read_csv(csv)
        ours = table[table["Method B"].str.startswith("Ours")].set_index("Metric")["Value"]
        ref = summary.get("compare/reference", "the reference circuit")
        lines.append(
            f"vs {ref}: precision {ours.get('Precision', float('nan')):.3f}, "
            f"recall {ours.get('Recall', float('nan')):.3f}, F1 {ours.get('F1-Score', float('nan')):.3f}"
        )
    lines.append(f"files: {ctx.run_dir}")
    viewer = ctx.artifacts.stage_dir("export") / "pruned_graphs" / f"{pruned.stem}.html"
    if viewer.is_file():
        lines.append(f"circuit viewer at th={th} (open in a browser): {viewer}")
    else:
        html = sorted(ctx.artifacts.stage_dir("export").glob("pruned_graphs/*.html"))
        if html:
            lines.append(f"circuit viewers (open in a browser; none exported at th={th}): {html[0].parent}")
    if ctx.tracker.run_path is not None:
        lines.append(f"wandb {cfg.logger.mode} run: {ctx.tracker.run_path}")
        if cfg.logger.mode == "offline":
            lines.append(f"  upload it later with: wandb sync {ctx.tracker.run_path}")
    return "\n".join(lines)
