"""Never trust a stale or foreign artifact: provenance keys, complete inputs, the journal manifest,
clear errors for damaged files and bad settings, readable and reproducible output files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import networkx as nx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from attncomm.core.node_ids import GraphFormatError, NodeIdError, parse_node_id
from attncomm.errors import AttncommError, ConfigError
from attncomm.io.artifacts import RunArtifacts, atomic_write_text, update_manifest
from attncomm.io.completeness import IncompleteInputError
from attncomm.io.graphml import graph_to_xml, write_graph
from attncomm.io.manifest import read_journal, read_manifest
from attncomm.io.omega_store import read_svd
from attncomm.io.provenance import StaleArtifactError, model_dir_name, weights_hash
from attncomm.io.results import (
    DamagedResultsError,
    PromptRecord,
    TracingResults,
    build_results,
    write_part,
    write_results,
)
from attncomm.models.adapter import resolve_model_dir
from attncomm.runtime.config import AppConfig, ModelConfig, TaskConfig, TraceConfig
from attncomm.runtime.registry import RunContext
from attncomm.runtime.validation import validate_config
from attncomm.runtime.wandb_checks import WandbUnavailableError, check_online_reachable, effective_mode
from attncomm.stages.omega import run_omega
from attncomm.stages.pipeline import closing_summary, is_up_to_date
from attncomm.stages.sparsity import run_sparsity
from attncomm.stages.trace import run_trace
from attncomm.stages.unify import run_unify
from attncomm.tasks import get_task
from attncomm.tasks.base import TaskTokenizerError
from tests import models_fixtures as fixtures

BUILDER = "tiny-pythia"
N = 4


def config(model: ModelConfig | None = None, n: int = N, **trace: object) -> AppConfig:
    cfg = AppConfig(
        model=model or fixtures.tiny_model_config(BUILDER), task=TaskConfig(name="ioi", n_prompts=n, seed=0)
    )
    cfg.paths.cache_dir = str(fixtures.test_cache_dir())
    cfg.unify.thresholds = [0.0, 0.5]
    cfg.trace = TraceConfig(skip_incorrect=False, **trace)  # type: ignore[arg-type]
    return cfg


def perturbed_copy(tmp_path: Path, name: str = "other", source: Path | None = None, seed: int = 1) -> Path:
    """A copy of a model directory (default: the tiny test model's) with different weights (same
    architecture and config)."""
    if source is None:
        source = Path(resolve_model_dir(fixtures.tiny_model_config(BUILDER), fixtures.test_cache_dir()))
    target = tmp_path / name
    shutil.copytree(source, target)
    for path in target.glob("*.safetensors"):
        tensors = load_file(path)
        gen = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}, path)
    return target


def path_model(directory: Path) -> ModelConfig:
    """The tiny model, loaded from ``model.path`` but still *named* like the builder model."""
    base = fixtures.tiny_model_config(BUILDER)
    return ModelConfig(
        name=base.name, short_name=base.short_name, family=base.family, path=str(directory), tokenizer=None
    )


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete trace of the tiny model (N prompts) to copy from."""
    run_dir = tmp_path_factory.mktemp("traced") / "run"
    cfg = config()
    run_trace(cfg, RunContext.for_tests(cfg, run_dir))
    return run_dir


# ----------------------------------------------------------------------------- provenance keys


def test_weights_hash_follows_content_not_path_and_is_memoised(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"weights-1")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    cache = tmp_path / "cache"
    assert weights_hash(a, cache) == weights_hash(b, cache) == weights_hash(a)
    memo = json.loads((cache / "weight_hashes.json").read_text())
    assert len(memo) == 2 and all(len(v) == 64 for v in memo.values())
    (b / "model.safetensors").write_bytes(b"weights-2")
    assert weights_hash(b, cache) != weights_hash(a, cache)


