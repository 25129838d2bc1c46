"""Every stage logs its metrics, tables and figures to wandb: checked by reading the offline runs back.

One toy-ioi pipeline job (trace .. compare, sparsity, export), then an experiments job and a
control-signals job, all through ``run_job`` with the default offline logger.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attncomm.core.node_ids import format_node_id, is_root
from attncomm.io.graphml import read_graph
from attncomm.runtime.config import AppConfig, register_configs
from attncomm.runtime.registry import run_job
from attncomm.runtime.tracking import OfflineRun, find_offline_runs, read_offline_run
from tests.conftest import REPO_ROOT

#: every test here runs whole stages with wandb logging
pytestmark = pytest.mark.slow


def app(overrides: list[str]) -> AppConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    assert isinstance(cfg, AppConfig)
    return cfg


def logged(run: OfflineRun) -> dict[str, str]:
    """Every logged key -> its wandb type ('number', 'table-file', 'image-file', 'html-file')."""
    kinds: dict[str, str] = {}
    for row in run.history:
        for key, value in row.items():
            if key.startswith("_") or "/" not in key:
                continue
            if key.endswith("/_type"):
                kinds[key[: -len("/_type")]] = value
            elif isinstance(value, int | float) and not isinstance(value, bool):
                kinds.setdefault(key, "number")
    return kinds


def kinds_of(keys: dict[str, str], prefix: str) -> set[str]:
    return {kind for key, kind in keys.items() if key.startswith(prefix + "/")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OfflineRun]:
    root = tmp_path_factory.mktemp("logging")
    base = [f"paths.root={root}", "task.n_prompts=24", "name=logging-test"]
    run_job(app(base))  # the default job: the pipeline on toy-ioi
    G = read_graph(
        root / "toy-ioi" / "ioi" / "n24_seed0" / "combined_graphs" / "toy-ioi_ioi_n24_combined_0.7.graphml"
    )
    u, v = next((u, v) for u, v in G.edges() if not is_root(u) and not is_root(v))
    edge = f'experiments.edges=[["{format_node_id(u)}","{format_node_id(v)}","an edge of the 0.7 graph"]]'
    run_job(app([*base, "stage=experiments", edge]))
    run_job(app([*base, "stage=control_signals", "control_signals.prompts=[1,2]"]))
    found = {}
    for path in find_offline_runs(root):
        run = read_offline_run(path)
        found[run.job_type] = run
    return found


@pytest.mark.slow
def test_each_job_is_one_grouped_offline_run(runs: dict[str, OfflineRun]) -> None:
    assert set(runs) == {"pipeline", "experiments", "control_signals"}
    for run in runs.values():
        assert run.group == "logging-test" and run.config["model"]["name"] == "toy-ioi"


def test_pipeline_stages_log_metrics_tables_figures(runs: dict[str, OfflineRun]) -> None:
    keys = logged(runs["pipeline"])
    for stage in ["trace", "unify", "interventions", "prune", "compare", "sparsity", "export"]:
        assert "number" in kinds_of(keys, stage), f"{stage} logged no metric"
    for stage in ["compare", "sparsity"]:
        assert {"table-file", "image-file"} <= kinds_of(keys, stage), f"{stage}: {kinds_of(keys, stage)}"
    assert "html-file" in kinds_of(keys, "export")
    summary = runs["pipeline"].summary
    assert 0.0 <= summary["compare/precision"] <= 1.0 and summary["trace/prompts"] == 24


@pytest.mark.parametrize("stage", ["experiments", "control_signals"])
def test_analysis_stages_log_metrics_tables_figures(runs: dict[str, OfflineRun], stage: str) -> None:
    kinds = kinds_of(logged(runs[stage]), stage)
    assert {"number", "table-file", "image-file"} <= kinds, kinds
