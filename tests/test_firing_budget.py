"""The per-prompt firing budget (``trace.max_firings``): a prompt whose trace would have more firings is
skipped with status ``firing_budget`` and leaves nothing behind; at or above its count nothing changes.

* tracing (fast): below a prompt's firing count the prompt is skipped with no edges and no results,
  stopped before the layer that passes the budget (the firings handed out before the stop are exactly
  those of the layers above it in the unbudgeted trace), and its spool file is gone; at the count the
  results and graphs equal the unbudgeted ones;
* settings (fast): 0, negative, fractional or boolean budgets are config errors; the budget is in the
  trace's provenance key and gives the run its own directory;
* ``stage=trace`` (slow): the skipped prompt's part file has the new status, no firings, no graph, one
  warning names it; with a budget at the largest count every file is byte for byte the unbudgeted one.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import h5py
import pytest
import torch

from attncomm.bench import _firing_budget
from attncomm.core.prompt_graph import FIRING_BUDGET, FiringResult, trace_prompt
from attncomm.errors import ConfigError
from attncomm.io.firing_spool import FiringSpool
from attncomm.io.provenance import StaleArtifactError, differences, trace_key
from attncomm.io.results import STATUSES, TracingResults, part_path
from attncomm.methods import acc_tracing
from attncomm.methods.acc_tracing import _prompt_tensors, build_omega_cache, needed_hooks, trace_prompts
from attncomm.runtime.registry import RunContext
from attncomm.runtime.validation import validate_config
from attncomm.stages.trace import run_trace
from attncomm.tasks import get_task
from tests.models_fixtures import load_tiny
from tests.test_stage_trace import config

BUILDER = "tiny-pythia"
N = 4


def _traces(max_firings: int | None = None, spool_dir: Path | None = None) -> list:
    model = load_tiny(BUILDER)
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, N, seed=0, prepend_bos=False)
    return list(
        trace_prompts(
            model,
            task,
            prompts,
            skip_incorrect=False,
            progress=False,
            spool_dir=spool_dir,
            max_firings=max_firings,
        )
    )


def _layers_of(trace) -> list[int]:
    """How many firings the unbudgeted trace has per layer (its keys are ``(prompt, l, h, d, s)``)."""
    counts = [0] * (1 + max(k[1] for k in trace.results))
    for key in trace.results:
        counts[key[1]] += 1
    return counts


@pytest.fixture(scope="module")
def unbudgeted() -> list:
    traces = _traces()
    assert any(t.n_firings > 1 and len({k[1] for k in t.results}) > 1 for t in traces), (
        "the test needs a prompt with firings in several layers; pick another seed"
    )
    return traces


def test_a_budget_below_the_count_skips_the_prompt_and_keeps_nothing(
    unbudgeted: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spools: list[FiringSpool] = []

    class Recorded(FiringSpool):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            spools.append(self)

    monkeypatch.setattr(acc_tracing, "FiringSpool", Recorded)
    big = max(unbudgeted, key=lambda t: t.n_firings)
    budget = big.n_firings - 1
    out = _traces(budget, spool_dir=tmp_path / "spool")
    assert len(spools) == len(out)  # one spool per prompt (none is skipped as incorrect here)
    for plain, t in zip(unbudgeted, out, strict=True):
        if plain.skip_reason is not None:
            assert t.skip_reason == plain.skip_reason and t.budget_stop is None
        elif plain.n_firings <= budget:  # within the budget: traced as before
            assert t.skip_reason is None and t.budget_stop is None
            assert list(t.results) == list(plain.results)
        else:
            assert t.skip_reason == FIRING_BUDGET
            assert t.edges is None and t.graph is None and t.n_firings == 0 and dict(t.results) == {}
            stop = t.budget_stop
            assert stop is not None and stop.budget == budget
            # stopped before the first layer (from the top) that takes the count past the budget
            per_layer = _layers_of(plain)
            above = sum(per_layer[stop.layer + 1 :])
            assert stop.traced == above <= budget < above + per_layer[stop.layer] == stop.reached
            assert stop.reached <= plain.n_firings
            assert spools[t.prompt_id]._file.closed  # the firings traced before the stop are deleted
    assert any(t.skip_reason == FIRING_BUDGET for t in out)


def test_tracing_stops_before_the_layer_that_passes_the_budget(unbudgeted: list) -> None:
    """``trace_prompt`` hands out no firing of the layer that passes the budget, nor of any below it."""
    big = max(unbudgeted, key=lambda t: t.n_firings)
    model = load_tiny(BUILDER)
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, N, seed=0, prepend_bos=False)
    row = big.prompt_id
    _, hooks = model.run_with_cache(prompts.tokens, needed_hooks(model))
    omega = build_omega_cache(model)
    w = task.direction(model.weights.W_U, prompts)[row]
    pt = _prompt_tensors(
        model, hooks, row, int(prompts.end[row]), w, prompts.labels[row], omega, torch.float32
    )
    seen: list[tuple[int, ...]] = []

    def sink(key: tuple[int, ...], _: FiringResult) -> None:
        seen.append(key)

    res = trace_prompt(pt, omega, direction_name=task.direction_name, sink=sink, max_firings=1)
    assert res.skip_reason == FIRING_BUDGET and res.edges is None and res.results == {}
    assert res.budget_stop is not None and len(seen) == res.budget_stop.traced <= 1
    assert all(key[0] > res.budget_stop.layer for key in seen)
    full = trace_prompt(pt, omega, direction_name=task.direction_name, max_firings=big.n_firings)
    assert full.skip_reason is None and full.n_firings == big.n_firings
    with pytest.raises(ValueError, match="max_firings"):
        trace_prompt(pt, omega, direction_name=task.direction_name, max_firings=0)


def test_a_budget_at_the_count_changes_nothing(unbudgeted: list) -> None:
    out = _traces(max(t.n_firings for t in unbudgeted))
    for plain, t in zip(unbudgeted, out, strict=True):
        assert t.skip_reason == plain.skip_reason and t.budget_stop is None
        assert list(t.results) == list(plain.results)
        for key, r in plain.results.items():
            assert torch.equal(r.contrib_dest, t.results[key].contrib_dest)
            assert torch.equal(r.contrib_src, t.results[key].contrib_src)
        if plain.graph is not None:
            assert list(plain.graph.edges(keys=True, data=True)) == list(t.graph.edges(keys=True, data=True))


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "1000"])
def test_a_budget_that_is_not_a_positive_count_is_a_config_error(value: object) -> None:
    cfg = config(BUILDER, N)
    cfg.trace.max_firings = value  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"trace\.max_firings"):
        validate_config(cfg)


def test_the_budget_is_in_the_trace_key_and_names_the_run_directory(tmp_path: Path) -> None:
    assert "firing_budget" in STATUSES and STATUSES.index("firing_budget") == len(STATUSES) - 1
    plain, budgeted = config(BUILDER, N), config(BUILDER, N, max_firings=50)
    validate_config(budgeted)
    assert differences(trace_key(plain), trace_key(budgeted)) == ["trace.max_firings: null -> 50"]
    plain.paths.root = budgeted.paths.root = str(tmp_path)
    assert RunContext.from_config(plain).run_dir != RunContext.from_config(budgeted).run_dir


def test_the_benchmark_budget_option_takes_a_positive_count_or_none() -> None:
    assert _firing_budget("none") is None and _firing_budget("5000") == 5000
    for bad in ("0", "-3", "many", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number of firings"):
            _firing_budget(bad)


# ----------------------------------------------------------------------------- stage=trace


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every traced graph and tracing-result file of a run directory, by relative path."""
    paths = [*run_dir.glob("traced_graphs/*.graphml"), *run_dir.glob("tracing_results/**/*.h5")]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(paths)}