def test_model_path_with_other_weights_gets_its_own_run_directory(tmp_path: Path) -> None:
    source = resolve_model_dir(fixtures.tiny_model_config(BUILDER), fixtures.test_cache_dir())
    root = tmp_path / "out"
    first = config(path_model(source))
    first.paths.root = str(root)
    same = config(path_model(source))
    same.paths.root = str(root)
    other = config(path_model(perturbed_copy(tmp_path)))
    other.paths.root = str(root)
    assert model_dir_name(root, first) == BUILDER
    assert model_dir_name(root, same) == BUILDER
    name = model_dir_name(root, other)
    assert name.startswith(f"{BUILDER}-") and name != BUILDER
    assert RunContext.from_config(other).run_dir != RunContext.from_config(first).run_dir


@pytest.mark.slow
def test_trace_refuses_parts_made_with_other_trace_settings(traced: Path, tmp_path: Path) -> None:
    """Item 2: with_tokens changed in an existing run directory is refused, then overwrite retraces."""
    run_dir = tmp_path / "run"
    shutil.copytree(traced, run_dir)
    changed = config(with_tokens=True)
    with pytest.raises(StaleArtifactError) as err:
        run_trace(changed, RunContext.for_tests(changed, run_dir))
    msg = str(err.value)
    assert "trace.with_tokens: false -> true" in msg and "trace.overwrite=true" in msg
    assert "paths.run_dir" in msg
    # the same settings resume (nothing to trace), the refused job changed nothing
    assert run_trace(config(), RunContext.for_tests(config(), run_dir))["firings_this_run"] == 0
    forced = config(with_tokens=True, overwrite=True)
    summary = run_trace(forced, RunContext.for_tests(forced, run_dir))
    assert summary["firings_this_run"] > 0
    recorded = json.loads((run_dir / "tracing_results" / "provenance.json").read_text())
    assert recorded["trace.with_tokens"] is True


def test_trace_refuses_parts_of_another_checkpoint_with_the_same_name(traced: Path, tmp_path: Path) -> None:
    """Item 1: model.path to other weights (same model.name) in the same run directory is refused."""
    run_dir = tmp_path / "run"
    shutil.copytree(traced, run_dir)
    cfg = config(path_model(perturbed_copy(tmp_path)))
    with pytest.raises(StaleArtifactError, match="model.weights"):
        run_trace(cfg, RunContext.for_tests(cfg, run_dir))


@pytest.mark.slow
def test_omega_cache_of_another_model_is_recomputed(tmp_path: Path) -> None:
    """Item 4: an Omega cache copied from other weights is not kept."""
    other = config(path_model(perturbed_copy(tmp_path)), n=2)
    run_omega(other, RunContext.for_tests(other, tmp_path / "copied"))
    mine = config(n=2)
    summary = run_omega(mine, RunContext.for_tests(mine, tmp_path / "copied"))
    assert summary["omega_entries_added"] > 0
    fresh = config(n=2)
    run_omega(fresh, RunContext.for_tests(fresh, tmp_path / "fresh"))
    for side in ("d",):
        a = read_svd(tmp_path / "copied" / "omega", 0, 0, side, 0)
        b = read_svd(tmp_path / "fresh" / "omega", 0, 0, side, 0)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    again = run_omega(mine, RunContext.for_tests(mine, tmp_path / "copied"))
    assert again["omega_entries_added"] == 0


# ----------------------------------------------------------------------------- complete inputs


def test_unify_refuses_an_unfinished_trace_unless_allow_partial(traced: Path, tmp_path: Path) -> None:
    """Item 3: unify on a trace with missing prompts stops, naming how many and the command."""
    run_dir = tmp_path / "run"
    shutil.copytree(traced, run_dir)
    (run_dir / "tracing_results" / "parts" / f"{N - 1}.h5").unlink()
    cfg = config()
    with pytest.raises(IncompleteInputError) as err:
        run_unify(cfg, RunContext.for_tests(cfg, run_dir))
    msg = str(err.value)
    assert f"1 of {N} prompts" in msg and "stage=trace" in msg and "allow_partial=true" in msg
    cfg.allow_partial = True
    metrics = run_unify(cfg, RunContext.for_tests(cfg, run_dir))
    assert metrics["unify/n_traced"] >= 1


