"""``trace``: trace prompts into per-prompt graphs and per-firing results (docs/METHOD.md sections 1-5).

Resumable: each prompt's graph is written, then its part file (the commit marker); prompts with a
part file are skipped unless ``trace.overwrite=true``, so a killed job picks up where it stopped.
Shardable: ``trace.shard=i trace.n_shards=k`` traces prompts ``p`` with ``p % k == i`` and writes
``..._shard{i}.h5``; once every prompt of every shard is done, the shard that finishes last (or
``stage=trace_merge``) merges everything into the unsharded result file.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from attncomm.core.types import FiringKey
from attncomm.errors import ConfigError
from attncomm.io.results import (
    STATUSES,
    FiringRecord,
    PromptRecord,
    build_results,
    done_prompts,
    part_path,
    read_part_status,
    write_part,
)
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage

log = logging.getLogger(__name__)


class FiringRecords(Mapping[FiringKey, FiringRecord]):
    """A prompt's tracing results as :class:`FiringRecord` (numpy), converted one firing per lookup.

    Wraps :attr:`~attncomm.methods.acc_tracing.PromptTrace.results` (a dict or a disk spool) so that
    writing a part file never holds more than one firing's arrays.
    """

    def __init__(self, results: Mapping[FiringKey, Any]) -> None:
        self._results = results

    def __getitem__(self, key: FiringKey) -> FiringRecord:
        r = self._results[key]
        return FiringRecord(
            r.dest_terms.cpu().numpy(),
            r.src_terms.cpu().numpy(),
            r.contrib_dest.cpu().numpy(),
            r.contrib_src.cpu().numpy(),
        )

    def __iter__(self) -> Iterator[FiringKey]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)


def shard_prompts(n: int, shard: int, n_shards: int) -> list[int]:
    """Prompt ids of one shard: ``p % n_shards == shard``."""
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ConfigError(
            f"trace.shard={shard} trace.n_shards={n_shards}: need 0 <= shard < n_shards, n_shards >= 1"
        )
    return [p for p in range(n) if p % n_shards == shard]


def status_counts(results_dir: Path, prompts: list[int]) -> Counter[str]:
    """How many of ``prompts`` were traced or skipped for each reason (from their part files)."""
    counts: Counter[str] = Counter({s: 0 for s in STATUSES})
    for p in prompts:
        path = part_path(results_dir, p)
        if path.is_file():
            counts[read_part_status(path)] += 1
    return counts


def merge_if_complete(ctx: RunContext) -> Path | None:
    """Merge all part files into the unsharded result file once every prompt is done."""
    art = ctx.artifacts
    done = done_prompts(art.tracing_results_dir)
    missing = sorted(set(range(ctx.n_prompts)) - done)
    if missing:
        log.info("not merging yet: %d prompts still to trace (e.g. %s)", len(missing), missing[:5])
        return None
    return build_results(art.tracing_results(), art.tracing_results_dir, range(ctx.n_prompts))


def check_trace_provenance(cfg: AppConfig, ctx: RunContext) -> None:
    """Refuse to resume from parts made with other settings (model weights, task, trace settings);
    with ``trace.overwrite=true`` start afresh. Records this job's key before anything is traced."""
    from attncomm.io.provenance import check_key, trace_key, write_key

    art = ctx.artifacts
    key = trace_key(cfg)
    has_outputs = bool(done_prompts(art.tracing_results_dir))
    if not cfg.trace.overwrite:
        check_key(
            art.tracing_results_dir,
            key,
            what="traced prompts",
            has_outputs=has_outputs,
            overwrite_option="trace.overwrite",
            run_dir=ctx.run_dir,
        )
    write_key(art.tracing_results_dir, key)


