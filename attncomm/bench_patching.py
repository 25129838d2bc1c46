"""The ``act_patch`` benchmark: all heads' outputs by position on gpt2-small-random, batched
(:mod:`attncomm.analyses.activation_patching`) against TransformerLens's own one-forward-per-cell
``get_act_patch_attn_head_out_by_pos`` code path on the same inputs, in the same process.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from attncomm.analyses.activation_patching import grid_cells, patched_metrics, resumed_weights
from attncomm.models.adapter import load_model
from attncomm.runtime.config import ModelConfig
from attncomm.tasks import get_task


def bench_act_patch(
    n_prompts: int,
    dtype: torch.dtype,
    cache_dir: Any,
    tl_layers: int | None = 2,
    max_batch: int = 256,
    layers: int | None = None,
) -> dict[str, Any]:
    """Time head-output-by-position patching (20-token induction prompts) ours vs TransformerLens's.

    TransformerLens runs ``generic_activation_patch`` with ``layer_pos_head_vector_patch_setter`` on
    ``hook_z`` (exactly ``get_act_patch_attn_head_out_by_pos``) over the first ``tl_layers`` layers
    (None: all) to bound its run time; cells per second are compared, by wall-clock time (``speedup``)
    and by this process's CPU time (``speedup_cpu``: robust to other jobs on a shared machine with one
    torch thread). ``layers`` restricts our cells to the first layers too (None: every layer, the
    benchmark proper). ``agrees_with_tl``: both give the same metric on the shared cells (float32:
    1e-4, float64: 1e-9, relative to the largest value).
    """
    from transformer_lens import patching

    cfg = ModelConfig(
        name="gpt2-small-random",
        short_name="gpt2-small-random",
        family="gpt2",
        builder="gpt2-small-random",
        tokenizer="gpt2-offline",
    )
    model = load_model(cfg, device="cpu", dtype=dtype, cache_dir=cache_dir)
    task = get_task("induction", seq_len=10)
    prompts = task.make_prompts(model.tokenizer, n_prompts, seed=0)
    clean = prompts.tokens
    corrupted = task.make_prompts(model.tokenizer, n_prompts, seed=1).tokens
    n_pos = clean.shape[1]
    cells = grid_cells(model, "z", n_pos, "layer_head_pos")
    if layers is not None:
        cells = [c for c in cells if c.layer < layers]

    t0, c0 = time.perf_counter(), time.process_time()
    ours = patched_metrics(model, task, prompts, corrupted, clean, "z", cells, max_batch, progress=False)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0

    L = model.arch.n_layers if tl_layers is None else min(tl_layers, model.arch.n_layers)
    H = model.arch.n_heads
    bridge = model.bridge
    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
        index_df = patching.make_df_from_ranges([L, n_pos, H], ["layer", "pos", "head"])
        t0, c0 = time.perf_counter(), time.process_time()
        theirs = patching.generic_activation_patch(
            bridge,
            corrupted,
            clean_cache,
            lambda logits: task.metric(logits, prompts).mean(),
            patching.layer_pos_head_vector_patch_setter,
            "z",
            index_df=index_df,
        )
        tl_s, tl_cpu = time.perf_counter() - t0, time.process_time() - c0
    ours_layers = len(cells) // (H * n_pos)
    shared = min(L, ours_layers)
    ours_grid = ours.mean(1).reshape(ours_layers, H, n_pos)[:shared].permute(0, 2, 1).reshape(-1)
    theirs_grid = theirs.reshape(L, n_pos, H)[:shared].reshape(-1).to(ours_grid.dtype)
    max_diff = float((ours_grid - theirs_grid).abs().max())
    tol = (1e-9 if dtype == torch.float64 else 1e-4) * (1.0 + float(theirs_grid.abs().max()))
    ours_rate = len(cells) / ours_s
    tl_rate = len(index_df) / tl_s
    return {
        "bench": "act_patch",
        "model": cfg.short_name,
        "dtype": str(dtype).replace("torch.", ""),
        "prompts": n_prompts,
        "positions": n_pos,
        "cells": len(cells),
        "seconds": round(ours_s, 3),
        "cells_per_s": round(ours_rate, 2),
        "tl_cells": len(index_df),
        "tl_seconds": round(tl_s, 3),
        "tl_cells_per_s": round(tl_rate, 2),
        "speedup": round(ours_rate / tl_rate, 2),
        "cpu_seconds": round(ours_cpu, 3),
        "tl_cpu_seconds": round(tl_cpu, 3),
        "speedup_cpu": round((len(cells) / ours_cpu) / (len(index_df) / tl_cpu), 2),
        "max_abs_diff_vs_tl": max_diff,
        "agrees_with_tl": max_diff <= tol,
        "path": "resumed"
        if resumed_weights(model, task, prompts, corrupted, clean)[0] is not None
        else "hooks",
        "max_batch": max_batch,
    }