def test_sparsity_refuses_an_empty_results_file(tmp_path: Path) -> None:
    """Item 7: a valid result file without firings is refused instead of tables of NaN."""
    cfg = config(n=2)
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    write_results(
        ctx.artifacts.tracing_results(),
        [PromptRecord(0, "incorrect", 0, {}), PromptRecord(1, "no_head_seed", 0, {})],
    )
    with pytest.raises(AttncommError, match="hold no firings"):
        run_sparsity(cfg, ctx)
    assert not (tmp_path / "run" / "sparsity").exists()


def test_task_the_tokenizer_maps_to_unknown_is_refused() -> None:
    """Item 8: a tokenizer that maps every IOI word to its unknown token cannot express IOI."""
    from transformers import AutoTokenizer

    from attncomm.runtime.config import package_path

    tok = AutoTokenizer.from_pretrained(package_path("toys/toy-induction"))
    with pytest.raises(TaskTokenizerError, match="names"):
        get_task("ioi").check_tokenizer(tok)
    get_task("ioi").check_tokenizer(AutoTokenizer.from_pretrained(package_path("toys/toy-ioi")))


# ----------------------------------------------------------------------------- journal manifest


def _arts(tmp_path: Path) -> RunArtifacts:
    return RunArtifacts(tmp_path / "run", "m", "ioi", 4, 0)


def test_sweep_jobs_sharing_a_run_directory_keep_their_entries(tmp_path: Path) -> None:
    """Item 6: compare at two thresholds: both jobs are in the manifest."""
    arts = _arts(tmp_path)
    for th in (0.2, 0.3):
        update_manifest(arts, "compare", [], {"compare": {"threshold": th}}, {"threshold": th})
    manifest = json.loads(arts.manifest.read_text())
    compares = [e for e in manifest["jobs"].values() if e["stage"] == "compare"]
    assert sorted(e["extra"]["threshold"] for e in compares) == [0.2, 0.3]
    assert manifest["stages"]["compare"]["extra"]["threshold"] == 0.3
    assert [e["extra"]["threshold"] for e in read_journal(arts.run_dir)] == [0.2, 0.3]