@register_stage("trace", consumes=(), produces=("traced_graphs", "tracing_results"), needs_model=True)
def run_trace(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Trace prompts into per-prompt graphs (GraphML) and per-firing results (HDF5)."""
    from attncomm.io.graphml import write_graph
    from attncomm.methods.acc_tracing import trace_prompts

    tc = cfg.trace
    art = ctx.artifacts
    mine = shard_prompts(ctx.n_prompts, tc.shard, tc.n_shards)
    results_dir = art.tracing_results_dir
    check_trace_provenance(cfg, ctx)
    done = set() if tc.overwrite else done_prompts(results_dir)
    todo = [p for p in mine if p not in done]
    log.info(
        "trace %s/%s: %d prompts in shard %d/%d, %d already done, %d to trace",
        ctx.model_short,
        ctx.task_name,
        len(mine),
        tc.shard,
        tc.n_shards,
        len(mine) - len(todo),
        len(todo),
    )
    n_firings = 0
    if todo:
        model, task = ctx.tracing_model, ctx.task
        prompts = ctx.prompts.subset(todo)
        for pt in trace_prompts(
            model,
            task,
            prompts,
            prompt_ids=todo,
            with_tokens=tc.with_tokens,
            skip_incorrect=tc.skip_incorrect,
            dtype=ctx.dtype,
            progress=True,
            batch_size=max(1, cfg.task.batch_size),
            upstream_fraction=tc.upstream_fraction,
            seed_fraction=tc.seed_fraction,
            max_memory_gb=tc.max_memory_gb,
            spool_dir=results_dir / "parts",
            max_firings=tc.max_firings,
        ):
            status = pt.skip_reason or "traced"
            if pt.budget_stop is not None:
                log.warning(
                    "prompt %d skipped (status firing_budget): it has at least %d firings, more than "
                    "trace.max_firings=%d (tracing stopped before layer %d); nothing of it is kept. Raise "
                    "trace.max_firings, or set trace.max_firings=null for no limit, to trace it",
                    pt.prompt_id,
                    pt.budget_stop.reached,
                    pt.budget_stop.budget,
                    pt.budget_stop.layer,
                )
            graph_path = art.traced_graph(pt.prompt_id)
            if pt.edges is not None and status == "traced":
                write_graph(pt.edges, graph_path)  # the graph's file, without building the graph
            elif graph_path.exists():
                graph_path.unlink()  # a stale graph from an earlier run with other settings
            firings = FiringRecords(pt.results)  # read one firing at a time while the part is written
            write_part(results_dir, PromptRecord(pt.prompt_id, status, pt.n_firings, firings))
            n_firings += pt.n_firings
            ctx.tracker.log_metrics({"trace/prompt": pt.prompt_id, "trace/firings": pt.n_firings})
        ctx.release_tracing_model()  # a pipeline's later stages load the bridge: do not hold both
    shard_file = build_results(art.tracing_results(tc.shard if tc.n_shards > 1 else None), results_dir, mine)
    produced = [shard_file]
    merged = None
    if tc.n_shards > 1 and tc.merge:
        merged = merge_if_complete(ctx)
        if merged is not None:
            produced.append(merged)
    counts = status_counts(results_dir, mine)
    produced += [art.traced_graph(p) for p in mine if art.traced_graph(p).exists()]
    summary: dict[str, Any] = {
        "prompts": len(mine),
        "prompts_traced": counts["traced"],
        "skipped_incorrect": counts["incorrect"],
        "skipped_nonpositive_total": counts["nonpositive_total"],
        "skipped_no_head_seed": counts["no_head_seed"],
        "skipped_firing_budget": counts["firing_budget"],
        "firings_this_run": n_firings,
        "shard": tc.shard,
        "n_shards": tc.n_shards,
    }
    log.info(
        "traced %d of %d prompts; skipped: %d incorrect, %d non-positive total, %d without a head seed, "
        "%d over the firing budget",
        counts["traced"],
        len(mine),
        counts["incorrect"],
        counts["nonpositive_total"],
        counts["no_head_seed"],
        counts["firing_budget"],
    )
    if mine and counts["traced"] == 0:
        log.warning(
            "no prompt of this shard was traced: %d answered incorrectly (trace.skip_incorrect=false traces "
            "them anyway), %d had a non-positive total, %d had no head seed, %d had more firings than "
            "trace.max_firings; later stages have nothing to combine",
            counts["incorrect"],
            counts["nonpositive_total"],
            counts["no_head_seed"],
            counts["firing_budget"],
        )
    ctx.record("trace" if tc.n_shards == 1 else f"trace_shard{tc.shard}", produced, extra=summary)
    ctx.tracker.log_metrics(summary)
    ctx.tracker.log_artifact(shard_file, f"{art.prefix}-tracing-results", "tracing_results")
    return summary


@register_stage("trace_merge", consumes=("tracing_results",), produces=("tracing_results",))
def run_trace_merge(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Merge the part files of every shard into the unsharded tracing result file."""
    art = ctx.artifacts
    art.require(art.tracing_results_dir / "parts", "tracing_results")
    merged = merge_if_complete(ctx)
    if merged is None:
        missing = sorted(set(range(ctx.n_prompts)) - done_prompts(art.tracing_results_dir))
        raise ConfigError(
            f"cannot merge: {len(missing)} prompts have not been traced yet (e.g. {missing[:10]}); "
            "run the missing shards first (trace.shard=i trace.n_shards=k)"
        )
    counts = status_counts(art.tracing_results_dir, list(range(ctx.n_prompts)))
    ctx.record("trace", [merged], extra=dict(counts))
    return {"prompts": ctx.n_prompts, "prompts_traced": counts["traced"]}
