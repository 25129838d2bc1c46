"""Complete inputs only: a stage that combines per-prompt results refuses an unfinished trace.

A trace is complete when every prompt ``0..N-1`` has a part file (traced or skipped with a reason).
A stage reading it stops with :class:`IncompleteInputError` naming how many prompts are missing
and the command that completes them, unless ``allow_partial=true`` (then a warning says how many of
N it uses). A run directory without part files (e.g. published graphs copied in) is checked through
its merged result file's prompt table when there is one; with neither, completeness cannot be
verified and a warning says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from attncomm.errors import AttncommError
from attncomm.io.artifacts import RunArtifacts

log = logging.getLogger(__name__)


class IncompleteInputError(AttncommError):
    """A stage's input covers only part of the prompts (an interrupted or unmerged trace)."""


@dataclass(frozen=True)
class TraceStatus:
    """Which prompts of ``0..n-1`` have a result, and where that was read from."""

    n: int
    done: frozenset[int]
    source: str  # "parts" | "results" | "none"

    @property
    def missing(self) -> list[int]:
        return sorted(set(range(self.n)) - self.done)


def trace_status(arts: RunArtifacts) -> TraceStatus:
    """What is known about the completeness of the trace in ``arts.run_dir``."""
    from attncomm.io.results import done_prompts, read_prompt_table

    parts = done_prompts(arts.tracing_results_dir)
    if parts:
        return TraceStatus(arts.n, frozenset(parts), "parts")
    merged = arts.tracing_results()
    if merged.is_file():
        return TraceStatus(arts.n, frozenset(read_prompt_table(merged)), "results")
    return TraceStatus(arts.n, frozenset(), "none")


def trace_command(arts: RunArtifacts, model: str) -> str:
    """The command that completes (resumes) the trace of this run directory."""
    return (
        f"python run.py stage=trace model={model} task={arts.task} task.n_prompts={arts.n} "
        f"task.seed={arts.seed} paths.run_dir={arts.run_dir}"
    )


def require_complete_trace(arts: RunArtifacts, model: str, stage: str, allow_partial: bool) -> TraceStatus:
    """Raise :class:`IncompleteInputError` when prompts are missing and ``allow_partial`` is false."""
    status = trace_status(arts)
    if status.source == "none":
        log.warning(
            "%s: no tracing part files or result file in %s: cannot verify that the trace is complete",
            stage,
            arts.run_dir,
        )
        return status
    missing = status.missing
    if not missing:
        return status
    if allow_partial:
        log.warning(
            "%s: using a partial trace (allow_partial=true): %d of %d prompts have no result yet",
            stage,
            len(missing),
            arts.n,
        )
        return status
    raise IncompleteInputError(
        f"{stage}: the trace in {arts.tracing_results_dir} is incomplete: {len(missing)} of {arts.n} prompts "
        f"have no result yet (e.g. {missing[:5]}). Complete it with `{trace_command(arts, model)}` (it "
        f"resumes; with shards, run the missing trace.shard=i), or pass allow_partial=true to use the "
        f"{len(status.done)} prompts done so far"
    )


def require_merged_results(arts: RunArtifacts, model: str, stage: str, allow_partial: bool) -> Path:
    """The merged result file; unmerged shards or an incomplete trace give one clear message."""
    require_complete_trace(arts, model, stage, allow_partial)
    merged = arts.tracing_results()
    if merged.is_file():
        return merged
    shards = sorted(arts.tracing_results_dir.glob(f"{arts.prefix}_{arts.seed}_shard*.h5"))
    if shards:
        raise IncompleteInputError(
            f"{stage}: {len(shards)} shard result files in {arts.tracing_results_dir} are not merged yet "
            f"into {merged.name}; merge them with `python run.py stage=trace_merge model={model} "
            f"task={arts.task} task.n_prompts={arts.n} paths.run_dir={arts.run_dir}`"
        )
    return arts.require(merged, "tracing_results")
