"""Benchmarks on the random ``gpt2-small-random`` test model (built once into ``$ATTNCOMM_CACHE``).

``python -m attncomm.bench all`` (``make bench``) prints one JSON line per measurement:

* ``trace`` -- the 8 IOI prompts: firings/s, Omega SVD seconds, model load seconds cold (weights
  processed by TransformerLens) and warm (served from the processed-weight cache), warm as ``stage=trace``
  loads it (``load_seconds_tracing``: the plain forward of ``attncomm.models.plain_model``), the import
  time of the TransformerLens bridge (paid once per process, not part of either load), peak RSS;
* ``e2e`` -- ``python run.py stage=trace`` on the same 8 IOI prompts from process start to exit, warm
  (caches filled by a first run; each measured run traces into a fresh run directory);
* ``induction`` -- one induction prompt of each of 64, 256 and 1024 tokens, each measured in its own
  subprocess so that ``peak_rss_mb`` is that measurement's alone: ``tokens_per_prompt``, ``firings``,
  ``seconds`` (tracing of that prompt, forward pass included), ``firings_per_s``, ``peak_rss_mb``
  (the whole subprocess: model load included) and ``rss_after_load_mb``. ``all`` runs them with a
  per-prompt firing budget (``--max-firings``, default :data:`ALL_MAX_FIRINGS`): the 1024-token prompt
  of this random model has more than 100,000 firings and would trace for hours, so it stops at the
  budget (``stopped_at_firing_budget``: true, ``firings`` = the firings traced before the stop); the
  64- and 256-token prompts have far fewer firings and are traced completely.

* ``act_patch`` -- activation patching of all heads by position, batched, against TransformerLens's
  own ``get_act_patch_attn_head_out_by_pos`` (:mod:`attncomm.bench_patching`);
* ``eap`` / ``evaluate`` -- EAP over every edge of the model (32,491 edges) on 64 IOI prompts, and the
  faithfulness of an EAP circuit at MIB's 10 edge budgets.

Single measurements: ``python -m attncomm.bench trace --prompts 8`` and
``python -m attncomm.bench induction --tokens 256 [--max-firings N]``. Tracing runs with
``skip_incorrect=False``; an induction prompt that is skipped (non-positive seed total) is replaced by
the next one of the same length (``prompt_index`` says which was measured); one stopped at the firing
budget is not.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from attncomm.methods.acc_tracing import build_omega_cache, trace_prompts
from attncomm.models.adapter import ModelAdapter, load_model
from attncomm.models.plain_model import PlainModel, load_tracing_model
from attncomm.runtime.cache_root import default_cache_dir
from attncomm.runtime.config import ModelConfig
from attncomm.tasks import get_task

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
INDUCTION_TOKENS = (64, 256, 1024)
#: ``all``'s per-prompt firing budget of the induction lines (``--max-firings``)
ALL_MAX_FIRINGS = 5000


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def model_config(weight_cache: bool = True) -> ModelConfig:
    """The gpt2-small-random model config (as conf/model/gpt2-small-random.yaml)."""
    return ModelConfig(
        name="gpt2-small-random",
        short_name="gpt2-small-random",
        family="gpt2",
        builder="gpt2-small-random",
        tokenizer="gpt2-offline",
        weight_cache=weight_cache,
    )


def _load(dtype: torch.dtype, weight_cache: bool = True) -> tuple[ModelAdapter, float]:
    t0 = time.perf_counter()
    model = load_model(model_config(weight_cache), device="cpu", dtype=dtype, cache_dir=default_cache_dir())
    return model, time.perf_counter() - t0


def _load_tracing(dtype: torch.dtype) -> tuple[ModelAdapter | PlainModel, float]:
    """The model as ``stage=trace`` loads it (the plain forward for this GPT-2 model), and the seconds."""
    t0 = time.perf_counter()
    model = load_tracing_model(model_config(), device="cpu", dtype=dtype, cache_dir=default_cache_dir())
    return model, time.perf_counter() - t0


def bench_trace(
    n_prompts: int, task_name: str, dtype: torch.dtype, seed: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Load cold and warm, then trace ``n_prompts`` prompts of ``task_name`` and return the timings."""
    t0 = time.perf_counter()
    import transformer_lens.model_bridge  # noqa: F401  (the one-time import, not part of a load)

    import_s = time.perf_counter() - t0
    cfg = model_config()
    model_dir = default_cache_dir() / "models" / cfg.short_name
    if not model_dir.is_dir():  # build the checkpoint first: building is not loading
        _load(dtype, weight_cache=False)
    _, cold_s = _load(dtype, weight_cache=False)  # TransformerLens processes the weights
    _load(dtype)  # make sure the processed-weight cache exists
    _, warm_s = _load(dtype)
    _load_tracing(dtype)  # make sure the plain-forward cache exists
    model, plain_s = _load_tracing(dtype)
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
        "traced": sum(t.edges is not None for t in traces),
        "skipped": {r: sum(t.skip_reason == r for t in traces) for r in {t.skip_reason for t in traces} if r},
        "firings": firings,
        "seconds": round(seconds, 3),
        "firings_per_s": round(firings / seconds, 1) if seconds > 0 else None,
        "omega_seconds": round(omega_s, 3),
        "load_seconds": round(warm_s, 3),
        "load_seconds_cold": round(cold_s, 3),
        "load_seconds_warm": round(warm_s, 3),
        "load_seconds_tracing": round(plain_s, 3),
        "tracing_model": type(model).__name__,
        "import_seconds": round(import_s, 3),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


