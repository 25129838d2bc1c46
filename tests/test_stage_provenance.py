"""Every intermediate artifact a later stage reads from disk carries its own provenance key (the model,
task and trace settings down its chain, and each producing stage's settings): a stage refuses inputs
made with other settings, refuses to mix its outputs with ones made otherwise unless
``overwrite=true``, and the pipeline does not skip a stage whose outputs carry another key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from attncomm.io.provenance import (
    IN_PROGRESS,
    STAGE_KEYS,
    StaleArtifactError,
    complete_stage_records,
    differences,
    guard_stage_outputs,
    require_same_model_and_task,
    stage_key,
    stage_outputs,
    stage_outputs_current,
    stage_record,
)
from attncomm.runtime.config import AppConfig, TaskConfig, TraceConfig
from attncomm.runtime.registry import RunContext
from attncomm.stages.export import run_export
from attncomm.stages.interventions import run_interventions
from attncomm.stages.pipeline import is_up_to_date
from attncomm.stages.prune import run_prune
from attncomm.stages.sparsity import run_sparsity
from attncomm.stages.trace import run_trace
from attncomm.stages.unify import run_unify
from tests import models_fixtures as fixtures
from tests.conftest import REPO_ROOT

BUILDER = "tiny-pythia"
N = 4


def config(**changes: Any) -> AppConfig:
    """The chain's settings; ``changes`` maps dotted names (``"prune.step"``) to other values."""
    cfg = AppConfig(
        model=fixtures.tiny_model_config(BUILDER), task=TaskConfig(name="ioi", n_prompts=N, seed=0)
    )
    cfg.paths.cache_dir = str(fixtures.test_cache_dir())
    cfg.trace = TraceConfig(skip_incorrect=False)
    cfg.unify.thresholds = [0.0, 0.5]
    cfg.interventions.threshold = 0.0
    cfg.prune.step = 0.5
    cfg.prune.n_min = 1
    cfg.export.thresholds = [0.5]
    cfg.export.html = False
    for dotted, value in changes.items():
        section, key = dotted.rsplit(".", 1) if "." in dotted else ("", dotted)
        target = cfg
        for part in filter(None, section.split(".")):
            target = getattr(target, part)
        setattr(target, key, value)
    return cfg


def ctx_for(cfg: AppConfig, run_dir: Path) -> RunContext:
    return RunContext.for_tests(cfg, run_dir)


# ----------------------------------------------------------------------------- the key chain (fast)

#: (stage, an upstream or own setting, another value): the stage's key must name the change
CHANGES = [
    ("unify", "trace.with_tokens", True),
    ("unify", "unify.thresholds", [0.0, 0.25]),
    ("interventions", "unify.thresholds", [0.0, 0.25]),
    ("interventions", "trace.upstream_fraction", 0.5),
    ("unify", "trace.max_firings", 5000),
    ("sparsity", "trace.max_firings", 5000),
    ("prune", "interventions.threshold", 0.5),
    ("prune", "unify.thresholds", [0.5]),
    ("prune", "prune.step", 0.25),
    ("prune", "prune.n_min", 2),
    ("compare", "prune.step", 0.25),
    ("compare", "trace.with_tokens", True),
    ("compare", "compare.methods", ["IOI circuit"]),
    ("experiments", "experiments.seed", 1),
    ("experiments", "unify.thresholds", [0.7]),
    ("sparsity", "trace.seed_fraction", 0.5),
    ("sparsity", "sparsity.d_head", 8),
    ("control_signals", "control_signals.min_attention", 0.5),
    ("control_signals", "task.seed", 1),
    ("control_signals", "device.dtype", "float64"),
    ("export", "prune.step", 0.25),
    ("export", "export.html", True),
    ("discover", "method.budget", 2.0),
    ("discover", "task.n_prompts", 8),
    ("evaluate", "method.budget", 2.0),
    ("evaluate", "evaluate.ablation", "mean"),
    ("dla", "dla.top_k", 3),
    ("logit_lens", "logit_lens.incl_mid", False),
    ("act_patch", "act_patch.direction", "noising"),
    ("path_patch", "path_patch.positions", [1]),
    ("ablate", "ablate.method", "zero"),
    ("attr_patch", "attr_patch.compare", False),
    ("heads", "heads.seq_len", 10),
    ("qk_ov", "qk_ov.top_k", 3),
]

