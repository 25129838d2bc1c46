"""Benchmarks on the random ``gpt2-small-random`` test model (built once into ``$ATTNCOMM_CACHE``).

``python -m attncomm.bench all`` (``make bench``) prints one JSON line per measurement:

* ``trace`` -- the 8 IOI prompts: firings/s, Omega SVD seconds, model load seconds cold (weights
  processed by TransformerLens) and warm (served from the processed-weight cache), the import time of
  the TransformerLens bridge (paid once per process, not part of either load), peak RSS;
* ``induction`` -- one induction prompt of each of 64, 256 and 1024 tokens, each measured in its own
  subprocess so that ``peak_rss_mb`` is that measurement's alone: ``tokens_per_prompt``, ``firings``,
  ``seconds`` (tracing of that prompt, forward pass included), ``firings_per_s``, ``peak_rss_mb``
  (the whole subprocess: model load included) and ``rss_after_load_mb``.

Single measurements: ``python -m attncomm.bench trace --prompts 8`` and
``python -m attncomm.bench induction --tokens 256``. Tracing runs with ``skip_incorrect=False``; an
induction prompt that is skipped (non-positive seed total) is replaced by the next one of the same
length (``prompt_index`` says which was measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from attncomm.config import ModelConfig
from attncomm.models import ModelAdapter, load_model
from attncomm.tasks import get_task
from attncomm.tracer import build_omega_cache, trace_prompts

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
INDUCTION_TOKENS = (64, 256, 1024)


def _cache_dir() -> Path:
    """``$ATTNCOMM_CACHE`` or ``~/.cache/attncomm``."""
    return Path(os.environ.get("ATTNCOMM_CACHE", "~/.cache/attncomm")).expanduser()


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
    model = load_model(model_config(weight_cache), device="cpu", dtype=dtype, cache_dir=_cache_dir())
    return model, time.perf_counter() - t0


def bench_trace(
    n_prompts: int, task_name: str, dtype: torch.dtype, seed: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Load cold and warm, then trace ``n_prompts`` prompts of ``task_name`` and return the timings."""
    t0 = time.perf_counter()
    import transformer_lens.model_bridge  # noqa: F401  (the one-time import, not part of a load)

    import_s = time.perf_counter() - t0
    cfg = model_config()
    model_dir = _cache_dir() / "models" / cfg.short_name
    if not model_dir.is_dir():  # build the checkpoint first: building is not loading
        _load(dtype, weight_cache=False)
    _, cold_s = _load(dtype, weight_cache=False)  # TransformerLens processes the weights
    _load(dtype)  # make sure the processed-weight cache exists
    model, warm_s = _load(dtype)
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
        "load_seconds": round(warm_s, 3),
        "load_seconds_cold": round(cold_s, 3),
        "load_seconds_warm": round(warm_s, 3),
        "import_seconds": round(import_s, 3),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
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
) -> dict[str, Any]:
    """Trace one induction prompt of ``tokens`` tokens (BOS + a sequence twice; n_ctx caps it)."""
    if max_rss_gb is not None:
        _rss_guard(max_rss_gb, {"bench": "induction", "tokens": tokens})
    model, load_s = _load(dtype)
    rss_after_load = _rss_mb()
    n_ctx = model.arch.n_ctx
    seq_len = max(3, (min(tokens, n_ctx) - 1) // 2)
    task = get_task("induction", seq_len=seq_len)
    prompts = task.make_prompts(model.tokenizer, max_tries, seed=seed, prepend_bos=True)
    omega = build_omega_cache(model, dtype)
    omega.precompute()
    result: dict[str, Any] = {}
    for i in range(max_tries):
        t0 = time.perf_counter()
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
        )
        seconds = time.perf_counter() - t0
        result = {"prompt_index": i, "firings": trace.n_firings, "seconds": round(seconds, 3)}
        if trace.graph is not None:
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
        "torch_threads": torch.get_num_threads(),
    }


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
    every = sub.add_parser("all", help="trace (IOI) and induction at 64/256/1024 tokens, a subprocess each")
    every.add_argument("--tokens", type=int, nargs="+", default=list(INDUCTION_TOKENS))
    every.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    every.add_argument("--max-rss-gb", type=float, default=None, help="stop a measurement past this RSS")
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
        guard = [] if args.max_rss_gb is None else ["--max-rss-gb", str(args.max_rss_gb)]
        for tokens in args.tokens:
            line = _subprocess_line(["induction", "--tokens", str(tokens), *common, *guard], args.timeout)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return 0
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "trace":
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
        )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
