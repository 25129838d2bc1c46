"""Launchers: ``launcher=slurm`` / ``launcher=local`` compose, and a submitit_local multirun runs end to end.

``check_sweep`` (also used by tests/test_slurm.py) verifies what a user relies on after a multirun: one Hydra
job dir per job (named model/task/stage), submitit logs showing each job completed, and one wandb offline run
per job whose group is the sweep's experiment name (``name``) and whose config is the job's.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attncomm.runtime.config import AppConfig, register_configs
from attncomm.runtime.tracking import find_offline_runs, read_offline_run
from tests.conftest import REPO_ROOT

CONF = str(REPO_ROOT / "conf")
SLURM_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def compose_full(overrides: list[str]) -> Any:
    """The composed config including ``hydra`` (as a multirun would see it)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


# --- composition -----------------------------------------------------------------------------------


def test_slurm_launcher_composes_with_documented_defaults() -> None:
    cfg = compose_full(["launcher=slurm", "paths.root=/scratch/acc"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_TARGET
    expected = {
        "partition": None,
        "gpus_per_task": None,
        "gres": None,
        "cpus_per_task": 4,
        "mem_gb": 32,
        "timeout_min": 240,
        "array_parallelism": 16,
        "setup": [],
        "name": "attncomm-default",  # attncomm-${name}
    }
    for key, value in expected.items():
        got = launcher[key]
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, key
    # submitit's folder (sbatch scripts, pickles, stdout/stderr) is in the sweep dir, under paths.root/hydra
    assert (
        OmegaConf.to_container(launcher, resolve=False)["submitit_folder"]
        == "${hydra.sweep.dir}/.submitit/%j"
    )
    assert cfg.hydra.sweep.dir.startswith("/scratch/acc/hydra/multirun/")
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    # oc.select: a job composed without a model or task (``~model``) still gets a name, and a clear error
    model, task = "${oc.select:model.short_name,no-model}", "${oc.select:task.name,no-task}"
    assert subdir == f"${{hydra.job.num}}-{model}-{task}-${{stage.name}}"


def test_slurm_launcher_fields_are_overridable() -> None:
    cfg = compose_full(
        [
            "launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_task=1",
            "hydra.launcher.gres=gpu:a100:1",
            "hydra.launcher.cpus_per_task=8",
            "hydra.launcher.mem_gb=64",
            "hydra.launcher.timeout_min=720",
            "hydra.launcher.array_parallelism=4",
            "hydra.launcher.setup=['module load cuda/12.1','export HF_HUB_OFFLINE=1']",
            "hydra.launcher.submitit_folder=/scratch/logs/%j",
            "+hydra.launcher.additional_parameters.mail-type=END",
        ]
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["partition"] == "gpu"
    assert launcher["gpus_per_task"] == 1 and launcher["gres"] == "gpu:a100:1"
    assert launcher["cpus_per_task"] == 8 and launcher["mem_gb"] == 64
    assert launcher["timeout_min"] == 720 and launcher["array_parallelism"] == 4
    assert launcher["setup"] == ["module load cuda/12.1", "export HF_HUB_OFFLINE=1"]
    assert launcher["submitit_folder"] == "/scratch/logs/%j"
    assert launcher["additional_parameters"] == {"mail-type": "END"}


def test_local_launcher_composes_and_overrides() -> None:
    cfg = compose_full(["launcher=local", "hydra.launcher.timeout_min=5", "hydra.launcher.gpus_per_node=1"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"] == LOCAL_TARGET
    assert launcher["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    assert launcher["timeout_min"] == 5 and launcher["gpus_per_node"] == 1
    assert {"cpus_per_task", "mem_gb", "name"} <= set(launcher)


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_job_config_is_unchanged_by_the_launcher(launcher: str) -> None:
    """The bundles only touch ``hydra.launcher``: the job's AppConfig is the same with or without them."""
    overrides = ["model=tiny-gpt2", "task=gp", "task.n_prompts=4"]
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with_launcher = compose(config_name="config", overrides=[f"launcher={launcher}", *overrides])
        without = compose(config_name="config", overrides=overrides)
    assert OmegaConf.to_container(with_launcher) == OmegaConf.to_container(without)
    app = OmegaConf.to_object(with_launcher)
    assert isinstance(app, AppConfig)


def experiment_bundle(directory: Path, name: str) -> list[str]:
    """Overrides selecting an experiment bundle ``experiment=NAME`` that sets the experiment ``name: NAME``.

    The bundle lives in ``directory/experiment/NAME.yaml``, added to Hydra's search path (as a user's own
    bundle would be in conf/experiment/).
    """
    (directory / "experiment").mkdir(parents=True, exist_ok=True)
    (directory / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\nname: {name}\n")
    return [f"hydra.searchpath=[file://{directory}]", f"experiment={name}"]


def composed_name(overrides: list[str]) -> str:
    """The experiment name (top-level ``name``, the wandb group) a job composed with ``overrides`` gets."""
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return str(compose(config_name="config", overrides=overrides).name)


def test_experiment_name_from_the_command_line() -> None:
    assert composed_name(["launcher=slurm", "name=my-sweep"]) == "my-sweep"
    cfg = compose_full(["launcher=slurm", "name=my-sweep"])
    assert cfg.hydra.launcher.name == "attncomm-my-sweep"  # the SLURM job name shown by squeue


def test_experiment_bundle_sets_the_experiment_name(tmp_path: Path) -> None:
    assert composed_name(experiment_bundle(tmp_path, "sweep-x")) == "sweep-x"


def test_bad_launcher_field_is_rejected() -> None:
    with pytest.raises(Exception, match="no_such_field"):
        compose_full(["launcher=slurm", "hydra.launcher.no_such_field=1"])


# --- running a sweep and checking every job's outputs ----------------------------------------------


def sweep_command(launcher: str, axes: Mapping[str, Sequence[Any]], fixed: Sequence[str]) -> list[str]:
    """``python run.py -m launcher=... key=a,b ...`` for the given sweep axes and fixed overrides."""
    swept = [f"{key}={','.join(str(v) for v in values)}" for key, values in axes.items()]
    return [sys.executable, str(REPO_ROOT / "run.py"), "-m", f"launcher={launcher}", *swept, *fixed]


def run_sweep(cmd: list[str], env: Mapping[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env}
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"sweep failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    )
    return out


def _dotted(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node


def check_sweep(
    root: Path, axes: Mapping[str, Sequence[Any]], stage: str, experiment: str, cluster: str
) -> list[dict[str, Any]]:
    """Check every job of the one sweep under ``root``; return one record per job.

    ``experiment`` is the experiment name (``name``) every job must have, and so its wandb group.

    ``axes`` maps each swept key (``model``, ``task`` and dotted keys such as ``task.seed``) to its values.
    ``cluster`` is ``slurm`` or ``local`` (slurm job ids of an array are ``ARRAYID_TASK``).
    """
    sweeps = sorted(p for p in (root / "hydra" / "multirun").glob("*/*") if (p / "multirun.yaml").is_file())
    assert len(sweeps) == 1, f"expected one sweep dir under {root}/hydra/multirun, found {sweeps}"
    sweep = sweeps[0]
    keys = list(axes)
    expected = {tuple(str(v) for v in combo) for combo in itertools.product(*axes.values())}
    job_dirs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(job_dirs) == len(expected), f"{len(job_dirs)} job dirs for {len(expected)} jobs: {job_dirs}"

    runs = [read_offline_run(p) for p in find_offline_runs(root)]
    assert len(runs) == len(expected), f"{len(runs)} wandb offline runs for {len(expected)} jobs"

    records, seen, job_ids = [], set(), set()
    for job_dir in job_dirs:
        overrides = dict(
            o.split("=", 1) for o in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        )
        combo = tuple(overrides[k] for k in keys)
        assert combo in expected and combo not in seen, f"{job_dir.name}: unexpected overrides {overrides}"
        seen.add(combo)
        config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        hydra_cfg = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert overrides["launcher"] == cluster
        # the job dir names the job: {num}-{model}-{task}-{stage}
        num = hydra_cfg["job"]["num"]
        assert job_dir.name == f"{num}-{config['model']['short_name']}-{config['task']['name']}-{stage}"
        assert config["name"] == experiment and config["stage"]["name"] == stage
        log_text = (job_dir / "run.log").read_text()
        assert f"stage {stage}" in log_text, (
            f"{job_dir}/run.log does not show the stage ran:\n{log_text[-2000:]}"
        )

        # submitit's own folder for this job: sbatch script (slurm), pickles, stdout/stderr
        job_id = str(hydra_cfg["job"]["id"])
        assert job_id not in job_ids
        job_ids.add(job_id)
        if cluster == "slurm":
            assert "_" in job_id, f"slurm array job id expected, got {job_id}"
        sub_dir = sweep / ".submitit" / job_id
        assert (sub_dir / f"{job_id}_0_result.pkl").is_file(), f"no submitit result in {sub_dir}"
        logs = "".join(p.read_text(errors="replace") for p in sub_dir.glob(f"{job_id}_0_log.*"))
        assert "Job completed successfully" in logs, f"{sub_dir} logs do not show completion:\n{logs[-3000:]}"

        # this job's wandb offline run: grouped by the experiment, job_type = stage, config = the job's
        matches = [
            r
            for r in runs
            if all(
                str(_dotted(r.config, k if "." in k else f"{k}.name")) == v
                for k, v in zip(keys, combo, strict=True)
            )
        ]
        assert len(matches) == 1, f"{len(matches)} wandb runs match job {job_dir.name} ({combo})"
        run = matches[0]
        assert run.group == experiment, f"wandb group {run.group!r} != experiment {experiment!r}"
        assert run.job_type == stage
        assert run.config["name"] == experiment
        assert run.config["paths"]["root"] == str(root)
        assert run.summary, f"wandb run {run.path} has no summary"
        run_dir = root / config["model"]["short_name"] / config["task"]["name"]
        run_dir = run_dir / f"n{config['task']['n_prompts']}_seed{config['task']['seed']}"
        records.append(
            {"job_dir": job_dir, "job_id": job_id, "run": run, "config": config, "run_dir": run_dir}
        )
    return records


def shared_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ATTNCOMM_CACHE for all sweep jobs of the session, so each tiny model is built once and reused."""
    if os.environ.get("ATTNCOMM_CACHE"):
        return Path(os.environ["ATTNCOMM_CACHE"])
    path = tmp_path_factory.getbasetemp() / "attncomm-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_model_cache(tmp_path_factory)


@pytest.mark.slow
def test_local_multirun_two_jobs_end_to_end(tmp_path: Path, model_cache: Path) -> None:
    root = tmp_path / "out"
    experiment = f"local-{uuid.uuid4().hex[:8]}"
    axes = {"model": ["tiny-gpt2", "tiny-pythia"], "task": ["gp"]}
    fixed = [
        "stage=describe",
        "task.n_prompts=4",
        f"paths.root={root}",
        f"name={experiment}",
        "hydra.launcher.timeout_min=10",
    ]
    out = run_sweep(sweep_command("local", axes, fixed), {"ATTNCOMM_CACHE": str(model_cache)})
    assert "Submitit 'local' sweep output dir" in out.stdout + out.stderr
    records = check_sweep(root, axes, "describe", experiment, cluster="local")
    assert {r["run"].config["model"]["name"] for r in records} == {"tiny-gpt2", "tiny-pythia"}
    assert len({r["run_dir"] for r in records}) == 2  # each model/task its own run dir


@pytest.mark.cli
@pytest.mark.parametrize("script", ["paper.sh", "trace_shards.sh", "prune_sweep.sh"])
def test_sweep_recipes_print_valid_multirun_commands(script: str) -> None:
    """``DRY_RUN=1 sweeps/X.sh`` prints its ``run.py -m`` commands; every override parses as Hydra syntax."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    env = {**os.environ, "DRY_RUN": "1", "PARTITION": "gpu", "SETUP": "module load cuda/12.1; export A=1",
           "N_MIN": "5,10", "SHARDS": "3", "GEMMA_SHARDS": "3"}  # fmt: skip
    out = subprocess.run(["bash", str(REPO_ROOT / "sweeps" / script), "task.n_prompts=8"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line[2:]) for line in out.stderr.splitlines() if line.startswith("+ ")]
    assert commands, out.stderr
    parser = OverridesParser.create()
    for cmd in commands:
        assert cmd[1:4] == ["run.py", "-m", "launcher=slurm"], cmd
        overrides = cmd[4:]
        assert "task.n_prompts=8" in overrides and "hydra.launcher.partition=gpu" in overrides
        parsed = {o.key_or_group: o for o in parser.parse_overrides(overrides)}
        assert parsed["hydra.launcher.setup"].value() == ["module load cuda/12.1", "export A=1"]
        assert any(o.is_sweep_override() for o in parsed.values()), f"not a sweep: {cmd}"
    if script == "trace_shards.sh":
        trace = next(c for c in commands if "stage=trace" in c)
        assert "trace.shard=0,1,2" in trace and "trace.n_shards=3" in trace
