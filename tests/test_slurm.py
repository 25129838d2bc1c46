"""Real multirun sweeps through ``launcher=slurm`` on a single-node SLURM started for the test session.

* ``test_slurm_multirun_sweep``: tiny model, two tasks, two thresholds. A two-job ``stage=pipeline`` sweep
  (trace, unify, interventions, prune) over ``task=ioi,gt``, then a four-job ``stage=export`` sweep over the
  same tasks and ``export.thresholds=[0.1],[0.2]`` (the circuit pruned at each threshold); every job's
  artifacts, Hydra job dir, submitit logs and wandb offline run are checked. The threshold consumer is
  ``export``, not ``compare``: compare needs a reference circuit for the model and task, and the only
  tiny/toy model shipping one (toy-ioi) cannot express a second task (gp/gt need GPT-2's tokens).
* ``test_slurm_preemption_requeues_and_resumes``: one trace job is preempted the way submitit simulates it
  (SIGTERM, then USR2 to the job's steps); submitit's handler checkpoints and requeues it, and the restarted
  job traces only the prompts not yet written; the artifacts equal an uninterrupted trace's.

The session fixture starts munged + slurmctld + slurmd with tests/slurm/start_cluster.sh (installing
slurm-wlm/munge with apt-get when missing) and stops them with stop_cluster.sh at the end, also on failure.

* Outside CI, the test is skipped (with the reason) only when it cannot start a cluster at all: not root, or
  SLURM missing and apt-get unavailable.
* In CI (env ``CI`` set) a cluster that fails to start fails the test loudly. Only when a real SLURM genuinely
  cannot run on the machine (not root, or no SLURM and no apt-get) does the sweep fall back to
  ``launcher=local``; the fallback is printed on the terminal, recorded as a test property
  (``slurm_fallback``, in the JUnit XML) and appended to ``$ATTNCOMM_SLURM_FALLBACK_LOG`` when that is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from attncomm.io.artifacts import RunArtifacts, method_overrides, run_dir_for
from attncomm.runtime.registry import RunContext
from attncomm.runtime.tracking import find_offline_runs, read_offline_run
from attncomm.stages.trace import run_trace
from tests import models_fixtures as fixtures
from tests.conftest import REPO_ROOT
from tests.test_launcher import (
    check_sweep,
    run_sweep,
    shared_model_cache,
    sweep_command,
)
from tests.test_stage_trace import config, same_artifacts

SCRIPTS = REPO_ROOT / "tests" / "slurm"

# The sweep: tiny model x two tasks, then x two thresholds (2 + 4 jobs, each sweep one SLURM job array).
MODELS, TASKS, N_PROMPTS = ["tiny-pythia"], ["ioi", "gt"], 4
PIPELINE = "[trace,unify,interventions,prune]"
THRESHOLDS = ["[0.1]", "[0.2]"]  # export.thresholds of one job each
# tiny random models get most prompts wrong: trace them anyway (a method override: run dir n4_seed0_{hash8})
METHOD = {"trace.skip_incorrect": False}


@dataclass
class Cluster:
    launcher: str  # "slurm", or "local" when a real SLURM cannot run here (CI fallback)
    env: dict[str, str] = field(default_factory=dict)
    state: Path | None = None
    fallback_reason: str = ""


def _cannot_run_slurm() -> str:
    """Why a real SLURM genuinely cannot run on this machine ('' when it can be tried)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root: slurmd and munged need root"
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch"))
    if not have_slurm and not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and apt-get is not available to install them"
    return ""


def _free_port_pair() -> int:
    """A port P with P and P+1 free (slurmctld, slurmd): a cluster already running here is left alone."""
    for port in range(16817, 17817, 2):
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for slurmctld/slurmd")


