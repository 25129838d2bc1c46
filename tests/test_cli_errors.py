"""Bad inputs met on the command line end in one ``error:`` line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import networkx as nx
import pytest

from attncomm.io.graphml import write_graph
from attncomm.io.results import PromptRecord, write_part, write_results
from attncomm.runtime.config import package_path
from tests.conftest import REPO_ROOT

Setup = Callable[[Path], list[str]]


def _results_file(content: bytes) -> Setup:
    def setup(tmp: Path) -> list[str]:
        run_dir = tmp / "run"
        (run_dir / "tracing_results").mkdir(parents=True)
        (run_dir / "tracing_results" / "toy-ioi_ioi_n4_0.h5").write_bytes(content)
        return ["stage=sparsity", "task.n_prompts=4", f"paths.run_dir={run_dir}"]

    return setup


def _truncated_part(tmp: Path) -> list[str]:
    results = tmp / "run" / "tracing_results"
    for p in range(18):
        path = write_part(results, PromptRecord(p, "incorrect", 0, {}))
    data = path.read_bytes()  # parts/17.h5
    path.write_bytes(data[: len(data) // 2])
    return ["stage=trace_merge", "task.n_prompts=18", f"paths.run_dir={tmp / 'run'}"]


def _damaged_checkpoint(truncate: bool) -> Setup:
    def setup(tmp: Path) -> list[str]:
        model = tmp / "model"
        shutil.copytree(package_path("toys/toy-ioi"), model)
        weights = model / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if truncate else os.urandom(4096))
        return ["stage=describe", f"model.path={model}"]

    return setup


def _args(*args: str) -> Setup:
    return lambda tmp: list(args)


def _traced_parts(n_done: int, n_prompts: int, stage: str, *more: str) -> Setup:
    """A run directory whose trace (recorded with the default settings) has ``n_done`` prompts done."""

    def setup(tmp: Path) -> list[str]:
        from attncomm.io.provenance import trace_key, write_key
        from tests.conftest import compose_app

        run_dir = tmp / "run"
        results = run_dir / "tracing_results"
        for p in range(n_done):
            write_part(results, PromptRecord(p, "incorrect", 0, {}))
        write_key(results, trace_key(compose_app([f"task.n_prompts={n_prompts}"])))
        return [f"stage={stage}", f"task.n_prompts={n_prompts}", f"paths.run_dir={run_dir}", *more]

    return setup


def _empty_results(tmp: Path) -> list[str]:
    run_dir = tmp / "run"
    records = [PromptRecord(0, "incorrect", 0, {}), PromptRecord(1, "no_head_seed", 0, {})]
    write_results(run_dir / "tracing_results" / "toy-ioi_ioi_n2_0.h5", records)
    return ["stage=sparsity", "task.n_prompts=2", f"paths.run_dir={run_dir}"]


def _graph_with_huge_layer(tmp: Path) -> list[str]:
    run_dir = tmp / "run"
    G = nx.MultiDiGraph()
    G.add_edge((10**900, 0, "end", "S1"), ("IO - S", "end"), key=0, weight=1.0, type="d", logit_diff=[0.5])
    write_graph(G, run_dir / "interventions_graph_toy-ioi_ioi_n4_0_combined_0.01.graphml")
    return ["stage=prune", "task.n_prompts=4", f"paths.run_dir={run_dir}"]


def _pruned_at(*thresholds: float) -> Setup:
    def setup(tmp: Path) -> list[str]:
        run_dir = tmp / "run"
        G = nx.MultiDiGraph()
        G.add_edge((0, 0, "end", "end"), ("root", "end"), weight=1.0, type="d")
        for th in thresholds:
            write_graph(G, run_dir / "pruned_graphs" / f"toy-ioi_ioi_n4_{th}.graphml")
        return ["stage=compare", "task.n_prompts=4", "compare.threshold=0.3", f"paths.run_dir={run_dir}"]

    return setup


HUGE = "9" * 900


#: id -> (setup giving the overrides, extra environment, what the message must say)
PROBES: dict[str, tuple[Setup, dict[str, str], str]] = {
    "unify-threshold-2": (_args("stage=unify", "unify.thresholds=[2.0]"), {}, "unify.thresholds"),
    "prune-step-0": (_args("stage=prune", "prune.step=0"), {}, "prune.step=0"),
    "prune-step-negative": (_args("stage=prune", "prune.step=-0.05"), {}, "prune.step=-0.05"),
    "prune-step-7": (_args("stage=prune", "prune.step=7"), {}, "prune.step=7"),
    "no-model": (_args("stage=describe", "~model"), {}, "model.name"),
    "no-task": (_args("stage=describe", "~task"), {}, "task.name"),
    "results-0-bytes": (_results_file(b""), {}, "toy-ioi_ioi_n4_0.h5"),
    "results-random-bytes": (_results_file(os.urandom(2048)), {}, "toy-ioi_ioi_n4_0.h5"),
    "truncated-part-17": (_truncated_part, {}, "parts/17.h5"),
    "garbage-safetensors": (_damaged_checkpoint(truncate=False), {}, "model.path"),
    "truncated-safetensors": (_damaged_checkpoint(truncate=True), {}, "model.path"),
    "gp-101-prompts": (
        _args("stage=describe", "model=tiny-gpt2", "task=gp", "task.n_prompts=101"),
        {},
        "n <= 100",
    ),
    "seq-len-beyond-context": (
        _args("stage=describe", "model=toy-induction", "task=induction", "task.options.seq_len=200"),
        {},
        "n_ctx=64",
    ),
    "bogus-prompt-type": (_args("stage=describe", "task.prompt_type=bogus"), {}, "task.prompt_type"),
    "unknown-task-option": (_args("stage=describe", "+task.options.foo=1"), {}, "task.options"),
    "bogus-wandb-mode": (
        _args("stage=describe", "logger.mode=offline"),
        {"WANDB_MODE": "bogus"},
        "WANDB_MODE",
    ),
    # the numbered items, met on the command line
    "trace-setting-changed": (
        _traced_parts(1, 4, "trace", "trace.with_tokens=true"),
        {},
        "trace.with_tokens: false -> true",
    ),
    "unify-on-unfinished-trace": (_traced_parts(2, 4, "unify"), {}, "2 of 4 prompts"),
    "sparsity-on-empty-results": (_empty_results, {}, "hold no firings"),
    "tokenizer-cannot-express-task": (
        _args("stage=trace", "model=toy-induction", "task=ioi", "task.n_prompts=2"),
        {},
        "task 'ioi'",
    ),
    # range checks and bounded node ids
    "upstream-fraction-0": (_args("stage=trace", "trace.upstream_fraction=0"), {}, "trace.upstream_fraction"),
    "max-firings-0": (_args("stage=trace", "trace.max_firings=0"), {}, "trace.max_firings=0"),
    "max-firings-negative": (_args("stage=trace", "trace.max_firings=-10"), {}, "trace.max_firings=-10"),
    "compare-threshold-not-produced": (_pruned_at(0.2, 0.5), {}, "valid values are 0.2, 0.5"),
    "node-id-900-digit-layer-in-edges": (
        _args(
            "stage=experiments",
            f"""experiments.edges=[["({HUGE}, 0, 'end', 'S1')","(1, 0, 'end', 'IO')",""]]""",
        ),
        {},
        "layer",
    ),
    "node-id-900-digit-layer-in-graphml": (_graph_with_huge_layer, {}, "layer"),
    "hub-model-offline-without-weights": (
        _args("stage=describe", "model=gpt2-small"),
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "/nonexistent/hf-cache"},
        "model.path",
    ),
    "online-without-key": (
        _args("stage=describe", "logger.mode=online"),
        {"WANDB_API_KEY": "", "NETRC": "/nonexistent/netrc"},
        "logger.mode=offline",
    ),
}


@pytest.mark.cli
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_bad_input_is_one_error_line_and_exit_2(tmp_path: Path, probe: str) -> None:
    setup, extra_env, says = PROBES[probe]
    env = dict(os.environ, **extra_env)
    env.setdefault("ATTNCOMM_CACHE", str(tmp_path / "cache"))
    env.pop("HYDRA_FULL_ERROR", None)
    args = [*setup(tmp_path), f"paths.root={tmp_path / 'out'}"]
    if not any(a.startswith("logger.mode") for a in args):
        args.append("logger.mode=disabled")
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert says in errors[0], errors[0]


@pytest.mark.cli
@pytest.mark.parametrize("switch", ["env", "-v"])
def test_verbose_shows_the_traceback(tmp_path: Path, switch: str) -> None:
    """``HYDRA_FULL_ERROR=1`` or ``-v`` shows the traceback behind the one-line error."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    if switch == "env":
        env["HYDRA_FULL_ERROR"] = "1"
    env.setdefault("ATTNCOMM_CACHE", str(tmp_path / "cache"))
    args = ["stage=prune", "prune.step=7", "logger.mode=disabled", f"paths.root={tmp_path / 'out'}"]
    if switch == "-v":
        args.insert(0, "-v")
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "prune.step=7" in out.stderr, out.stderr[-3000:]