def test_corrupt_manifest_is_moved_aside_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 5: a corrupt manifest.json is never silently replaced and no record is lost."""
    arts = _arts(tmp_path)
    update_manifest(arts, "trace", [], {"trace": {}})
    arts.manifest.write_text('{"stages": {"trace": ')
    with caplog.at_level(logging.WARNING):
        update_manifest(arts, "prune", [], {"prune": {}})
    aside = list(arts.run_dir.glob("manifest.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"stages": {"trace": '
    assert any(aside[0].name in r.getMessage() for r in caplog.records)
    assert set(json.loads(arts.manifest.read_text())["stages"]) == {"trace", "prune"}


def test_pipeline_up_to_date_check_survives_a_corrupt_manifest(tmp_path: Path) -> None:
    cfg = config()
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    ctx.record("unify", [])
    assert is_up_to_date(ctx, "unify", ("model", "task", "unify"))
    ctx.artifacts.manifest.write_bytes(b"\x00garbage")
    assert is_up_to_date(ctx, "unify", ("model", "task", "unify"))
    assert list(ctx.run_dir.glob("manifest.json.corrupt-*"))


def test_journal_with_a_torn_last_line_is_still_readable(tmp_path: Path) -> None:
    arts = _arts(tmp_path)
    update_manifest(arts, "trace", [], {"trace": {}})
    with open(arts.run_dir / "manifest.jsonl", "ab") as f:
        f.write(b'{"stage": "unify", "ti')  # a crash in the middle of an append
    update_manifest(arts, "prune", [], {"prune": {}})
    assert [e["stage"] for e in read_journal(arts.run_dir)] == ["trace", "prune"]
    assert set(read_manifest(arts.run_dir)["stages"]) == {"trace", "prune"}


def test_legacy_manifest_is_migrated_into_the_journal(tmp_path: Path) -> None:
    arts = _arts(tmp_path)
    arts.run_dir.mkdir(parents=True)
    arts.manifest.write_text(json.dumps({"stages": {"trace": {"stage": "trace", "files": []}}}))
    update_manifest(arts, "unify", [], {"unify": {}})
    assert set(json.loads(arts.manifest.read_text())["stages"]) == {"trace", "unify"}


def test_closing_summary_links_the_viewer_of_the_compared_threshold(tmp_path: Path) -> None:
    cfg = config()
    cfg.compare.threshold = 0.3
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    folder = ctx.artifacts.stage_dir("export") / "pruned_graphs"
    folder.mkdir(parents=True)
    for th in (0.2, 0.3):
        (folder / f"{ctx.artifacts.pruned_graph(th).stem}.html").write_text("<html></html>")
    text = closing_summary(cfg, ctx, {})
    assert f"{ctx.artifacts.pruned_graph(0.3).stem}.html" in text
    assert f"{ctx.artifacts.pruned_graph(0.2).stem}.html" not in text


# ----------------------------------------------------------------------------- damaged files


def _truncated_part(results_dir: Path, prompt: int) -> Path:
    rec = PromptRecord(prompt, "incorrect", 0, {})
    path = write_part(results_dir, rec)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("content", [b"", os.urandom(4096)], ids=["empty", "random"])
def test_damaged_result_file_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.h5"
    path.write_bytes(content)
    with pytest.raises(DamagedResultsError, match=str(path)):
        TracingResults(path).prompts()
    with pytest.raises(DamagedResultsError):
        TracingResults(path).firings()


def test_truncated_part_file_is_named(tmp_path: Path) -> None:
    results = tmp_path / "tracing_results"
    for p in range(17):
        write_part(results, PromptRecord(p, "incorrect", 0, {}))
    bad = _truncated_part(results, 17)
    with pytest.raises(DamagedResultsError) as err:
        build_results(tmp_path / "merged.h5", results, range(18))
    assert str(bad) in str(err.value) and "prompt 17" in str(err.value)


def test_hdf5_without_a_prompt_table_is_damaged(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(DamagedResultsError):
        TracingResults(path).prompts()


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("section", "key", "value", "says"),
    [
        ("unify", "thresholds", [2.0], "unify.thresholds"),
        ("unify", "thresholds", [], "unify.thresholds is empty"),
        ("prune", "step", 0, "prune.step"),
        ("prune", "step", -0.05, "prune.step"),
        ("prune", "step", 7, "prune.step"),
        ("prune", "step", 0.3, "divide 1"),
        ("trace", "upstream_fraction", 0.0, "trace.upstream_fraction"),
        ("trace", "upstream_fraction", 1.5, "trace.upstream_fraction"),
        ("compare", "threshold", 1.2, "compare.threshold"),
        ("task", "prompt_type", "bogus", "task.prompt_type"),
        ("task", "n_prompts", 0, "task.n_prompts"),
        ("device", "threads", 0, "device.threads"),
        ("device", "threads", 1.5, "device.threads"),
    ],
)
def test_out_of_range_settings_are_config_errors(section: str, key: str, value: object, says: str) -> None:
    cfg = config()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
        validate_config(cfg)


def test_valid_settings_pass() -> None:
    validate_config(config())


def test_device_threads_sets_torchs_thread_count(tmp_path: Path) -> None:
    cfg = config()
    cfg.device.threads = 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        RunContext.for_tests(cfg, tmp_path / "run")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compare_threshold_must_be_a_produced_one(tmp_path: Path) -> None:
    from attncomm.stages.compare import run_compare

    cfg = config()
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    G = nx.MultiDiGraph()
    G.add_edge((0, 0, "end", "end"), ("root", "end"), weight=1.0, type="d")
    for th in (0.2, 0.5):
        write_graph(G, ctx.artifacts.pruned_graph(th))
    cfg.compare.threshold = 0.3
    with pytest.raises(ConfigError, match=r"compare\.threshold=0\.3.*0\.2, 0\.5"):
        run_compare(cfg, ctx)


def test_node_id_indices_are_bounded() -> None:
    with pytest.raises(NodeIdError, match="layer"):
        parse_node_id("(" + "9" * 900 + ", 0, 'end', 'end')")
    with pytest.raises(NodeIdError, match="head"):
        parse_node_id("(1, " + "9" * 50 + ", 'end', 'end')")
    assert parse_node_id("(11, 3, 'end', 'S1')") == (11, 3, "end", "S1")


def test_wandb_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ConfigError, match="WANDB_MODE"):
        effective_mode("offline")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert effective_mode("offline") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert effective_mode("online") == "offline"
    assert effective_mode("disabled") == "disabled"


def test_online_logging_without_a_key_fails_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(WandbUnavailableError, match="logger.mode=offline"):
        check_online_reachable()


def test_online_logging_without_a_server_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(WandbUnavailableError, match="not reachable.*logger.mode=offline"):
        check_online_reachable(timeout=2.0)


# ----------------------------------------------------------------------------- files others can read


def _example_graph(order: list[int]) -> nx.MultiDiGraph:
    G = nx.MultiDiGraph()
    root = ("IO - S", "end")
    for i in order:
        G.add_node((i % 3, i, "end", "S1"), n_appearences=i)
    for i in order:
        G.add_edge((i % 3, i, "end", "S1"), root, key=0, weight=float(i), type="d")
    return G


def test_graph_bytes_do_not_depend_on_insertion_order(tmp_path: Path) -> None:
    from attncomm.viz.cytoscape import write_cyjs

    a, b = _example_graph([0, 1, 2, 3, 4, 5]), _example_graph([5, 3, 1, 0, 4, 2])
    assert graph_to_xml(a) == graph_to_xml(b)
    write_cyjs(a, tmp_path / "a.cyjs", name="g")
    write_cyjs(b, tmp_path / "b.cyjs", name="g")
    assert (tmp_path / "a.cyjs").read_bytes() == (tmp_path / "b.cyjs").read_bytes()


def test_artifacts_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        write_graph(_example_graph([0, 1]), tmp_path / "g.graphml")
        write_part(tmp_path / "res", PromptRecord(0, "incorrect", 0, {}))
    finally:
        os.umask(old)
    for path in (tmp_path / "a.txt", tmp_path / "g.graphml", tmp_path / "res" / "parts" / "0.h5"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_graphml_above_the_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from attncomm.io.graphml import read_graph

    path = tmp_path / "big.graphml"
    write_graph(_example_graph([0, 1]), path)
    with path.open("ab") as f:
        f.write(b"<!-- padding -->" * 70_000)  # about 1.1 MiB
    monkeypatch.setenv("ATTNCOMM_MAX_GRAPHML_MB", "1")
    with pytest.raises(GraphFormatError, match="size limit of 1 MiB"):
        read_graph(path)
    monkeypatch.setenv("ATTNCOMM_MAX_GRAPHML_MB", "2")
    assert read_graph(path).number_of_nodes() == 3


def test_pipeline_skips_compare_without_a_reference_circuit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where a model/task has no reference circuit, compare is skipped with one line; export still runs."""
    from attncomm.stages.pipeline import run_pipeline

    cfg = config()
    cfg.task.name = "gt"  # no literature circuit for the tiny test model on greater-than
    cfg.pipeline.stages = ["compare", "export"]
    cfg.export.thresholds = [0.2]
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    G = nx.MultiDiGraph()
    G.add_edge((0, 0, "end", "end"), ("root", "end"), weight=1.0, type="d")
    write_graph(G, ctx.artifacts.pruned_graph(0.2))
    with caplog.at_level(logging.INFO):
        summary = run_pipeline(cfg, ctx)
    assert summary["compare/skipped"] is True
    assert any("compare skipped" in r.getMessage() for r in caplog.records)
    assert list((ctx.artifacts.stage_dir("export")).rglob("*.cyjs"))