@pytest.fixture(scope="session")
def slurm_cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    reason = _cannot_run_slurm()
    if reason:
        if not os.environ.get("CI"):
            pytest.skip(f"cannot start a real SLURM here: {reason}")
        yield Cluster(launcher="local", fallback_reason=reason)
        return
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_PORT_BASE": str(_free_port_pair())}
    try:
        out = subprocess.run(
            ["bash", str(SCRIPTS / "start_cluster.sh"), str(state)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,  # includes apt-get install on a fresh machine
        )
        if out.returncode != 0:
            pytest.fail(
                f"could not start the test SLURM (exit {out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                f"logs: {state / 'log'}",
                pytrace=False,
            )
        yield Cluster(launcher="slurm", env={"SLURM_CONF": str(state / "slurm.conf")}, state=state)
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop_cluster.sh"), str(state)], timeout=120, check=False)


def _record_fallback(request: pytest.FixtureRequest, reason: str) -> None:
    message = f"SLURM FALLBACK: a real SLURM cannot run here ({reason}); the sweep ran with launcher=local"
    request.node.user_properties.append(("slurm_fallback", reason))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown even while pytest captures output
            reporter.write_line(f"\nWARNING: {message}", yellow=True, bold=True)
    if log_path := os.environ.get("ATTNCOMM_SLURM_FALLBACK_LOG"):
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(message + "\n")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_model_cache(tmp_path_factory)


def _slurm_resources(cluster: Cluster) -> list[str]:
    if cluster.launcher != "slurm":
        return []
    # fit the jobs on a small test node: 1 core and 2 GB each, at most 2 at a time
    return ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.array_parallelism=2"]


def _check_one_array(records: list[dict[str, Any]], cluster: Cluster) -> str:
    """Every job of the sweep is a task of one job array whose sbatch script got our resources."""
    if cluster.launcher != "slurm":
        return ""
    arrays = {r["job_id"].split("_")[0] for r in records}
    assert len(arrays) == 1, f"expected one job array, got {arrays}"
    sweep = records[0]["job_dir"].parent
    sbatch = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    for line in ("#SBATCH --cpus-per-task=1", "#SBATCH --mem=2GB", "%2", "#SBATCH --time=15",
                 "#SBATCH --signal=USR2@120"):  # fmt: skip
        assert line in sbatch, f"{line!r} not in the sbatch script:\n{sbatch}"
    return sbatch


def _set_aside(root: Path, dest: Path) -> None:
    """Move a checked sweep's Hydra dirs and wandb runs out of ``root`` (check_sweep expects one sweep)."""
    dest.mkdir(parents=True)
    for name in ("hydra", "wandb"):
        shutil.move(root / name, dest / name)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_slurm_multirun_sweep(
    slurm_cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest, model_cache: Path
) -> None:
    cluster = slurm_cluster
    if cluster.fallback_reason:
        _record_fallback(request, cluster.fallback_reason)
    root = tmp_path / "out"
    experiment = f"slurm-{uuid.uuid4().hex[:8]}"  # the experiment name: the wandb group of every job
    common = [f"task.n_prompts={N_PROMPTS}", f"paths.root={root}", f"name={experiment}",
              "hydra.launcher.timeout_min=15", "trace.skip_incorrect=false",
              *_slurm_resources(cluster)]  # fmt: skip
    env = {**cluster.env, "ATTNCOMM_CACHE": str(model_cache), "OMP_NUM_THREADS": "1"}

    # 1. the circuit of each task: stage=pipeline trace -> unify -> interventions -> prune, one job per task
    axes = {"model": MODELS, "task": TASKS}
    cmd = sweep_command(cluster.launcher, axes, ["stage=pipeline", f"pipeline.stages={PIPELINE}", *common])
    out = run_sweep(cmd, env, timeout=900)
    assert f"Submitit '{cluster.launcher}' sweep output dir" in out.stdout + out.stderr
    records = check_sweep(root, axes, "pipeline", experiment, cluster=cluster.launcher)
    _check_one_array(records, cluster)
    run_dirs = set()
    for r in records:
        cfg = r["config"]
        arts = _artifacts(root, cfg)
        run_dirs.add(arts.run_dir)
        expected = [arts.tracing_results(), arts.combined_graph(0.0), arts.interventions_graph(),
                    arts.pruned_graph(0.1), arts.pruned_graph(0.2), arts.manifest]  # fmt: skip
        missing = [p for p in expected if not p.is_file()]
        assert not missing, f"job {r['job_dir'].name}: missing artifacts {missing}"
        assert list(arts.traced_graphs_dir.glob(f"{arts.prefix}_*_0.graphml")), arts.traced_graphs_dir
        manifest = json.loads(arts.manifest.read_text())["stages"]
        assert {"trace", "unify", "interventions", "prune"} <= set(manifest), manifest.keys()
        summary = r["run"].summary
        assert summary.get("trace/prompts") == N_PROMPTS, summary
        assert any(k.startswith("prune/edges@") for k in summary), summary
    assert len(run_dirs) == len(MODELS) * len(TASKS)  # one run dir per model/task
    _set_aside(root, tmp_path / "pipeline-sweep")

    # 2. two thresholds of each task's circuit: stage=export of the pruned graph at th (4 jobs)
    axes = {"model": MODELS, "task": TASKS, "export.thresholds": THRESHOLDS}
    out = run_sweep(sweep_command(cluster.launcher, axes, ["stage=export", *common]), env, timeout=900)
    records = check_sweep(root, axes, "export", experiment, cluster=cluster.launcher)
    _check_one_array(records, cluster)
    for r in records:
        cfg = r["config"]
        arts = _artifacts(root, cfg)
        assert arts.run_dir in run_dirs  # the jobs consumed the pipeline sweep's circuits
        (th,) = cfg["export"]["thresholds"]
        stem = arts.stage_dir("export") / "pruned_graphs" / arts.pruned_graph(th).stem
        for suffix in (".cyjs", ".html"):
            assert stem.with_name(stem.name + suffix).is_file(), f"job {r['job_dir'].name}: no {stem}{suffix}"
        summary = r["run"].summary
        assert summary.get("export/n_pruned_graphs") == 1, summary
        assert r["run"].config["export"]["thresholds"] == [th]


def _artifacts(root: Path, cfg: dict[str, Any]) -> RunArtifacts:
    """The artifact paths of a job (its run dir includes the method-override hash)."""
    model, task = cfg["model"]["short_name"], cfg["task"]["name"]
    n, seed = cfg["task"]["n_prompts"], cfg["task"]["seed"]
    run_dir = run_dir_for(root, model, task, n, seed, method_overrides(METHOD))
    return RunArtifacts(run_dir, model, task, n, seed)


# --- preemption --------------------------------------------------------------------------------------

#: loaded by the job's interpreter through PYTHONPATH: inside a SLURM job, every part file written (a
#: prompt's commit marker) is followed by ATTNCOMM_TEST_PART_DELAY_S seconds of sleep, so a tiny trace
#: lasts long enough to be preempted between two prompts. Nothing else of the job changes.
SLOW_PARTS = """\
import os
if os.environ.get("SLURM_JOB_ID") and os.environ.get("ATTNCOMM_TEST_PART_DELAY_S"):
    import time
    import attncomm.io.results as _rio
    _write_part = _rio.write_part
    def write_part(*args, **kwargs):
        out = _write_part(*args, **kwargs)
        time.sleep(float(os.environ["ATTNCOMM_TEST_PART_DELAY_S"]))
        return out
    _rio.write_part = write_part
"""
PREEMPT_N = 12


def _slurm(cluster: Cluster, *args: str) -> str:
    env = {**os.environ, **cluster.env}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_slurm_preemption_requeues_and_resumes(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """Preempt a trace job: submitit requeues it and the restarted job traces only the remaining prompts."""
    cluster = slurm_cluster
    if cluster.launcher != "slurm":
        pytest.skip(f"preemption needs a real SLURM ({cluster.fallback_reason})")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_PARTS)
    root = tmp_path / "out"
    experiment = f"preempt-{uuid.uuid4().hex[:8]}"
    cache = fixtures.test_cache_dir()
    axes = {"model": ["tiny-gemma2"], "task": ["ioi"]}
    fixed = ["stage=trace", f"task.n_prompts={PREEMPT_N}", "task.batch_size=1", "trace.skip_incorrect=false",
             f"paths.root={root}", f"paths.cache_dir={cache}", f"name={experiment}",
             "hydra.launcher.timeout_min=15", *_slurm_resources(cluster)]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **cluster.env, "ATTNCOMM_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": pythonpath, "ATTNCOMM_TEST_PART_DELAY_S": "1"}  # fmt: skip
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(sweep_command("slurm", axes, fixed), cwd=REPO_ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        run_dir = run_dir_for(root, "tiny-gemma2", "ioi", PREEMPT_N, 0, method_overrides(METHOD))
        parts = run_dir / "tracing_results" / "parts"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if parts.is_dir() and len(list(parts.glob("*.h5"))) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the sweep ended before it could be preempted:\n{log_path.read_text()}"
        assert len(list(parts.glob("*.h5"))) >= 2, f"no prompt traced in 240 s:\n{log_path.read_text()}"
        job_id = _slurm(cluster, "squeue", "-h", "-n", f"attncomm-{experiment}", "-o", "%i").split()[0]
        # preempt: the USR2 of the job's --signal=USR2@... (SLURM sends it before the time limit, and at
        # preemption with PreemptParameters=send_user_signal); submitit's handler checkpoints the job
        # and requeues it (scontrol requeue), SLURM stops it and starts it again in the same job id
        _slurm(cluster, "scancel", "--signal=USR2", job_id)
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (
        f"preempted sweep failed ({proc.returncode}):\n{log_path.read_text()[-6000:]}"
    )

    # the one job: requeued once (same job id), started twice, the second start resuming
    (sub_dir,) = (p for p in root.glob("hydra/multirun/*/*/.submitit/*") if p.name == job_id)
    out = (sub_dir / f"{job_id}_0_log.out").read_text(errors="replace")
    # one Hydra job dir (a single job is a plain SLURM job, not an array: check_sweep's array check
    # does not apply), and a wandb offline run per start: the final one holds the job's summary
    (job_dir,) = sub_dir.parent.parent.glob("0-tiny-gemma2-ioi-trace")
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    assert f"name={experiment}" in overrides and "launcher=slurm" in overrides
    assert yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"] == job_id
    wandb_runs = re.findall(r"wandb offline run \S+ in (\S+)", out)
    assert len(wandb_runs) == 2, f"expected a wandb run per start in {sub_dir}:\n{out[-4000:]}"
    assert sorted(map(str, find_offline_runs(root))) == sorted(wandb_runs)
    run = read_offline_run(wandb_runs[1])
    assert run.group == experiment and run.job_type == "trace" and run.config["name"] == experiment
    assert run.config["task"]["n_prompts"] == PREEMPT_N and run.config["paths"]["root"] == str(root)
    assert (sub_dir / f"{job_id}_0_result.pkl").is_file() and "Job completed successfully" in out
    for line in ("Caught signal SIGUSR2", "this job is preempted", "Calling checkpoint method",
                 f"Requeued job {job_id}"):  # fmt: skip
        assert line in out, f"{line!r} not in {sub_dir}:\n{out[-4000:]}"
    assert out.count("Starting with JobEnvironment") == 2, out[-4000:]
    starts = re.findall(r"(\d+) already done, (\d+) to trace", out)
    assert len(starts) == 2, f"expected two trace starts in {sub_dir}:\n{out[-4000:]}"
    (done_0, todo_0), (done_1, todo_1) = [(int(a), int(b)) for a, b in starts]
    assert (done_0, todo_0) == (0, PREEMPT_N)
    assert 2 <= done_1 < PREEMPT_N and done_1 + todo_1 == PREEMPT_N, starts
    summary = run.summary
    assert summary.get("prompts") == PREEMPT_N, summary
    assert "Restarts=1" in _slurm(cluster, "scontrol", "show", "job", job_id)

    # the artifacts equal an uninterrupted trace's
    cfg = config("tiny-gemma2", PREEMPT_N)
    cfg.task.batch_size = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job (OMP_NUM_THREADS=1): the same float reduction order
    try:
        clean = run_trace(cfg, RunContext.for_tests(cfg, tmp_path / "clean"))
    finally:
        torch.set_num_threads(threads)
    assert summary["prompts_traced"] == clean["prompts_traced"]
    same_artifacts(tmp_path / "clean", run_dir, cfg)
