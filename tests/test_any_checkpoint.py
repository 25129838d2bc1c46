"""Any local HF checkpoint of a supported family: ``model=hf model.path=DIR`` needs no YAML, the family
comes from config.json (whatever a YAML says), an unsupported architecture gets one message listing
the families, and describe / trace / interventions run on tiny Llama, Qwen2 and Mistral checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attncomm.errors import ConfigError
from attncomm.models.adapter import load_model
from attncomm.models.architectures import (
    FAMILIES,
    UnsupportedArchitectureError,
    read_family,
    resolve_model_config,
)
from attncomm.models.random_models import build_model_dir
from attncomm.runtime.config import ModelConfig
from attncomm.runtime.registry import RunContext, get_stage
from attncomm.stages.pipeline import run_pipeline
from tests.conftest import compose_app
from tests.models_fixtures import LLAMA_LIKE, test_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCH = {
    "tiny-llama": "LlamaForCausalLM",
    "tiny-qwen2": "Qwen2ForCausalLM",
    "tiny-mistral": "MistralForCausalLM",
}


def bert_dir(tmp_path: Path) -> Path:
    d = tmp_path / "my-bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("builder", LLAMA_LIKE)
def test_family_comes_from_config_json(builder: str) -> None:
    """A YAML that claims gpt2 (model=gpt2-small model.path=<a Llama dir>) reports the checkpoint's family."""
    path = build_model_dir(builder, test_cache_dir())
    family = builder.removeprefix("tiny-")
    assert read_family(path) == family
    cfg = ModelConfig(name="gpt2-small", short_name="gpt2-small", family="gpt2", path=str(path))
    assert resolve_model_config(cfg).family == family
    info = load_model(cfg).describe()
    assert info["family"] == family and info["architecture"] == ARCH[builder]


@pytest.mark.slow
def test_model_hf_derives_its_short_name_and_refuses_no_weights() -> None:
    path = build_model_dir("tiny-qwen2", test_cache_dir())
    app = compose_app(["model=hf", f"model.path={path}"])
    assert app.model.short_name == "auto" and app.model.family == "auto"
    resolved = resolve_model_config(app.model)
    assert resolved.short_name == "tiny-qwen2" and resolved.family == "qwen2"
    by_id = resolve_model_config(compose_app(["model=hf", "model.hf_name=Qwen/Qwen2.5-0.5B"]).model)
    assert by_id.short_name == "Qwen2.5-0.5B"
    with pytest.raises(ConfigError, match="model.path=DIR"):
        resolve_model_config(compose_app(["model=hf"]).model)
    for name, family, hub in [
        ("pythia-410m", "neox", "EleutherAI/pythia-410m"),
        ("qwen2.5-0.5b", "qwen2", "Qwen/Qwen2.5-0.5B"),
        ("llama-3.2-1b", "llama", "meta-llama/Llama-3.2-1B"),
    ]:
        model = compose_app([f"model={name}"]).model
        assert (model.short_name, model.family, model.hf_name) == (name, family, hub)


@pytest.mark.slow
def test_unsupported_architecture_lists_the_families(tmp_path: Path) -> None:
    cfg = ModelConfig(name="hf", short_name="auto", family="auto", path=str(bert_dir(tmp_path)))
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model(cfg)
    message = str(err.value)
    assert "BertForMaskedLM" in message and "config.json" in message
    assert all(family in message for family in FAMILIES)


@pytest.mark.cli
def test_cli_unsupported_architecture_exits_2(tmp_path: Path) -> None:
    env = dict(os.environ, ATTNCOMM_CACHE=os.environ.get("ATTNCOMM_CACHE", str(tmp_path / "cache")))
    args = ["model=hf", f"model.path={bert_dir(tmp_path)}", "stage=describe", f"paths.root={tmp_path / 'o'}"]
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *args, "logger.mode=disabled"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "BertForMaskedLM" in errors[0] and "llama" in errors[0] and "qwen2" in errors[0]
    )


@pytest.mark.slow
@pytest.mark.parametrize("builder", LLAMA_LIKE)
def test_describe_trace_interventions_on_a_local_checkpoint(tmp_path: Path, builder: str) -> None:
    path = build_model_dir(builder, test_cache_dir())
    app = compose_app(
        [
            "model=hf",
            f"model.path={path}",
            "model.prepend_bos=true",
            "task=ioi",
            "task.n_prompts=6",
            "stage=pipeline",
            "pipeline.stages=[trace,unify,interventions]",
            "trace.skip_incorrect=false",
            f"paths.root={tmp_path / 'out'}",
            "logger.mode=disabled",
        ]
    )
    app.model = resolve_model_config(app.model)
    ctx = RunContext.from_config(app)
    assert f"/{builder}/ioi/" in str(ctx.run_dir)
    described = get_stage("describe").run(app, ctx)
    assert described["n_prompts"] == 6 and described["model"] == builder
    summary = run_pipeline(app, ctx)
    assert summary["trace/prompts"] == 6 and summary["trace/prompts_traced"] >= 1, summary
    manifest = json.loads((ctx.run_dir / "manifest.json").read_text())
    assert {"trace", "unify", "interventions"} <= set(manifest["stages"])
    assert list(ctx.run_dir.glob(f"interventions_graph_{builder}_ioi_n6_*.graphml"))
