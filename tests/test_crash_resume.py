"""A job killed with SIGKILL in the middle of a file write, then run again, leaves exactly the
artifacts of an uninterrupted run; for every stage that writes files (omega, trace, trace_merge,
unify, interventions, prune, compare, sparsity, experiments, control_signals, export, train, discover,
evaluate, compare_methods and, for the toolkit stages' shared writer, dla). The kill
point is deterministic: ``ATTNCOMM_CRASH_AT_WRITE=N`` kills the job between
writing its N-th temporary file and renaming it into place (see ``attncomm.io.crashpoints``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attncomm.runtime.config import AppConfig, register_configs
from attncomm.runtime.registry import run_job
from tests import models_fixtures as fixtures
from tests.conftest import REPO_ROOT

#: files whose bytes must match (figures and the manifest carry times and versions)
COMPARED = (".graphml", ".h5", ".csv", ".parquet", ".json", ".cyjs", ".html", ".safetensors")
SKIPPED_NAMES = ("manifest.json", "manifest.jsonl")
#: JSON fields that are measurements of the run, not results (a trained toy's metrics.json)
TIMINGS = ("train_seconds",)

#: the toy with a shipped reference circuit, for compare (the tiny test models have none)
TOY = ("model=toy-ioi", "prune.n_min=1", "compare.threshold=0.5")
#: a few training steps of the toy (stage=train)
TRAIN = ("model=toy-ioi", "train.steps=3", "train.batch_size=4")


def overrides(stage: str, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    model = () if any(e.startswith("model=") for e in extra) else ("model=tiny-pythia",)
    return [
        *extra,
        *model,
        f"stage={stage}",
        "task=ioi",
        "task.n_prompts=4",
        "task.batch_size=1",
        "trace.skip_incorrect=false",
        "unify.thresholds=[0.0,0.01,0.5]",
        "prune.step=0.25",
        "export.thresholds=[0.5]",
        "logger.mode=disabled",
        f"paths.run_dir={run_dir}",
        f"paths.root={run_dir.parent / 'root'}",
        f"paths.cache_dir={fixtures.test_cache_dir()}",
    ]


def in_process(stage: str, run_dir: Path, extra: tuple[str, ...] = ()) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides(stage, run_dir, extra)))
    assert isinstance(cfg, AppConfig)
    run_job(cfg)


def cli(
    stage: str, run_dir: Path, crash_at: int | None, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ATTNCOMM_CACHE=str(fixtures.test_cache_dir()))
    env.pop("ATTNCOMM_CRASH_AT_WRITE", None)
    if crash_at is not None:
        env["ATTNCOMM_CRASH_AT_WRITE"] = str(crash_at)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *overrides(stage, run_dir, extra)],
        cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _content(path: Path) -> bytes:
    """A file's bytes; a JSON object's without its timing fields."""
    data = path.read_bytes()
    if path.suffix == ".json" and any(t.encode() in data for t in TIMINGS):
        obj = json.loads(data)
        return json.dumps({k: v for k, v in obj.items() if k not in TIMINGS}, sort_keys=True).encode()
    return data


def artifact_bytes(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): _content(p)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
        and p.suffix in COMPARED
        and p.name not in SKIPPED_NAMES
        and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)
        and "sparsity" not in p.parts[-2:-1]  # sparsity's meta.json names its run dir
    } | {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted((run_dir / "sparsity").glob("*"))
        if p.suffix in (".csv", ".parquet")
    }


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("crash") / "traced"
    in_process("trace", run_dir)
    return run_dir


@pytest.fixture(scope="module")
def intervened(traced: Path) -> Path:
    run_dir = traced.parent / "intervened"
    shutil.copytree(traced, run_dir)
    in_process("unify", run_dir)
    in_process("interventions", run_dir)
    return run_dir


@pytest.fixture(scope="module")
def sharded(traced: Path) -> Path:
    """Both shards of the trace done, not merged."""
    run_dir = traced.parent / "sharded"
    for shard in (0, 1):
        in_process("trace", run_dir, ("trace.n_shards=2", f"trace.shard={shard}", "trace.merge=false"))
    return run_dir


@pytest.fixture(scope="module")
def toy_pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trace, unify, interventions and prune of the toy IOI model (it ships a reference circuit)."""
    run_dir = tmp_path_factory.mktemp("crash-toy") / "pruned"
    for stage in ("trace", "unify", "interventions", "prune"):
        in_process(stage, run_dir, TOY)
    return run_dir


@pytest.fixture(scope="module")
def unified(traced: Path) -> Path:
    run_dir = traced.parent / "unified"
    shutil.copytree(traced, run_dir)
    in_process("unify", run_dir)
    return run_dir


