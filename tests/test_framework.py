"""The framework: config composition, artifact names, atomic writes, registry, wandb offline logging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from attncomm.errors import ConfigError, MissingArtifactError
from attncomm.io.artifacts import RunArtifacts, atomic_path, format_threshold, run_dir_for
from attncomm.runtime.config import LoggerConfig
from attncomm.runtime.registry import RunContext, get_stage, load_stages, producers
from attncomm.runtime.tracking import Tracker, find_offline_runs, read_offline_run
from tests.conftest import REPO_ROOT, compose_app

MODELS = [
    "toy-ioi",
    "toy-induction",
    "gpt2-small",
    "pythia-160m",
    "pythia-160m-deduped",
    "gemma-2-2b",
    "tiny-gpt2",
    "tiny-pythia",
    "tiny-gemma2",
    "gpt2-small-random",
]


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes(model: str) -> None:
    app = compose_app([f"model={model}", "task=ioi"])
    assert app.model.name == model
    assert app.model.family in {"gpt2", "neox", "gemma2", "toy"}
    assert app.model.hf_name or app.model.builder or app.model.path


def test_published_settings_in_configs() -> None:
    assert compose_app(["model=gemma-2-2b"]).model.prepend_bos is True
    assert compose_app(["model=gpt2-small"]).model.prepend_bos is False
    assert compose_app(["model=gpt2-small"]).model.n_min == {"ioi": 30, "gt": 15, "gp": 15}
    assert compose_app(["task=gp"]).task.n_prompts == 100
    app = compose_app(["task=ioi", "trace.skip_incorrect=false", "prune.n_min=15", "stage=describe"])
    assert app.trace.skip_incorrect is False and app.prune.n_min == 15


def test_bad_override_types_are_rejected() -> None:
    with pytest.raises(Exception, match="n_prompts"):
        compose_app(["task.n_prompts=abc"])


def test_artifact_names_are_the_published_ones(tmp_path: Path) -> None:
    art = RunArtifacts(tmp_path, "gpt2-small", "gp", 100, 0)
    assert art.traced_graph(40).name == "gpt2-small_gp_n100_40_0.graphml"
    assert art.combined_graph(0.0).name == "gpt2-small_gp_n100_combined_0.0.graphml"
    assert art.combined_graph(0.30000000000000004).name == "gpt2-small_gp_n100_combined_0.3.graphml"
    assert art.interventions_graph().name == "interventions_graph_gpt2-small_gp_n100_0_combined_0.01.graphml"
    assert art.pruned_graph(0.2).name == "gpt2-small_gp_n100_0.2.graphml"
    assert art.comparison_csv(0.2).name == "gpt2-small_gp_0.2.csv"
    assert art.intervention_data.name == "gpt2-small_gp.parquet"
    assert [format_threshold(x) for x in (0.0, 0.05, 0.35000000000000003, 1.0)] == [
        "0.0",
        "0.05",
        "0.35",
        "1.0",
    ]


@pytest.mark.slow
def test_run_dir_gets_a_suffix_only_for_non_default_method_parameters(tmp_path: Path) -> None:
    plain = run_dir_for(tmp_path, "gpt2-small", "ioi", 8, 0, {})
    assert plain == tmp_path / "gpt2-small" / "ioi" / "n8_seed0"
    a = run_dir_for(tmp_path, "gpt2-small", "ioi", 8, 0, {"trace.with_tokens": True})
    b = run_dir_for(tmp_path, "gpt2-small", "ioi", 8, 0, {"device.dtype": "float64"})
    assert a != b and a.name.startswith("n8_seed0_") and len(a.name) == len("n8_seed0_") + 8
    ctx = RunContext.from_config(
        compose_app(
            [f"paths.root={tmp_path}", "model=gpt2-small", "trace.with_tokens=true", "task.n_prompts=8"]
        )
    )
    assert ctx.run_dir == a


@pytest.mark.slow
def test_prune_n_min_variants_never_overwrite_published_setting(tmp_path: Path) -> None:
    published = RunContext.from_config(
        compose_app([f"paths.root={tmp_path}", "model=gpt2-small", "task=ioi"])
    )
    same = RunContext.from_config(
        compose_app([f"paths.root={tmp_path}", "model=gpt2-small", "task=ioi", "prune.n_min=30"])
    )
    other = RunContext.from_config(
        compose_app([f"paths.root={tmp_path}", "model=gpt2-small", "task=ioi", "prune.n_min=20"])
    )
    assert published.artifacts.pruned_graph(0.2) == same.artifacts.pruned_graph(0.2)
    assert published.artifacts.pruned_graphs_dir.name == "pruned_graphs"
    assert other.artifacts.pruned_graphs_dir.name == "pruned_graphs_nmin20"
    assert other.artifacts.comparison_csv(0.2).parent.name == "circuit_comparison_nmin20"
    assert other.run_dir == published.run_dir  # same upstream artifacts (trace, unify, interventions)


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(target.parent.iterdir())) == 1


def test_missing_artifact_names_producer_and_command(tmp_path: Path) -> None:
    art = RunArtifacts(tmp_path, "gpt2-small", "gp", 100, 0, producers=producers())
    with pytest.raises(MissingArtifactError) as err:
        art.require(art.traced_graphs_dir, "traced_graphs")
    msg = str(err.value)
    assert "traced_graphs" in msg and "'trace' stage" in msg and "python run.py stage=trace" in msg


def test_registry_lists_valid_stages_for_unknown_name() -> None:
    stages = load_stages()
    assert "describe" in stages
    with pytest.raises(Exception, match="unknown stage 'nope'.*describe"):
        get_stage("nope")


def test_nonpositive_n_prompts_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="task.n_prompts=0 must be a positive"):
        RunContext.from_config(compose_app([f"paths.root={tmp_path}", "task.n_prompts=0"]))


def test_unknown_logger_mode_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="logger.mode"):
        Tracker(LoggerConfig(mode="sometimes"))


@pytest.mark.slow
def test_offline_tracker_round_trip(tmp_path: Path) -> None:
    tracker = Tracker(
        LoggerConfig(dir=str(tmp_path), group="grp"),
        name="r",
        job_type="unit",
        config={"model": {"name": "tiny-gpt2"}, "task": {"n_prompts": 3}},
    )
    tracker.log_metrics({"accuracy": 0.625})
    tracker.log_table("roles", pd.DataFrame({"position": [0, 1], "role": ["starts", "IO"]}))
    tracker.summary({"n_prompts": 3})
    tracker.finish()
    runs = find_offline_runs(tmp_path)
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.group == "grp" and run.job_type == "unit"
    assert run.config["model"] == {"name": "tiny-gpt2"} and run.config["task"] == {"n_prompts": 3}
    assert any(row.get("accuracy") == 0.625 for row in run.history)
    assert run.summary["n_prompts"] == 3 and run.summary["accuracy"] == 0.625


def run_cli(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ATTNCOMM_CACHE=os.environ.get("ATTNCOMM_CACHE", str(tmp_path / "cache")))
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.cli
def test_cli_help_and_cfg_job(tmp_path: Path) -> None:
    out = run_cli(["--help"], tmp_path)
    assert out.returncode == 0 and "model: " in out.stdout and "gpt2-small" in out.stdout
    out = run_cli(["--cfg", "job", "model=gpt2-small", "task=ioi"], tmp_path)
    assert out.returncode == 0
    assert "hf_name: openai-community/gpt2" in out.stdout and "name: ioi" in out.stdout


@pytest.mark.cli
@pytest.mark.parametrize(
    ("override", "listed"), [("model=nope", "gpt2-small"), ("task=nope", "ioi"), ("stage=nope", "describe")]
)
def test_cli_unknown_names_list_valid_ones(tmp_path: Path, override: str, listed: str) -> None:
    out = run_cli([override], tmp_path)
    assert out.returncode != 0
    assert "Could not find" in out.stderr and listed in out.stderr


@pytest.mark.cli
def test_cli_nonpositive_n_prompts_exits_2(tmp_path: Path) -> None:
    out = run_cli(["task.n_prompts=-1", f"paths.root={tmp_path}"], tmp_path)
    assert out.returncode == 2
    assert "task.n_prompts=-1 must be a positive number of prompts" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.cli
def test_cli_describe_logs_offline_run(tmp_path: Path) -> None:
    """The describe stage on a tiny model, with the offline logger; config and metrics read back."""
    out = run_cli(
        [
            "model=tiny-gpt2",
            "task=ioi",
            "task.n_prompts=4",
            "stage=describe",
            f"paths.root={tmp_path / 'out'}",
            "name=unit-test",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "example prompt 0" in out.stdout and "IO" in out.stdout
    runs = find_offline_runs(tmp_path / "out")
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.group == "unit-test" and run.job_type == "describe"
    assert run.config["model"]["name"] == "tiny-gpt2" and run.config["task"]["n_prompts"] == 4
    assert run.summary["n_prompts"] == 4
    assert run.summary["n_incorrect"] + round(run.summary["accuracy"] * 4) == 4
    assert json.dumps(run.summary)  # plain JSON values only


@pytest.mark.cli
def test_cli_missing_weights_offline_is_a_clear_error(tmp_path: Path) -> None:
    """An uncached hub model offline: the message names the model, where it looked and the fixes."""
    env_home = tmp_path / "hf"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(env_home), ATTNCOMM_CACHE=str(tmp_path / "c"))
    out = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "run.py"),
            "model=gpt2-small",
            "task=ioi",
            "task.n_prompts=2",
            f"paths.root={tmp_path}",
            "logger.mode=disabled",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "gpt2" in out.stderr and "model.path" in out.stderr and "HF_HUB_OFFLINE" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_offline_tracker_logs_figures(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    tracker = Tracker(LoggerConfig(dir=str(tmp_path)), name="fig", job_type="unit")
    tracker.log_figure("curve", fig)
    run_path = tracker.run_path
    tracker.finish()
    assert run_path is not None
    run = read_offline_run(run_path)
    assert any(
        row.get("curve", {}).get("_type") == "image-file" for row in run.history if "curve" in row
    ) or any(k.startswith("curve") for row in run.history for k in row)
    assert list((run_path / "files" / "media" / "images").glob("curve_*.png"))


def _manifest_writer(args: tuple[str, int]) -> None:
    root, i = args
    from attncomm.io.artifacts import update_manifest

    update_manifest(RunArtifacts(Path(root), "m", "t", 1, 0), f"stage{i}", [], {"i": i})


def test_concurrent_manifest_updates_lose_nothing(tmp_path: Path) -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_manifest_writer, [(str(tmp_path), i) for i in range(24)]))
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert sorted(stages) == sorted(f"stage{i}" for i in range(24))


@pytest.mark.cli
@pytest.mark.parametrize(
    ("model", "task", "says"), [("toy-ioi", "gt", "two-digit"), ("toy-induction", "gp", "gp")]
)
def test_cli_task_the_tokenizer_cannot_express_exits_2(
    tmp_path: Path, model: str, task: str, says: str
) -> None:
    out = run_cli(
        [f"model={model}", f"task={task}", "stage=describe", "task.n_prompts=4", "logger.mode=disabled",
         f"paths.root={tmp_path}"],
        tmp_path,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        f"task '{task}'" in out.stderr
        and says in out.stderr
        and "use a tokenizer that can express" in out.stderr
    )
    assert "Traceback" not in out.stderr


class _DeadRun:
    """A wandb run whose service process died (as after the signal that preempts a SLURM job)."""

    def __init__(self) -> None:
        self.calls = 0

    def log(self, *args: object, **kwargs: object) -> None:
        self.calls += 1
        raise ConnectionResetError("Connection lost")

    def finish(self, exit_code: int = 0) -> None:
        raise ConnectionResetError("Connection lost")


def test_tracker_survives_a_dead_wandb_service(caplog: pytest.LogCaptureFixture) -> None:
    from attncomm.runtime.tracking import PrefixedTracker

    tracker = Tracker(LoggerConfig(mode="disabled"))
    dead = _DeadRun()
    tracker.run = dead
    view = PrefixedTracker(tracker, "trace")
    view.log_metrics({"firings": 3})  # warns and stops logging instead of failing the stage
    assert tracker.run is None and view.run is None and "wandb logging stopped" in caplog.text
    view.log_metrics({"firings": 4})
    tracker.log_metrics({"x": 1})
    assert dead.calls == 1
    tracker.run = _DeadRun()
    tracker.finish(1)  # never raises: an interrupted job's own exit must win
    assert tracker.run is None


def test_wandb_group_is_the_name_or_the_sweep() -> None:
    from attncomm.runtime.registry import wandb_group

    assert wandb_group("paper", "outputs/hydra/multirun/2026-11-24/03-15-38") == "paper"
    assert wandb_group("default", None) == "default"
    assert wandb_group("default", "outputs/hydra/multirun/2026-11-24/03-15-38") == "sweep-2026-11-24_03-15-38"
