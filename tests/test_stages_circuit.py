"""The unify, prune and compare stages on a run directory holding only published gp artifacts."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from attncomm.core.node_ids import GraphFormatError, edge_table
from attncomm.errors import MissingArtifactError
from attncomm.io.graphml import read_graph
from attncomm.runtime.config import AppConfig, ModelConfig, TaskConfig
from attncomm.runtime.registry import RunContext, get_stage
from attncomm.stages.compare import run_compare
from attncomm.stages.prune import resolve_n_min, run_prune
from attncomm.stages.unify import run_unify

INTERVENTIONS = "interventions_graph_gpt2-small_gp_n100_0_combined_0.01.graphml"


def _cfg(**prune: object) -> AppConfig:
    cfg = AppConfig(
        model=ModelConfig(
            name="gpt2-small", short_name="gpt2-small", family="gpt2", n_min={"ioi": 30, "gp": 15}
        ),
        task=TaskConfig(name="gp", n_prompts=100, seed=0),
    )
    for key, value in prune.items():
        setattr(cfg.prune, key, value)
    return cfg


def test_registered() -> None:
    for name, consumes, produces in [
        ("unify", ("traced_graphs",), ("combined_graphs",)),
        ("prune", ("interventions_graph",), ("pruned_graphs",)),
        ("compare", ("pruned_graphs",), ("circuit_comparison",)),
    ]:
        spec = get_stage(name)
        assert spec.consumes == consumes and spec.produces == produces and not spec.needs_model


def test_resolve_n_min() -> None:
    assert resolve_n_min(_cfg()) == 15
    cfg = _cfg()
    cfg.task.name = "ioi"
    assert resolve_n_min(cfg) == 30
    cfg.task.name = "gt"
    assert resolve_n_min(cfg) == 15  # n_min_default
    assert resolve_n_min(_cfg(n_min=7)) == 7


@pytest.mark.slow
def test_unify_prune_compare_from_published(published_gp_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(published_gp_dir / "traced_graphs", run_dir / "traced_graphs")
    cfg = _cfg()
    ctx = RunContext.for_tests(cfg, run_dir)

    metrics = run_unify(cfg, ctx)
    assert metrics["unify/n_traced"] == 100
    published = sorted(p.name for p in (published_gp_dir / "combined_graphs").iterdir())
    assert sorted(p.name for p in (run_dir / "combined_graphs").iterdir()) == published
    for name in ("gpt2-small_gp_n100_combined_0.01.graphml", "gpt2-small_gp_n100_combined_0.7.graphml"):
        ours = edge_table(read_graph(run_dir / "combined_graphs" / name))
        pub = edge_table(read_graph(published_gp_dir / "combined_graphs" / name))
        assert ours.keys() == pub.keys()
        assert all(math.isclose(ours[k]["weight"], pub[k]["weight"], rel_tol=1e-9) for k in pub)
        assert all(ours[k]["prompts_appeared"] == pub[k]["prompts_appeared"] for k in pub)

    shutil.copy(published_gp_dir / INTERVENTIONS, run_dir / INTERVENTIONS)
    metrics = run_prune(cfg, ctx)
    assert metrics["prune/n_min"] == 15
    pruned = sorted((run_dir / "pruned_graphs").iterdir())
    assert len(pruned) == 21
    assert (run_dir / "pruned_graphs" / "gpt2-small_gp_n100_0.35.graphml").is_file()
    p02 = read_graph(run_dir / "pruned_graphs" / "gpt2-small_gp_n100_0.2.graphml")
    assert (p02.number_of_nodes(), p02.number_of_edges()) == (66, 70)
    assert (metrics["prune/nodes@0.2"], metrics["prune/edges@0.2"]) == (66, 70)

    metrics = run_compare(cfg, ctx)
    csv = run_dir / "circuit_comparison" / "gpt2-small_gp_0.2.csv"
    ours, pub = pd.read_csv(csv), pd.read_csv(published_gp_dir / "gpt2-small_gp_0.2.csv")
    assert ours.drop(columns="Value").equals(pub.drop(columns="Value"))
    assert (ours["Value"] - pub["Value"]).abs().max() <= 1e-12
    assert round(metrics["compare/precision"], 4) == 0.4138 and metrics["compare/recall"] == 0.75
    assert round(metrics["compare/f1"], 4) == 0.5333 and metrics["compare/reference"] == "ACDC"
    figures = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert "circuit_comparison_gpt2-small_gp_0.2.png" in figures
    assert "circuit_comparison_gpt2-small_gp_by_threshold.pdf" in figures

    manifest = (run_dir / "manifest.json").read_text()
    assert all(f'"{stage}"' in manifest for stage in ("unify", "prune", "compare"))
    assert not list(run_dir.rglob(".*.tmp"))


@pytest.mark.parametrize(
    "stage, producer",
    [(run_unify, "trace"), (run_prune, "interventions"), (run_compare, "prune")],
)
def test_missing_upstream_artifact(tmp_path: Path, stage: object, producer: str) -> None:
    cfg = _cfg()
    ctx = RunContext.for_tests(cfg, tmp_path / "empty")
    with pytest.raises(MissingArtifactError) as err:
        stage(cfg, ctx)  # type: ignore[operator]
    assert err.value.producer == producer and f"stage={producer}" in str(err.value)


def test_unify_ignores_other_runs_files(published_gp_dir: Path, tmp_path: Path) -> None:
    """Traced graphs of another N or seed in the same folder are not the run's; none -> missing."""
    folder = tmp_path / "run" / "traced_graphs"
    folder.mkdir(parents=True)
    shutil.copy(
        published_gp_dir / "traced_graphs" / "gpt2-small_gp_n100_3_0.graphml",
        folder / "gpt2-small_gp_n100_3_1.graphml",
    )
    cfg = _cfg()
    with pytest.raises(MissingArtifactError, match="trace"):
        run_unify(cfg, RunContext.for_tests(cfg, tmp_path / "run"))


def test_prune_names_file_of_a_graph_without_logit_diff(published_gp_dir: Path, tmp_path: Path) -> None:
    """A combined graph put where the intervention graph belongs: the error names file, edge and attribute."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = run_dir / INTERVENTIONS
    shutil.copy(published_gp_dir / "combined_graphs" / "gpt2-small_gp_n100_combined_0.01.graphml", target)
    cfg = _cfg()
    with pytest.raises(GraphFormatError) as err:
        run_prune(cfg, RunContext.for_tests(cfg, run_dir))
    assert (
        str(target) in str(err.value)
        and "'logit_diff'" in str(err.value)
        and "<edge source=" in str(err.value)
    )
