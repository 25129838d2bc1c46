"""The ``interventions`` stage end to end on tiny-gpt2: trace -> unify -> interventions."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from attncomm.core.node_ids import is_root
from attncomm.errors import MissingArtifactError
from attncomm.io.graphml import read_graph
from attncomm.runtime.config import AppConfig, TaskConfig
from attncomm.runtime.registry import RunContext, get_stage
from tests.models_fixtures import test_cache_dir, tiny_model_config

#: tiny-gpt2 traces 3 of the first 6 greater-than prompts (no positive total or no head seed in the others)
N_PROMPTS = 6


def _cfg() -> AppConfig:
    cfg = AppConfig(
        model=tiny_model_config("tiny-gpt2"), task=TaskConfig(name="gt", n_prompts=N_PROMPTS, seed=0)
    )
    cfg.paths.cache_dir = str(test_cache_dir())
    cfg.trace.skip_incorrect = False  # a random model gets the task wrong
    cfg.interventions.batch_size = 8
    return cfg


def test_registered() -> None:
    spec = get_stage("interventions")
    assert spec.needs_model
    assert spec.consumes == ("combined_graphs", "tracing_results")
    assert spec.produces == ("interventions_graph",)


def test_missing_inputs_name_their_producers(tmp_path: Path) -> None:
    from attncomm.stages.interventions import run_interventions

    cfg = _cfg()
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    with pytest.raises(MissingArtifactError, match="'unify' stage"):
        run_interventions(cfg, ctx)
    ctx.artifacts.combined_graph(0.01).parent.mkdir(parents=True)
    ctx.artifacts.combined_graph(0.01).write_text("<graphml/>")
    with pytest.raises(MissingArtifactError, match="'trace' stage"):
        run_interventions(cfg, ctx)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("attncomm.methods.acc_tracing") is None
    or importlib.util.find_spec("attncomm.stages.trace") is None,
    reason="attncomm.methods.acc_tracing / attncomm.stages.trace (the trace stage) is not available yet",
)
def test_trace_unify_interventions(tmp_path: Path) -> None:
    from attncomm.stages.interventions import run_interventions
    from attncomm.stages.trace import run_trace
    from attncomm.stages.unify import run_unify

    cfg = _cfg()
    run_dir = tmp_path / "run"
    run_trace(cfg, RunContext.for_tests(cfg, run_dir))
    run_unify(cfg, RunContext.for_tests(cfg, run_dir))
    ctx = RunContext.for_tests(cfg, run_dir)
    metrics = run_interventions(cfg, ctx)

    combined = read_graph(ctx.artifacts.combined_graph(0.01))
    G = read_graph(ctx.artifacts.interventions_graph(0.01))
    assert sorted(map(repr, G.edges(keys=True))) == sorted(map(repr, combined.edges(keys=True)))
    n_edges = n_sites = 0
    for u, v, k, data in G.edges(keys=True, data=True):
        for name, value in combined.edges[u, v, k].items():
            assert data[name] == value
        if is_root(v):
            assert "logit_diff" not in data
            continue
        n_edges += 1
        n_sites += len(data["prompts_appeared"])
        assert data["upstream_node"] == repr(u) and data["downstream_node"] == repr(v)
        assert len(data["logit_diff"]) == len(data["prompts_appeared"])
        assert all(math.isfinite(x) for x in data["logit_diff"])
    assert n_edges > 0
    assert metrics["interventions/edges"] == n_edges and metrics["interventions/sites"] == n_sites
    assert any(abs(x) > 1e-6 for _, v, ld in G.edges(data="logit_diff") if ld for x in ld)
    manifest = ctx.artifacts.manifest.read_text()
    assert "interventions" in manifest and ctx.artifacts.interventions_graph(0.01).name in manifest
