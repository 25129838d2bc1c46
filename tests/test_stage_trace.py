"""The omega and trace stages on tiny models: artifacts, skip counts, resume, shards, cache reuse."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import networkx as nx
import numpy as np
import pytest

from attncomm.io.graphml import read_graph
from attncomm.io.omega_store import read_svd, stored_keys
from attncomm.io.results import TracingResults
from attncomm.runtime.config import AppConfig, TaskConfig, TraceConfig
from attncomm.runtime.registry import RunContext
from attncomm.stages.omega import run_omega
from attncomm.stages.trace import run_trace, run_trace_merge
from tests import models_fixtures as fixtures
from tests.conftest import REPO_ROOT


def config(builder: str, n: int, **trace: object) -> AppConfig:
    cfg = AppConfig(
        model=fixtures.tiny_model_config(builder), task=TaskConfig(name="ioi", n_prompts=n, seed=0)
    )
    cfg.paths.cache_dir = str(fixtures.test_cache_dir())
    cfg.trace = TraceConfig(skip_incorrect=False, **trace)  # type: ignore[arg-type]
    return cfg


def same_artifacts(a: Path, b: Path, cfg: AppConfig) -> None:
    """Graphs and merged tracing results of two run directories are identical."""
    ra, rb = RunContext.for_tests(cfg, a).artifacts, RunContext.for_tests(cfg, b).artifacts
    graphs_a = sorted(p.name for p in ra.traced_graphs_dir.glob("*.graphml"))
    assert graphs_a == sorted(p.name for p in rb.traced_graphs_dir.glob("*.graphml")) and graphs_a
    for name in graphs_a:
        ga, gb = read_graph(ra.traced_graphs_dir / name), read_graph(rb.traced_graphs_dir / name)
        assert nx.utils.graphs_equal(ga, gb) or (
            sorted(ga.edges(keys=True, data=True), key=str) == sorted(gb.edges(keys=True, data=True), key=str)
        )
    ta, tb = TracingResults(ra.tracing_results()), TracingResults(rb.tracing_results())
    assert ta.prompts() == tb.prompts()
    fa, fb = ta.firings(), tb.firings()
    assert fa.keys() == fb.keys() and fa
    for key in fa:
        np.testing.assert_array_equal(fa[key].dest_terms, fb[key].dest_terms)
        np.testing.assert_array_equal(fa[key].src_terms, fb[key].src_terms)
        np.testing.assert_array_equal(fa[key].contrib_dest, fb[key].contrib_dest)
        np.testing.assert_array_equal(fa[key].contrib_src, fb[key].contrib_src)


@pytest.mark.slow
def test_trace_writes_published_artifacts_and_resumes(tmp_path: Path) -> None:
    cfg = config("tiny-pythia", 8)
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    summary = run_trace(cfg, ctx)
    assert summary["prompts"] == 8 and summary["prompts_traced"] > 0
    assert (
        summary["prompts_traced"] + summary["skipped_nonpositive_total"] + summary["skipped_no_head_seed"]
        == 8
    )
    art = ctx.artifacts
    results = TracingResults(art.tracing_results())
    statuses = results.prompts()
    assert set(statuses) == set(range(8))
    for p, (status, n_firings) in statuses.items():
        assert art.traced_graph(p).is_file() == (status == "traced")
        assert n_firings == len(results.firings(p))
    with h5py.File(art.tracing_results()) as f:
        names = [n for n in f if n != "prompts"]
    assert names and all(
        n.split("_(")[0] in {"svs_used_decomp_i", "svs_used_decomp_j", "contrib_sv_dest", "contrib_sv_src"}
        for n in names
    )
    assert "trace" in (art.manifest.read_text())
    # a second run finds every prompt done and traces nothing
    again = run_trace(cfg, RunContext.for_tests(cfg, tmp_path / "run"))
    assert again["firings_this_run"] == 0 and again["prompts_traced"] == summary["prompts_traced"]


@pytest.mark.slow
def test_shards_merged_equal_unsharded(tmp_path: Path) -> None:
    whole = config("tiny-pythia", 5)
    run_trace(whole, RunContext.for_tests(whole, tmp_path / "one"))
    for shard in (1, 0):
        cfg = config("tiny-pythia", 5, shard=shard, n_shards=2)
        run_trace(cfg, RunContext.for_tests(cfg, tmp_path / "many"))
    art = RunContext.for_tests(whole, tmp_path / "many").artifacts
    assert art.tracing_results(0).is_file() and art.tracing_results(1).is_file()
    assert set(TracingResults(art.tracing_results(1)).prompts()) == {1, 3}
    same_artifacts(tmp_path / "one", tmp_path / "many", whole)
    assert run_trace_merge(whole, RunContext.for_tests(whole, tmp_path / "many"))["prompts"] == 5


#: loaded by the killed job's interpreter through PYTHONPATH: right after the k-th part file (a prompt's
#: commit marker) is written, the process SIGKILLs itself, a deterministic point in the middle of the run
KILL_AFTER_PARTS = """\
import os
if os.environ.get("ATTNCOMM_TEST_KILL_AFTER_PARTS"):
    import signal
    import attncomm.io.results as _rio
    _write_part = _rio.write_part
    _written = []
    def write_part(*args, **kwargs):
        out = _write_part(*args, **kwargs)
        _written.append(out)
        if len(_written) >= int(os.environ["ATTNCOMM_TEST_KILL_AFTER_PARTS"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    _rio.write_part = write_part
"""


@pytest.mark.cli
def test_trace_killed_with_sigkill_resumes_to_identical_artifacts(tmp_path: Path) -> None:
    """SIGKILL a trace job after its 3rd prompt, rerun it: the artifacts equal an uninterrupted run's."""
    n, kill_after = 10, 3
    cfg = config("tiny-gemma2", n)
    run_trace(cfg, RunContext.for_tests(cfg, tmp_path / "clean"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AFTER_PARTS)
    env = dict(os.environ, ATTNCOMM_CACHE=str(fixtures.test_cache_dir()))
    args = [
        sys.executable,
        str(REPO_ROOT / "run.py"),
        "stage=trace",
        "model=tiny-gemma2",
        "task=ioi",
        f"task.n_prompts={n}",
        "task.batch_size=1",
        "trace.skip_incorrect=false",
        "logger.mode=disabled",
        f"paths.run_dir={tmp_path / 'killed'}",
        f"paths.root={tmp_path / 'root'}",
        f"paths.cache_dir={fixtures.test_cache_dir()}",
    ]
    killed_env = dict(env, PYTHONPATH=str(hook), ATTNCOMM_TEST_KILL_AFTER_PARTS=str(kill_after))
    first = subprocess.run(args, cwd=tmp_path, env=killed_env, capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    parts = tmp_path / "killed" / "tracing_results" / "parts"
    assert len(list(parts.glob("*.h5"))) == kill_after
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(parts.glob(".*.tmp")) == []
    same_artifacts(tmp_path / "clean", tmp_path / "killed", cfg)


@pytest.mark.slow
def test_omega_stage_caches_and_reuses(tmp_path: Path) -> None:
    cfg = config("tiny-pythia", 3)
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    first = run_omega(cfg, ctx)
    assert first["omega_entries_added"] > 0
    omega_dir = ctx.artifacts.omega_dir
    longest = int(ctx.prompts.lengths.max())
    keys = stored_keys(omega_dir, 1)
    assert {d for _, _, d in keys} == set(range(longest))
    assert {s for s, _, _ in keys} == {"d", "s"}
    # the cached SVD reproduces the dense Omega of that head and offset
    from attncomm.methods.acc_tracing import build_omega_cache

    cache = build_omega_cache(ctx.model, ctx.dtype)
    U, S, V = read_svd(omega_dir, 1, 2, "s", 5)
    U2, S2, V2 = cache.get(1, 2, 5, "s")
    np.testing.assert_allclose((U * S) @ V.T, (U2 * S2) @ V2.T, rtol=1e-5, atol=1e-5)
    assert run_omega(cfg, RunContext.for_tests(cfg, tmp_path / "run"))["omega_entries_added"] == 0
    cfg.omega.max_offset = longest + 4  # more offsets: only those are added
    added = run_omega(cfg, RunContext.for_tests(cfg, tmp_path / "run"))["omega_entries_added"]
    heads = ctx.model.arch.n_heads
    assert added == 5 * 2 * heads * ctx.model.arch.n_layers


@pytest.mark.slow
def test_omega_stage_non_rotary_has_one_offset(tmp_path: Path) -> None:
    cfg = config("tiny-gpt2", 2)
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    run_omega(cfg, ctx)
    assert {d for _, _, d in stored_keys(ctx.artifacts.omega_dir, 0)} == {0}


def test_bad_shard_is_a_clear_error(tmp_path: Path) -> None:
    cfg = config("tiny-gpt2", 2, shard=2, n_shards=2)
    with pytest.raises(Exception, match="need 0 <= shard < n_shards"):
        run_trace(cfg, RunContext.for_tests(cfg, tmp_path))


@pytest.mark.slow
def test_trace_through_the_plain_forward_writes_the_bridges_bytes(tmp_path: Path) -> None:
    """GPT-2 models trace through the plain forward (cold: built from the bridge; warm: from its cache
    file); every artifact is byte for byte what tracing through the bridge writes."""
    import dataclasses

    kinds: dict[str, str] = {}
    for name, weight_cache in (("bridge", False), ("cold", True), ("warm", True)):
        cfg = config("tiny-gpt2", 12)
        cfg.model = dataclasses.replace(cfg.model, weight_cache=weight_cache)
        cfg.paths.cache_dir = str(tmp_path / "cache")
        ctx = RunContext.for_tests(cfg, tmp_path / name)
        run_trace(cfg, ctx)
        kinds[name] = type(ctx.tracing_model).__name__
    assert kinds == {"bridge": "ModelAdapter", "cold": "PlainModel", "warm": "PlainModel"}
    files = sorted(
        p.relative_to(tmp_path / "bridge")
        for p in (tmp_path / "bridge").rglob("*")
        if p.is_file() and p.suffix in (".h5", ".graphml")
    )
    assert any(f.suffix == ".graphml" for f in files) and any(f.suffix == ".h5" for f in files)
    for name in ("cold", "warm"):
        for f in files:
            assert (tmp_path / name / f).read_bytes() == (tmp_path / "bridge" / f).read_bytes(), (name, f)