def test_hub_model_without_cache_or_network_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attncomm.models.adapter import ModelNotAvailableError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    cfg = ModelConfig(
        name="gpt2-small", short_name="gpt2-small", family="gpt2", hf_name="openai-community/gpt2"
    )
    with pytest.raises(ModelNotAvailableError, match="not reachable.*model.path"):
        resolve_model_dir(cfg, tmp_path)


def test_experiment_edges_are_bounded_by_the_model_shape() -> None:
    from attncomm.core.edge_experiments import parse_experiment_edges
    from attncomm.stages.experiments import check_edges_fit_model

    edges = parse_experiment_edges([["(1, 0, 'end', 'S1')", "(2, 3, 'end', 'IO')"]])
    check_edges_fit_model(edges, n_layers=3, n_heads=4, model="toy")
    with pytest.raises(ConfigError, match=r"experiments\.edges\[0\].*2 layers of 4 heads"):
        check_edges_fit_model(edges, n_layers=2, n_heads=4, model="toy")
    with pytest.raises(AttncommError, match="layer"):
        parse_experiment_edges([["(" + "9" * 900 + ", 0, 'end', 'S1')", "(2, 3, 'end', 'IO')"]])


def test_consumers_refuse_tracing_results_of_other_weights_or_settings(traced: Path, tmp_path: Path) -> None:
    """Item 1, downstream: interventions with other weights, unify with other trace settings."""
    from attncomm.methods.intervention_inputs import load_intervention_inputs

    run_dir = tmp_path / "run"
    shutil.copytree(traced, run_dir)
    cfg = config()
    run_unify(cfg, RunContext.for_tests(cfg, run_dir))
    other = config(path_model(perturbed_copy(tmp_path)))
    with pytest.raises(StaleArtifactError, match="interventions.*model.weights"):
        load_intervention_inputs(other, RunContext.for_tests(other, run_dir), 0.0)
    changed = config(upstream_fraction=0.5)
    with pytest.raises(StaleArtifactError, match=r"trace\.upstream_fraction: 0\.7 -> 0\.5"):
        run_unify(changed, RunContext.for_tests(changed, run_dir))