#: the end-to-end command of the issue's target (8 IOI prompts on gpt2-small-random, logging off)
E2E_ARGS = (
    "stage=trace",
    "model=gpt2-small-random",
    "task=ioi",
    "task.n_prompts=8",
    "trace.skip_incorrect=false",
    "logger.mode=disabled",
)


def bench_e2e(runs: int = 3, timeout: float = 600.0) -> dict[str, Any]:
    """``python run.py stage=trace ...`` (:data:`E2E_ARGS`) from process start to exit, warm: a first run
    fills the caches (test model, processed weights, plain forward), then ``runs`` runs each trace the 8
    prompts into a fresh run directory. Reports every run's wall seconds and their minimum and median."""
    run_py = Path(__file__).resolve().parent.parent / "run.py"
    if not run_py.is_file():
        return {"bench": "e2e", "error": f"{run_py} not found (run from a source checkout)"}
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="attncomm-e2e-") as tmp:
        for i in range(runs + 1):
            cmd = [
                sys.executable,
                str(run_py),
                *E2E_ARGS,
                f"paths.root={tmp}/{i}",
                f"hydra.run.dir={tmp}/h{i}",
            ]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-3:]
                return {"bench": "e2e", "error": f"exit {proc.returncode}", "stderr": tail}
            if i:  # the first run only warms the caches
                seconds.append(round(elapsed, 3))
    return {
        "bench": "e2e",
        "command": "python run.py " + " ".join(E2E_ARGS),
        "runs": seconds,
        "seconds_min": min(seconds),
        "seconds_median": sorted(seconds)[len(seconds) // 2],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1),
    }


def _rss_guard(limit_gb: float, what: dict[str, Any]) -> None:
    """Stop this process with an error JSON line once its RSS passes ``limit_gb`` (shared machines)."""

    start = time.perf_counter()

    def watch() -> None:
        while True:
            if _rss_mb() > limit_gb * 1024:
                line = {
                    **what,
                    "error": f"stopped: resident memory passed {limit_gb} GiB",
                    "rss_mb": round(_rss_mb(), 1),
                    "elapsed_s": round(time.perf_counter() - start, 1),
                }
                sys.stdout.write(json.dumps(line) + "\n")
                sys.stdout.flush()
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def bench_induction(
    tokens: int,
    dtype: torch.dtype,
    seed: int = 0,
    max_tries: int = 8,
    max_memory_gb: float | None = None,
    max_rss_gb: float | None = None,
    max_firings: int | None = None,
) -> dict[str, Any]:
    """Trace one induction prompt of ``tokens`` tokens (BOS + a sequence twice; n_ctx caps it).

    With ``max_firings``, a prompt with more firings stops at that budget (the tracer's per-layer check)
    and is the measurement: ``stopped_at_firing_budget`` is true, ``firings`` counts the firings traced
    before the stop and ``firings_known`` those known when it stopped (a lower bound of its total).
    """
    if max_rss_gb is not None:
        _rss_guard(max_rss_gb, {"bench": "induction", "tokens": tokens})
    model, load_s = _load_tracing(dtype)  # as stage=trace loads it
    rss_after_load = _rss_mb()
    n_ctx = model.arch.n_ctx
    seq_len = max(3, (min(tokens, n_ctx) - 1) // 2)
    task = get_task("induction", seq_len=seq_len)
    prompts = task.make_prompts(model.tokenizer, max_tries, seed=seed, prepend_bos=True)
    omega = build_omega_cache(model, dtype)
    omega.precompute()
    result: dict[str, Any] = {}
    for i in range(max_tries):
        t0, c0 = time.perf_counter(), time.process_time()
        (trace,) = trace_prompts(
            model,
            task,
            prompts.subset([i]),
            skip_incorrect=False,
            dtype=dtype,
            omega_cache=omega,
            progress=False,
            batch_size=1,
            max_memory_gb=max_memory_gb,
            spool_dir=tempfile.gettempdir(),  # per-firing results on disk, as stage=trace does
            max_firings=max_firings,
        )
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        result = {"prompt_index": i, "firings": trace.n_firings, "seconds": round(seconds, 3)}
        result["cpu_seconds"] = round(cpu, 3)  # = wall time of an uncontended single thread
        result["stopped_at_firing_budget"] = trace.budget_stop is not None
        if trace.budget_stop is not None:
            stop = trace.budget_stop
            result.update(firings=stop.traced, firings_known=stop.reached, stopped_before_layer=stop.layer)
            break
        if trace.edges is not None:
            result["edges"] = len(trace.edges)
            result["spooled_mb"] = round(trace.results.nbytes / 2**20, 1)  # type: ignore[attr-defined]
            break
        result["skip_reason"] = trace.skip_reason
    firings = result["firings"]
    return {
        "bench": "induction",
        "model": "gpt2-small-random",
        "dtype": str(dtype).replace("torch.", ""),
        "tokens_per_prompt": int(prompts.lengths[result["prompt_index"]]),
        **result,
        "firings_per_s": round(firings / result["seconds"], 1) if result["seconds"] > 0 else None,
        "load_seconds": round(load_s, 3),
        "rss_after_load_mb": round(rss_after_load, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "max_memory_gb": max_memory_gb,
        "max_firings": max_firings,
        "torch_threads": torch.get_num_threads(),
    }


def bench_edges(
    what: str, n_prompts: int, task_name: str, dtype: torch.dtype, batch_size: int, seed: int = 0
) -> dict:
    """``eap``: EAP over every edge of gpt2-small-random; ``evaluate``: an EAP circuit at 10 budgets."""
    from attncomm.core.edge_graph import EdgeGraph, select
    from attncomm.core.faithfulness import MIB_BUDGETS_PERCENT
    from attncomm.methods.edge_patching import eap_scores, evaluate_circuits, graph_shape, make_ablation

    model, load_s = _load(dtype)
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
        evaluate_circuits(
            model, graph, prompts.tokens, ablation, circuits, metric, batch_size, positions=prompts.end
        )
        result["budgets"] = len(circuits)
        result["evaluate_seconds"] = round(time.perf_counter() - t0, 3)
        result["evaluate_cpu_seconds"] = round(time.process_time() - c0, 3)
    result["torch_threads"] = torch.get_num_threads()
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


def _subprocess_line(args: list[str], timeout: float) -> str:
    """Run ``python -m attncomm.bench ARGS`` and return its JSON line (or an error line)."""
    cmd = [sys.executable, "-m", "attncomm.bench", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return json.dumps({"bench": args[0], "args": args, "error": f"timed out after {timeout:.0f} s"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines and (proc.returncode == 0 or '"error"' in lines[-1]):
        return lines[-1]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return json.dumps(
            {"bench": args[0], "args": args, "error": f"exit {proc.returncode}", "stderr": tail}
        )
    return lines[-1]


def _firing_budget(text: str) -> int | None:
    """``--max-firings``: a positive number of firings, or ``none`` for no limit."""
    if text.lower() in ("none", "null"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of firings, or none")
    return value


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``python -m attncomm.bench {trace,induction,all} ...``)."""
    parser = argparse.ArgumentParser(prog="python -m attncomm.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    trace = sub.add_parser("trace", help="load cold/warm, trace prompts of a task on gpt2-small-random")
    trace.add_argument("--prompts", type=int, default=8)
    trace.add_argument("--task", default="ioi")
    trace.add_argument("--progress", action="store_true")
    ind = sub.add_parser("induction", help="trace one induction prompt of --tokens tokens")
    ind.add_argument("--tokens", type=int, default=256)
    ind.add_argument("--max-memory-gb", type=float, default=None)
    ind.add_argument("--max-rss-gb", type=float, default=None, help="stop (error line) past this RSS")
    ind.add_argument(
        "--max-firings",
        type=_firing_budget,
        default=None,
        help="stop the prompt once its trace would pass N firings (default: none, no limit)",
    )
    e2e = sub.add_parser("e2e", help="python run.py stage=trace (8 IOI prompts) from start to exit, warm")
    e2e.add_argument("--runs", type=int, default=3)
    every = sub.add_parser("all", help="trace (IOI) and induction at 64/256/1024 tokens, a subprocess each")
    every.add_argument("--tokens", type=int, nargs="+", default=list(INDUCTION_TOKENS))
    every.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    every.add_argument("--max-rss-gb", type=float, default=None, help="stop a measurement past this RSS")
    every.add_argument(
        "--max-firings",
        type=_firing_budget,
        default=ALL_MAX_FIRINGS,
        help=f"firing budget of each induction prompt (default {ALL_MAX_FIRINGS}; none: no limit)",
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
    for p in (trace, ind, every):
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch intra-op threads (default 1: robust on a shared machine)",
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "all":
        common = ["--dtype", args.dtype, "--seed", str(args.seed), "--threads", str(args.threads)]
        sys.stdout.write(_subprocess_line(["trace", "--prompts", "8", *common], args.timeout) + "\n")
        sys.stdout.flush()
        sys.stdout.write(json.dumps(bench_e2e(timeout=args.timeout)) + "\n")
        sys.stdout.flush()
        guard = [] if args.max_rss_gb is None else ["--max-rss-gb", str(args.max_rss_gb)]
        guard += ["--max-firings", str(args.max_firings).lower()]
        for tokens in args.tokens:
            line = _subprocess_line(["induction", "--tokens", str(tokens), *common, *guard], args.timeout)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return 0
    if args.command == "e2e":
        sys.stdout.write(json.dumps(bench_e2e(args.runs)) + "\n")
        return 0
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "act_patch":
        return _run_act_patch(args)
    if args.command in ("eap", "evaluate"):
        result = bench_edges(
            args.command, args.prompts, args.task, DTYPES[args.dtype], args.batch_size, args.seed
        )
    elif args.command == "trace":
        result = bench_trace(
            args.prompts, args.task, DTYPES[args.dtype], seed=args.seed, progress=args.progress
        )
    else:
        result = bench_induction(
            args.tokens,
            DTYPES[args.dtype],
            seed=args.seed,
            max_memory_gb=args.max_memory_gb,
            max_rss_gb=args.max_rss_gb,
            max_firings=args.max_firings,
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
    return 0 if result["agrees_with_tl"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
