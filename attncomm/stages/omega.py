"""``omega``: compute and cache the Omega SVDs of every head (HDF5, one file per layer).

Non-rotary models have one SVD per (layer, head, side). Rotary models have one per offset
``delta = dest - source``: the stage computes every offset the task's prompts can need
(``0 .. longest prompt - 1``) plus ``omega.offsets`` and ``0 .. omega.max_offset``; a later run that
needs more adds only the missing ones, and a second identical run computes nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from attncomm.io.omega_store import layer_file, update_layer
from attncomm.methods.acc_tracing import build_omega_cache
from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, register_stage

log = logging.getLogger(__name__)


def offsets_needed(cfg: AppConfig, ctx: RunContext) -> list[int]:
    """Offsets a rotary model needs for this job: all that the prompts contain, plus requested ones."""
    wanted = set(cfg.omega.offsets)
    if cfg.omega.max_offset is not None:
        wanted |= set(range(cfg.omega.max_offset + 1))
    longest = int(ctx.prompts.lengths.max())
    wanted |= set(range(longest))
    return sorted(wanted)


def discard_foreign_cache(cfg: AppConfig, directory: Path) -> None:
    """Keep the cache only if it was computed from these weights (and dtype); otherwise delete its
    layer files with a warning, so they are recomputed. Records this model's key."""
    from attncomm.io.provenance import differences, model_key, read_key, write_key

    key = {**model_key(cfg), "device.dtype": cfg.device.dtype}
    files = sorted(directory.glob("layer_*.h5")) if directory.is_dir() else []
    recorded = read_key(directory)
    if files:
        diff = ["(no provenance record)"] if recorded is None else differences(recorded, key)
        if diff:
            log.warning(
                "omega: the cache in %s was computed for other weights (%s); recomputing it",
                directory,
                "; ".join(diff),
            )
            for f in files:
                f.unlink()
    write_key(directory, key)


@register_stage("omega", produces=("omega",), needs_model=True)
def run_omega(cfg: AppConfig, ctx: RunContext) -> dict[str, Any]:
    """Compute and cache the dest- and source-side Omega SVDs of every head (and rotary offset)."""
    model = ctx.model
    cache = build_omega_cache(model, ctx.dtype)
    deltas = offsets_needed(cfg, ctx) if model.arch.rotary else [0]
    sides = ("d", "s") if cache.augmented else ("d",)
    directory = ctx.artifacts.omega_dir
    discard_foreign_cache(cfg, directory)
    start = time.perf_counter()
    added = 0
    files = []
    for layer in tqdm(range(model.arch.n_layers), desc="omega layers", unit="layer"):
        added += update_layer(directory, cache, layer, sides, deltas)
        files.append(layer_file(directory, layer))
    seconds = time.perf_counter() - start
    summary = {
        "omega_entries_added": added,
        "omega_offsets": len(deltas),
        "omega_sides": len(sides),
        "omega_seconds": seconds,
    }
    log.info(
        "omega: %d SVDs added (%d offsets, sides %s) in %.2fs -> %s",
        added,
        len(deltas),
        sides,
        seconds,
        directory,
    )
    ctx.record("omega", files, extra=summary)
    ctx.tracker.log_metrics(summary)
    return summary