#: settings that only name a file (one file per value) or change speed: a sweep over them shares a key
SHARED = [
    ("compare", "compare.threshold", 0.3),
    ("interventions", "interventions.threshold", 0.5),
    ("export", "export.thresholds", [0.2, 0.5]),
    ("interventions", "interventions.batch_size", 3),
    ("act_patch", "act_patch.max_batch", 7),
]


@pytest.mark.parametrize(("stage", "setting", "value"), CHANGES, ids=[f"{s}-{k}" for s, k, _ in CHANGES])
def test_a_changed_upstream_or_own_setting_changes_the_stage_key(
    stage: str, setting: str, value: Any
) -> None:
    diff = differences(stage_key(config(), stage), stage_key(config(**{setting: value}), stage))
    assert any(line.startswith(f"{setting}:") for line in diff), diff


@pytest.mark.parametrize(("stage", "setting", "value"), SHARED, ids=[f"{s}-{k}" for s, k, _ in SHARED])
def test_file_naming_and_speed_settings_leave_the_key_alone(stage: str, setting: str, value: Any) -> None:
    assert stage_key(config(), stage) == stage_key(config(**{setting: value}), stage)


def test_every_keyed_stage_chains_down_to_the_model() -> None:
    for stage in STAGE_KEYS:
        key = stage_key(config(), stage)
        assert "model.weights" in key and "task.name" in key, stage


@pytest.mark.parametrize("stage", sorted(STAGE_KEYS))
def test_guard_refuses_outputs_of_other_settings_and_overwrite_replaces_them(
    stage: str, tmp_path: Path
) -> None:
    """For every keyed stage: existing outputs with another key stop the job with one message naming
    the setting and both ways out; overwrite=true deletes them; the same key reuses the folder."""
    setting, value = next((k, v) for s, k, v in CHANGES if s == stage)
    old, new = config(), config(**{setting: value})
    ctx = ctx_for(old, tmp_path / "run")
    guard_stage_outputs(old, ctx, stage)
    spec = STAGE_KEYS[stage]
    folder = spec.folder(ctx)
    name = spec.pattern.replace("*/*", "kind/x.csv").replace("*", "x")
    output = folder / name
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("made with the old settings")
    assert stage_outputs(ctx, stage) == [output]
    guard_stage_outputs(old, ctx, stage)  # same settings: fine, the output stays
    assert output.is_file()
    new_ctx = ctx_for(new, tmp_path / "run")
    with pytest.raises(StaleArtifactError) as err:
        guard_stage_outputs(new, new_ctx, stage)
    msg = str(err.value)
    assert f"{setting}:" in msg and "overwrite=true" in msg and "paths.run_dir=NEW_DIR" in msg
    assert output.is_file()  # refused: nothing touched
    new.overwrite = True
    guard_stage_outputs(new, new_ctx, stage)
    assert not output.exists()
    recorded = json.loads(stage_record(new_ctx, stage).read_text())
    assert not differences(recorded, stage_key(new, stage))


def test_inputs_made_with_other_settings_are_refused_by_their_consumer(tmp_path: Path) -> None:
    cfg = config()
    ctx = ctx_for(cfg, tmp_path / "run")
    guard_stage_outputs(cfg, ctx, "evaluate")  # the faithfulness CSV's record (its inputs: discover)
    guard_stage_outputs(cfg, ctx, "discover")
    complete_stage_records(ctx)  # as a stage does when it returns
    changed = config(**{"method.select": "greedy"})
    with pytest.raises(StaleArtifactError, match=r"evaluate: the discover outputs .*method\.select"):
        guard_stage_outputs(changed, ctx_for(changed, tmp_path / "run"), "evaluate")


