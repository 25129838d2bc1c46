"""The pipeline stage: stages in order, skipped when up to date, rerun (with everything after) on change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from attncomm.errors import ConfigError
from attncomm.runtime.config import AppConfig, ModelConfig, PipelineConfig, TaskConfig
from attncomm.runtime.registry import RunContext
from attncomm.stages.pipeline import run_pipeline

INTERVENTIONS = "interventions_graph_gpt2-small_gp_n100_0_combined_0.01.graphml"


def gp_config(stages: list[str]) -> AppConfig:
    return AppConfig(
        model=ModelConfig(name="gpt2-small", short_name="gpt2-small", family="gpt2", n_min={"gp": 15}),
        task=TaskConfig(name="gp", n_prompts=100, seed=0),
        pipeline=PipelineConfig(stages=stages),
    )


@pytest.mark.slow
def test_pipeline_runs_skips_and_reruns(published_gp_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(published_gp_dir / "traced_graphs", run_dir / "traced_graphs")
    shutil.copy(published_gp_dir / INTERVENTIONS, run_dir / INTERVENTIONS)
    cfg = gp_config(["unify", "prune", "compare"])
    first = run_pipeline(cfg, RunContext.for_tests(cfg, run_dir))
    assert not any(k.endswith("/skipped") for k in first)
    csv = run_dir / "circuit_comparison" / "gpt2-small_gp_0.2.csv"
    published = (published_gp_dir / "gpt2-small_gp_0.2.csv").read_text()
    assert csv.read_text() == published
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"unify", "prune", "compare"} <= set(manifest["stages"])

    again = run_pipeline(cfg, RunContext.for_tests(cfg, run_dir))
    assert again == {"unify/skipped": True, "prune/skipped": True, "compare/skipped": True}

    cfg.prune.n_min = 16  # a changed parameter reruns prune, and compare after it, not unify
    third = run_pipeline(cfg, RunContext.for_tests(cfg, run_dir))
    assert third.get("unify/skipped") is True
    assert "prune/skipped" not in third and "compare/skipped" not in third

    (run_dir / "combined_graphs" / "gpt2-small_gp_n100_combined_0.5.graphml").unlink()
    fourth = run_pipeline(cfg, RunContext.for_tests(cfg, run_dir))  # a lost file reruns its stage
    assert "unify/skipped" not in fourth
    assert (run_dir / "combined_graphs" / "gpt2-small_gp_n100_combined_0.5.graphml").is_file()


def test_pipeline_rejects_bad_stage_lists(tmp_path: Path) -> None:
    for stages, match in [([], "empty"), (["pipeline"], "cannot contain"), (["nope"], "unknown stage")]:
        cfg = gp_config(stages)
        with pytest.raises(Exception, match=match) as err:
            run_pipeline(cfg, RunContext.for_tests(cfg, tmp_path))
        assert isinstance(err.value, ConfigError) or "unknown stage" in str(err.value)


def test_pipeline_orders_stages_by_declared_inputs() -> None:
    from attncomm.runtime.registry import pipeline_order

    listed = ["export", "compare", "prune", "unify", "trace", "interventions"]
    order = [s.name for s in pipeline_order(listed)]
    assert order == ["trace", "unify", "interventions", "prune", "export", "compare"]  # ties: as listed
    # a stage that rebuilds its input runs after its producer and before the consumers
    order = [s.name for s in pipeline_order(["interventions", "trace_merge", "trace"])]
    assert order == ["trace", "trace_merge", "interventions"]
    # unrelated stages keep the order given
    assert [s.name for s in pipeline_order(["sparsity", "describe"])] == ["sparsity", "describe"]


def test_pipeline_refuses_inputs_nobody_makes(tmp_path: Path) -> None:
    cfg = gp_config(["compare", "prune"])  # prune needs the intervention graph: not here, not listed
    expected = r"prune needs interventions_graph, made by the 'interventions' stage"
    with pytest.raises(ConfigError, match=expected):
        run_pipeline(cfg, RunContext.for_tests(cfg, tmp_path))
    assert not (tmp_path / "manifest.json").exists()  # refused before running anything


def test_producers_are_derived_from_the_declarations() -> None:
    from attncomm.runtime.registry import producers

    prod = producers()
    assert prod["traced_graphs"] == "trace" and prod["tracing_results"] == "trace"  # not trace_merge
    assert prod["combined_graphs"] == "unify" and prod["pruned_graphs"] == "prune"
    assert prod["interventions_graph"] == "interventions"