@pytest.mark.slow
def test_stage_trace_records_the_budget_skip_and_is_unchanged_at_the_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = config(BUILDER, N)
    plain_ctx = RunContext.for_tests(base, tmp_path / "plain")
    run_trace(base, plain_ctx)
    table = TracingResults(plain_ctx.artifacts.tracing_results()).prompts()
    counts = {p: n for p, (status, n) in table.items() if status == "traced"}
    top = max(counts.values())
    assert top > 1

    at = config(BUILDER, N, max_firings=top)
    run_trace(at, RunContext.for_tests(at, tmp_path / "at"))
    assert _files(tmp_path / "at") == _files(tmp_path / "plain")  # byte for byte

    below = config(BUILDER, N, max_firings=top - 1)
    with pytest.raises(StaleArtifactError, match=r"trace\.max_firings: null -> "):
        run_trace(below, RunContext.for_tests(below, tmp_path / "plain"))  # parts made without a budget
    ctx = RunContext.for_tests(below, tmp_path / "below")
    with caplog.at_level(logging.WARNING, logger="attncomm.stages.trace"):
        summary = run_trace(below, ctx)
    over = sorted(p for p, n in counts.items() if n > top - 1)
    assert summary["skipped_firing_budget"] == len(over) and summary["prompts_traced"] == len(counts) - len(
        over
    )
    art = ctx.artifacts
    results = TracingResults(art.tracing_results())
    for p in range(N):
        status, n = results.prompts()[p]
        if p in over:
            assert (status, n) == ("firing_budget", 0)
            assert not art.traced_graph(p).exists() and results.firings(p) == {}
            with h5py.File(part_path(art.tracing_results_dir, p)) as f:
                assert f.attrs["status"] == "firing_budget" and list(f.keys()) == []
            warned = [r.getMessage() for r in caplog.records if f"prompt {p} skipped" in r.getMessage()]
            assert len(warned) == 1 and "trace.max_firings" in warned[0] and "null" in warned[0]
        else:  # the other prompts' files are the unbudgeted ones
            plain_art = plain_ctx.artifacts
            assert (status, n) == table[p]
            part = part_path(art.tracing_results_dir, p)
            assert part.read_bytes() == part_path(plain_art.tracing_results_dir, p).read_bytes()
            if status == "traced":
                assert art.traced_graph(p).read_bytes() == plain_art.traced_graph(p).read_bytes()
    assert sorted(x.name for x in (art.tracing_results_dir / "parts").iterdir()) == [
        f"{p}.h5" for p in range(N)
    ]