def test_outputs_of_an_unfinished_stage_are_not_taken_for_finished_ones(tmp_path: Path) -> None:
    """A stage's record says "in progress" from its guard until it returns: a run killed in between
    leaves outputs that consumers refuse (naming the command that completes them) and the pipeline reruns;
    a rerun with the same settings resumes; once it returns the record is a plain key."""
    cfg = config()
    ctx = ctx_for(cfg, tmp_path / "run")
    guard_stage_outputs(cfg, ctx, "discover")  # ... and then the process is killed
    record = stage_record(ctx, "discover")
    assert json.loads(record.read_text())[IN_PROGRESS] is True
    consumer = ctx_for(cfg, tmp_path / "run")
    with pytest.raises(StaleArtifactError, match=r"discover outputs .* are incomplete.*stage=discover"):
        guard_stage_outputs(cfg, consumer, "evaluate")
    assert not stage_outputs_current(cfg, consumer, "discover")
    with pytest.raises(StaleArtifactError, match=r"are incomplete.*stage=discover"):  # nor compare_methods
        require_same_model_and_task(cfg, consumer, "compare_methods", record, "stage=discover")
    rerun = ctx_for(cfg, tmp_path / "run")
    guard_stage_outputs(cfg, rerun, "discover")  # the same settings: no refusal
    complete_stage_records(rerun)
    assert IN_PROGRESS not in json.loads(record.read_text())
    assert stage_outputs_current(cfg, consumer, "discover")
    guard_stage_outputs(cfg, consumer, "evaluate")


# ----------------------------------------------------------------------------- real stages (slow)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trace, unify, interventions, prune, sparsity and export of the tiny model, with records."""
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    cfg = config()
    for run in (run_trace, run_unify, run_interventions, run_prune, run_sparsity, run_export):
        run(cfg, ctx_for(cfg, run_dir))
    return run_dir


