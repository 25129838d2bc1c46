"""Benchmarks: ``python -m attncomm.bench trace --prompts 8 [--task ioi] [--dtype float32]``,
``python -m attncomm.bench eap --prompts 64`` and ``python -m attncomm.bench evaluate --prompts 64``.

Builds (once) and loads the random ``gpt2-small-random`` test model (into ``$ATTNCOMM_CACHE``, default
``~/.cache/attncomm``), times the Omega SVD of all heads, then traces task prompts with
``skip_incorrect=False`` and prints ONE JSON line: prompts, firings, seconds, firings_per_s,
omega_seconds, peak_rss_mb (and the model load time, the traced/skipped counts).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from typing import Any

import torch

from attncomm.methods.acc_tracing import build_omega_cache, trace_prompts
from attncomm.models.adapter import load_model
from attncomm.runtime.cache_root import default_cache_dir
from attncomm.runtime.config import ModelConfig
from attncomm.tasks import get_task

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_trace(
    n_prompts: int, task_name: str, dtype: torch.dtype, seed: int = 0, progress: bool = False
) -> dict:
    """Trace ``n_prompts`` prompts of ``task_name`` on gpt2-small-random and return the timings."""
    cfg = ModelConfig(
        name="gpt2-small-random",
        short_name="gpt2-small-random",
        family="gpt2",
        builder="gpt2-small-random",
        tokenizer="gpt2-offline",
    )
    t0 = time.perf_counter()
    model = load_model(cfg, device="cpu", dtype=dtype, cache_dir=default_cache_dir())
    load_s = time.perf_counter() - t0
    task = get_task(task_name)
    prompts = task.make_prompts(model.tokenizer, n_prompts, seed=seed, prepend_bos=cfg.prepend_bos)

    t0 = time.perf_counter()
    omega = build_omega_cache(model, dtype)
    omega.precompute()
    omega_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    traces = list(
        trace_prompts(
            model, task, prompts, skip_incorrect=False, dtype=dtype, omega_cache=omega, progress=progress
        )
    )
    seconds = time.perf_counter() - t0
    firings = sum(t.n_firings for t in traces)
    return {
        "bench": "trace",
        "model": cfg.short_name,
        "task": task_name,
        "dtype": str(dtype).replace("torch.", ""),
        "prompts": n_prompts,
        "traced": sum(t.graph is not None for t in traces),
        "skipped": {r: sum(t.skip_reason == r for t in traces) for r in {t.skip_reason for t in traces} if r},
        "firings": firings,
        "seconds": round(seconds, 3),
        "firings_per_s": round(firings / seconds, 1) if seconds > 0 else None,
        "omega_seconds": round(omega_s, 3),
        "load_seconds": round(load_s, 3),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def _gpt2_small_random(dtype: torch.dtype) -> tuple[Any, float]:
    """Load (building once) gpt2-small-random; returns the adapter and the load seconds."""
    cfg = ModelConfig(
        name="gpt2-small-random",
        short_name="gpt2-small-random",
        family="gpt2",
        builder="gpt2-small-random",
        tokenizer="gpt2-offline",
    )
    t0 = time.perf_counter()
    model = load_model(cfg, device="cpu", dtype=dtype, cache_dir=default_cache_dir())
    return model, time.perf_counter() - t0


def bench_edges(
    what: str, n_prompts: int, task_name: str, dtype: torch.dtype, batch_size: int, seed: int = 0
) -> dict:
    """``eap``: EAP over every edge of gpt2-small-random; ``evaluate``: an EAP circuit at 10 budgets."""
    from attncomm.core.edge_graph import EdgeGraph, select
    from attncomm.core.faithfulness import MIB_BUDGETS_PERCENT
    from attncomm.methods.edge_patching import eap_scores, evaluate_circuits, graph_shape, make_ablation

    model, load_s = _gpt2_small_random(dtype)
    task = get_task(task_name)
    prompts = task.make_prompts(model.tokenizer, n_prompts, seed=seed, prepend_bos=model.cfg.prepend_bos)
    corrupted = prompts.require_corrupted(f"bench {what}")
    graph = EdgeGraph(graph_shape(model))

    def metric(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return task.metric(logits, prompts.subset(idx))

    t0, c0 = time.perf_counter(), time.process_time()
    scores = eap_scores(model, graph, prompts.tokens, corrupted, metric, batch_size)
    eap_s, eap_cpu = time.perf_counter() - t0, time.process_time() - c0
    result: dict[str, Any] = {
        "bench": what,
        "model": model.short_name,
        "task": task_name,
        "dtype": str(dtype).replace("torch.", ""),
        "prompts": n_prompts,
        "positions": int(prompts.tokens.shape[1]),
        "batch_size": batch_size,
        "edges": graph.n_edges,
        "eap_seconds": round(eap_s, 3),
        "eap_cpu_seconds": round(eap_cpu, 3),  # = wall time of an uncontended single thread
        "load_seconds": round(load_s, 3),
    }
    if what == "evaluate":
        circuits = [select(graph, scores, "topn", b) for b in MIB_BUDGETS_PERCENT]
        ablation = make_ablation("patching", model, graph, prompts.tokens, corrupted=corrupted)
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate_circuits(model, graph, prompts.tokens, ablation, circuits, metric, batch_size)
        result["budgets"] = len(circuits)
        result["evaluate_seconds"] = round(time.perf_counter() - t0, 3)
        result["evaluate_cpu_seconds"] = round(time.process_time() - c0, 3)
    result["torch_threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``python -m attncomm.bench trace ...``): prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m attncomm.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    trace = sub.add_parser("trace", help="trace prompts of a task on gpt2-small-random")
    trace.add_argument("--prompts", type=int, default=8)
    trace.add_argument("--task", default="ioi")
    trace.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--progress", action="store_true")
    trace.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: robust on a shared machine)",
    )
    _add_act_patch_parser(sub)
    for what in ("eap", "evaluate"):
        edges = sub.add_parser(what, help=f"{what} over every edge of gpt2-small-random (32,491 edges)")
        edges.add_argument("--prompts", type=int, default=64)
        edges.add_argument("--task", default="ioi")
        edges.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        edges.add_argument("--batch-size", type=int, default=16)
        edges.add_argument("--seed", type=int, default=0)
        edges.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "act_patch":
        return _run_act_patch(args)
    if args.command in ("eap", "evaluate"):
        result = bench_edges(
            args.command, args.prompts, args.task, DTYPES[args.dtype], args.batch_size, args.seed
        )
    else:
        result = bench_trace(
            args.prompts, args.task, DTYPES[args.dtype], seed=args.seed, progress=args.progress
        )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _add_act_patch_parser(sub: Any) -> None:
    """``act_patch``: all heads by position, batched vs TransformerLens (see attncomm.bench_patching)."""
    cmd = sub.add_parser("act_patch", help="activation patching of all heads by position vs TransformerLens")
    cmd.add_argument("--prompts", type=int, default=4)
    cmd.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    cmd.add_argument("--tl-layers", type=int, default=2, help="layers TransformerLens patches (0: all)")
    cmd.add_argument("--max-batch", type=int, default=256)
    cmd.add_argument("--layers", type=int, default=0, help="patch only the first layers (0: all)")
    cmd.add_argument("--threads", type=int, default=1)


def _run_act_patch(args: Any) -> int:
    from attncomm.bench_patching import bench_act_patch

    result = bench_act_patch(
        args.prompts,
        DTYPES[args.dtype],
        default_cache_dir(),
        args.tl_layers or None,
        args.max_batch,
        args.layers or None,
    )
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