@pytest.mark.slow
@pytest.mark.cli
def test_graph_files_are_byte_identical_whatever_pythonhashseed(traced: Path, tmp_path: Path) -> None:
    """unify's GraphML and export's .cyjs/.html, written by two processes with different string hashing."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    files: dict[str, dict[str, bytes]] = {}
    for seed in ("0", "12345"):
        run_dir = tmp_path / f"seed{seed}"
        shutil.copytree(traced, run_dir)
        args = [
            "stage=pipeline",
            "pipeline.stages=[unify,export]",
            f"model={BUILDER}",
            "model.tokenizer=null",  # as the in-process trace
            "task=ioi",
            f"task.n_prompts={N}",
            "trace.skip_incorrect=false",
            "unify.thresholds=[0.0,0.5]",
            "export.thresholds=[0.0,0.5]",
            "logger.mode=disabled",
            f"paths.run_dir={run_dir}",
            f"paths.cache_dir={fixtures.test_cache_dir()}",
        ]
        env = dict(os.environ, ATTNCOMM_CACHE=str(fixtures.test_cache_dir()), PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, str(REPO_ROOT / "run.py"), *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        files[seed] = {
            str(p.relative_to(run_dir)): p.read_bytes()
            for pattern in ("combined_graphs/*.graphml", "export/*/*.cyjs", "export/*/*.html")
            for p in sorted(run_dir.glob(pattern))
        }
    a, b = files["0"], files["12345"]
    assert sorted(a) == sorted(b)
    assert sum(name.endswith(".graphml") for name in a) == 2
    assert sum(name.startswith("export/combined_graphs/") and name.endswith(".cyjs") for name in a) == 2
    assert any(name.startswith("export/traced_graphs/") and name.endswith(".cyjs") for name in a)
    assert [name for name in a if a[name] != b[name]] == []