def copy_of(chain: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(chain, run_dir)
    return run_dir


@pytest.mark.slow
def test_records_are_written_beside_every_output(chain: Path) -> None:
    ctx = ctx_for(config(), chain)
    for stage in ("unify", "interventions", "prune", "sparsity", "export"):
        assert stage_outputs(ctx, stage), stage
        assert json.loads(stage_record(ctx, stage).read_text()) == json.loads(
            json.dumps(stage_key(config(), stage))
        ), stage


@pytest.mark.slow
def test_changed_unify_thresholds_are_detected_not_reused(chain: Path, tmp_path: Path) -> None:
    run_dir = copy_of(chain, tmp_path)
    changed = config(**{"unify.thresholds": [0.0, 0.25]})
    for run in (run_interventions, run_prune, run_export):  # consumers of what unify made
        with pytest.raises(StaleArtifactError, match=r"unify\.thresholds: \[0\.0, 0\.5\] -> \[0\.0, 0\.25\]"):
            run(changed, ctx_for(changed, run_dir))
    with pytest.raises(StaleArtifactError, match="unify outputs.*overwrite=true"):
        run_unify(changed, ctx_for(changed, run_dir))
    changed.overwrite = True
    run_unify(changed, ctx_for(changed, run_dir))
    names = sorted(p.name for p in (run_dir / "combined_graphs").glob("*.graphml"))
    assert names == [f"{BUILDER}_ioi_n{N}_combined_0.0.graphml", f"{BUILDER}_ioi_n{N}_combined_0.25.graphml"]


@pytest.mark.slow
def test_changed_prune_step_is_detected_by_compare_and_prune(chain: Path, tmp_path: Path) -> None:
    from attncomm.stages.compare import run_compare

    run_dir = copy_of(chain, tmp_path)
    changed = config(**{"prune.step": 0.25, "compare.threshold": 0.5})
    with pytest.raises(StaleArtifactError, match=r"compare: the prune outputs .*prune\.step: 0\.5 -> 0\.25"):
        run_compare(changed, ctx_for(changed, run_dir))
    with pytest.raises(StaleArtifactError, match=r"prune outputs .*prune\.step: 0\.5 -> 0\.25"):
        run_prune(changed, ctx_for(changed, run_dir))
    changed.overwrite = True
    ctx = ctx_for(changed, run_dir)
    run_prune(changed, ctx)
    pruned = sorted(p.name for p in ctx.artifacts.pruned_graphs_dir.glob("*.graphml"))
    assert pruned == [ctx.artifacts.pruned_graph(t).name for t in (0.0, 0.25, 0.5, 0.75, 1.0)]


@pytest.mark.slow
def test_changed_trace_setting_is_detected_by_every_consumer(chain: Path, tmp_path: Path) -> None:
    run_dir = copy_of(chain, tmp_path)
    changed = config(**{"trace.with_tokens": True})
    for run in (run_unify, run_sparsity, run_export, run_prune):
        with pytest.raises(StaleArtifactError, match=r"trace\.with_tokens: false -> true"):
            run(changed, ctx_for(changed, run_dir))


@pytest.mark.slow
def test_pipeline_does_not_skip_a_stage_whose_outputs_carry_another_key(chain: Path, tmp_path: Path) -> None:
    run_dir = copy_of(chain, tmp_path)
    cfg = config()
    ctx = ctx_for(cfg, run_dir)
    sections = ("model", "task", "device", "trace", "unify", "interventions", "prune")
    assert is_up_to_date(ctx, "prune", sections)
    record = stage_record(ctx, "prune")
    key = json.loads(record.read_text())
    record.write_text(json.dumps(key | {"prune.step": 0.1}))  # e.g. a prune job of a sweep since
    assert not is_up_to_date(ctx, "prune", sections)


@pytest.mark.slow
@pytest.mark.cli
def test_cli_stale_prune_outputs_exit_2_with_one_message(chain: Path, tmp_path: Path) -> None:
    run_dir = copy_of(chain, tmp_path)
    args = [
        "stage=prune",
        f"model={BUILDER}",
        "model.tokenizer=null",  # as the in-process chain (the tokenizer saved with the model)
        "task=ioi",
        f"task.n_prompts={N}",
        "trace.skip_incorrect=false",
        "unify.thresholds=[0.0,0.5]",
        "interventions.threshold=0.0",
        "prune.n_min=1",
        "prune.step=0.25",
        "logger.mode=disabled",
        f"paths.run_dir={run_dir}",
        f"paths.cache_dir={fixtures.test_cache_dir()}",
    ]
    env = dict(os.environ, ATTNCOMM_CACHE=str(fixtures.test_cache_dir()))
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "prune.step: 0.5 -> 0.25" in errors[0], out.stderr[-3000:]
    assert "overwrite=true" in errors[0] and "paths.run_dir=NEW_DIR" in errors[0]


def test_compare_methods_refuses_edge_scores_of_other_prompts(tmp_path: Path) -> None:
    """compare_methods reads several methods' edge scores (each with its own method settings): the
    model and prompt settings must still be this job's."""
    from attncomm.stages.compare_methods import run_compare_methods

    other = config(**{"task.seed": 1})
    ctx = ctx_for(other, tmp_path / "run")
    guard_stage_outputs(other, ctx, "discover")  # discover-eap's record, made with task.seed=1
    complete_stage_records(ctx)  # as the discover stage does when it returns
    edges = ctx.run_dir / "circuits" / "eap" / f"{BUILDER}_ioi_edges.json"
    edges.parent.mkdir(parents=True, exist_ok=True)
    edges.write_text("{}")  # refused before it is read
    cfg = config(**{"compare_methods.methods": ["eap"], "compare_methods.literature": False})
    with pytest.raises(
        StaleArtifactError, match=r"compare_methods: .*discover-eap\.json.*task\.seed: 1 -> 0"
    ):
        run_compare_methods(cfg, ctx_for(cfg, tmp_path / "run"))


def test_an_edited_prompt_file_or_circuit_file_is_another_input(tmp_path: Path) -> None:
    """Files named by a setting are keyed by their content: editing the prompt file of ``task=file`` (or
    the fixed circuit of ``evaluate.circuit``) under the same name changes every key built on it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"clean": "a b", "answer": " c", "wrong": " d"}\n')
    circuit = tmp_path / "circuit.json"
    circuit.write_text('{"edges": {}}')
    cfg = config(**{"task.name": "file", "task.path": str(prompts), "evaluate.circuit": str(circuit)})
    before = {stage: stage_key(cfg, stage) for stage in ("discover", "evaluate", "dla")}
    prompts.write_text('{"clean": "a b", "answer": " e", "wrong": " d"}\n')
    after = {stage: stage_key(cfg, stage) for stage in ("discover", "evaluate", "dla")}
    for stage in before:
        old, new = before[stage]["task.path.sha256"], after[stage]["task.path.sha256"]
        assert old != new
        assert differences(before[stage], after[stage]) == [f"task.path.sha256: {old[:12]} -> {new[:12]}"]
    circuit.write_text('{"edges": {"input->logits": {"score": 1.0, "in_graph": true}}}')
    changed = differences(after["evaluate"], stage_key(cfg, "evaluate"))
    assert len(changed) == 1 and changed[0].startswith("evaluate.circuit.sha256:")
    assert not differences(after["discover"], stage_key(cfg, "discover"))  # discover does not read it