@pytest.fixture(scope="module")
def experiment_edges(unified: Path) -> tuple[str, ...]:
    """experiments on two edges of the tiny run's combined graph at threshold 0 (it has no published ones)."""
    from attncomm.core.node_ids import format_node_id, is_root
    from attncomm.io.graphml import read_graph

    graph = read_graph(next((unified / "combined_graphs").glob("*_combined_0.0.graphml")))
    edges = sorted({(format_node_id(u), format_node_id(v)) for u, v in graph.edges() if not is_root(v)})[:2]
    assert edges, "the tiny run's combined graph has no non-root edge"
    listed = ",".join(f'["{u}","{v}",""]' for u, v in edges)
    return ("experiments.threshold=0.0", f"experiments.edges=[{listed}]")


@pytest.fixture(scope="module")
def discovered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EAP edge scores of the tiny model (method=eap, the default)."""
    run_dir = tmp_path_factory.mktemp("crash-methods") / "discovered"
    in_process("discover", run_dir)
    return run_dir


#: stage -> (which prepared run directory it starts from (None: an empty one), extra overrides)
STARTS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "omega": (None, ()),
    "trace": (None, ()),
    "unify": ("traced", ()),
    "sparsity": ("traced", ()),
    "interventions": ("unified", ()),
    "prune": ("intervened", ()),
    "export": ("intervened", ()),
    "trace_merge": ("sharded", ()),
    "compare": ("toy_pruned", TOY),
    "experiments": ("unified", ()),
    "control_signals": (None, ()),
    "train": (None, TRAIN),
    "discover": (None, ()),
    "evaluate": ("discovered", ()),
    "compare_methods": ("discovered", ("compare_methods.methods=[eap]", "compare_methods.literature=false")),
    "dla": (None, ()),
    "logit_lens": (None, ()),
    "act_patch": (None, ()),
    "path_patch": (None, ()),
    "ablate": (None, ("ablate.heads=[[1,0],[1,1]]",)),
    "attr_patch": (None, ()),
    "heads": (None, ()),
    "qk_ov": (None, ()),
}


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.parametrize(
    ("stage", "crash_at"),
    [
        ("omega", 2),
        ("trace", 3),
        ("unify", 2),
        ("sparsity", 2),
        ("interventions", 1),
        ("prune", 3),
        ("export", 2),
        ("trace_merge", 1),
        ("compare", 1),
        ("experiments", 1),
        ("control_signals", 2),
        ("train", 1),
        ("discover", 1),
        ("evaluate", 1),
        ("compare_methods", 1),
        ("dla", 2),
        ("logit_lens", 2),
        ("act_patch", 2),
        ("path_patch", 2),
        ("ablate", 2),
        ("attr_patch", 2),
        ("heads", 2),
        ("qk_ov", 2),
    ],
)
def test_sigkill_mid_write_then_rerun_gives_identical_artifacts(
    request: pytest.FixtureRequest, tmp_path: Path, stage: str, crash_at: int
) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    start, extra = STARTS[stage]
    if stage == "experiments":
        extra = request.getfixturevalue("experiment_edges")
    if start is not None:
        source = request.getfixturevalue(start)
        for target in (clean, killed):
            shutil.copytree(source, target)
    in_process(stage, clean, extra)
    crashed = cli(stage, killed, crash_at, extra)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert artifact_bytes(killed) != artifact_bytes(clean)  # the crash really cut the job short
    rerun = cli(stage, killed, None, extra)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "it/s]" not in rerun.stderr  # no progress-bar lines when stderr is not a terminal
    want, got = artifact_bytes(clean), artifact_bytes(killed)
    assert sorted(got) == sorted(want)
    differing = [name for name in want if want[name] != got[name]]
    assert not differing, differing


@pytest.mark.slow
@pytest.mark.cli
def test_sweep_jobs_sharing_a_run_directory_keep_their_own_entries(toy_pruned: Path, tmp_path: Path) -> None:
    """A ``-m`` sweep over compare.threshold in one run directory: each job has its own journal entry,
    its own comparison files, and the summary names the threshold of the latest job."""
    run_dir = tmp_path / "run"
    shutil.copytree(toy_pruned, run_dir)
    args = [a for a in overrides("compare", run_dir, TOY) if not a.startswith("compare.threshold")]
    env = dict(os.environ, ATTNCOMM_CACHE=str(fixtures.test_cache_dir()))
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), "-m", *args, "compare.threshold=0.25,0.5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    compares = [e for e in manifest["jobs"].values() if e["stage"] == "compare"]
    assert sorted(e["extra"]["threshold"] for e in compares) == [0.25, 0.5]
    assert manifest["stages"]["compare"]["extra"]["threshold"] == 0.5
    files = [sorted(str(f) for f in e["files"]) for e in compares]
    assert files[0] != files[1] and all(files)  # each job's own outputs, not the other's
