"""Shipped model organisms: the toys load through the model adapter from their model yaml, reach their
trained accuracy on held-out prompts, keep their known circuits, and retrain through ``stage=train``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attncomm.models.adapter import ModelAdapter, load_model
from attncomm.runtime.registry import RunContext, get_stage
from attncomm.tasks import get_task
from attncomm.toys.reference import (
    REFERENCE_FILE,
    TOY_NAMES,
    TOY_TASKS,
    compute_reference,
    induction_scores,
    load_reference,
    task_accuracy,
    toy_dir,
)
from attncomm.toys.training import (
    TOY_SPECS,
    build_induction_tokenizer,
    build_ioi_tokenizer,
    induction_head_scores,
)
from tests.conftest import compose_app

#: held-out prompts: a seed used neither by training (batches), nor evaluation (10000), nor the reference (7)
HELDOUT_SEED = 4242
#: total size budget of the shipped toys
MAX_TOTAL_BYTES = 5 * 1024 * 1024


def require_shipped(name: str) -> None:
    """Skip when toy ``name`` has not been shipped yet (no ``attncomm/toys/<name>/config.json``)."""
    if not (toy_dir(name) / "config.json").is_file():
        pytest.skip(f"toy {name} is not shipped yet: attncomm/toys/{name}/ has no config.json")


@pytest.fixture(scope="module", params=TOY_NAMES)
def toy(request: pytest.FixtureRequest) -> tuple[str, ModelAdapter]:
    """Each toy loaded exactly as ``model=<toy>`` loads it (Hydra compose of its model yaml)."""
    name = request.param
    require_shipped(name)
    torch.manual_seed(0)
    app = compose_app([f"model={name}"])
    return name, load_model(app.model)


def test_model_yaml_points_at_the_shipped_directory() -> None:
    for name in TOY_NAMES:
        app = compose_app([f"model={name}", "train.steps=7"])
        assert app.model.name == name and app.model.family == "gpt2" and app.model.tokenizer is None
        assert Path(app.model.path) == toy_dir(name)
        assert app.train.steps == 7  # command-line overrides beat the toy's own train defaults


def test_shipped_files_and_size() -> None:
    total = 0
    for name in TOY_NAMES:
        folder = toy_dir(name)
        if not (folder / "config.json").is_file():
            continue
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / file).is_file(), f"{name}: {file} missing"
        for file in ("training_config.json", "metrics.json", REFERENCE_FILE):
            json.loads((folder / file).read_text())
        total += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert total < MAX_TOTAL_BYTES


@pytest.mark.parametrize("name", TOY_NAMES)
def test_attention_only_mlps_are_zero(name: str) -> None:
    require_shipped(name)
    weights = load_file(str(toy_dir(name) / "model.safetensors"))
    mlp = {k: v for k, v in weights.items() if ".mlp." in k}
    assert mlp and all(bool((v == 0).all()) for v in mlp.values())


def test_tokenizers_are_rebuilt_identically() -> None:
    """The shipped tokenizers are exactly what the training code builds (deterministic)."""
    from transformers import AutoTokenizer

    for name, build in (("toy-induction", build_induction_tokenizer), ("toy-ioi", build_ioi_tokenizer)):
        if not (toy_dir(name) / "config.json").is_file():
            continue
        shipped = AutoTokenizer.from_pretrained(str(toy_dir(name)))
        assert shipped.get_vocab() == build().get_vocab()


def test_ioi_tokenizer_expresses_the_ioi_task() -> None:
    from attncomm.tasks.ioi import NAMES, OBJECTS, PLACES

    tok = build_ioi_tokenizer()
    task = get_task("ioi")
    task.check_tokenizer(tok)
    for word in NAMES + PLACES + OBJECTS + (" gave", " said", " give"):
        word = word if word.startswith(" ") else " " + word
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    prompts = task.make_prompts(tok, 20, seed=3, prepend_bos=True)
    assert all(
        tok.decode(prompts.tokens[i, 1 : int(prompts.lengths[i])]) == prompts.texts[i] for i in range(20)
    )


def test_toy_is_accurate_on_heldout_prompts(toy: tuple[str, ModelAdapter]) -> None:
    name, model = toy
    task_name, options = TOY_TASKS[name]
    task = get_task(task_name, **options)
    for prepend_bos in (False, True):
        prompts = task.make_prompts(model.tokenizer, 200, seed=HELDOUT_SEED, prepend_bos=prepend_bos)
        accuracy, metric = task_accuracy(model, task, prompts)
        assert accuracy > TOY_SPECS[name].target_accuracy, (name, prepend_bos, accuracy)
        assert metric > 0


@pytest.mark.slow
def test_reference_circuit_recomputed_matches_shipped(toy: tuple[str, ModelAdapter]) -> None:
    name, model = toy
    shipped = load_reference(name)
    fresh = compute_reference(name, model)
    assert fresh["heads"] == shipped["heads"]
    for key, value in shipped.items():
        if (
            isinstance(value, list)
            and value
            and isinstance(value[0], list)
            and isinstance(value[0][0], float)
        ):
            assert torch.allclose(torch.tensor(fresh[key]), torch.tensor(value), atol=1e-4), key
    if name == "toy-induction":
        assert shipped["previous_token_head"][0] < shipped["induction_head"][0]
    else:
        assert len(shipped["heads"]) >= 2


def test_induction_scores_logged_in_training_match_the_adapter() -> None:
    """The HF-side scores logged during training equal the adapter's, and the shipped run logged them high."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    name = "toy-induction"
    require_shipped(name)
    torch.manual_seed(0)
    spec = TOY_SPECS[name]
    hf = GPT2LMHeadModel.from_pretrained(str(toy_dir(name)))
    tokenizer = AutoTokenizer.from_pretrained(str(toy_dir(name)))
    prev_hf, ind_hf = induction_head_scores(hf, spec, tokenizer, n=50, seed=HELDOUT_SEED)
    model = load_model(compose_app([f"model={name}"]).model)
    task_name, options = TOY_TASKS[name]
    prompts = get_task(task_name, **options).make_prompts(model.tokenizer, 50, seed=HELDOUT_SEED)
    prev, ind = induction_scores(model, prompts)
    assert torch.allclose(prev_hf, prev, atol=1e-4) and torch.allclose(ind_hf, ind, atol=1e-4)
    last = json.loads((toy_dir(name) / "metrics.json").read_text())["history"][-1]
    assert min(last["prev_token_score"], last["induction_score"]) > 0.5


@pytest.mark.slow
def test_train_stage_writes_a_loadable_model_dir(tmp_path: Path) -> None:
    """A 3-step ``stage=train`` run writes a model directory that the adapter loads."""
    app = compose_app(["stage=train", "model=toy-induction", "train.steps=3", "train.batch_size=4"])
    ctx = RunContext.for_tests(app, tmp_path)
    summary = get_stage("train").run(app, ctx)
    assert summary is not None and summary["train/bytes"] > 0
    out = tmp_path / "train" / "toy-induction"
    for file in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "training_config.json",
        "metrics.json",
    ):
        assert (out / file).is_file()
    assert json.loads((out / "training_config.json").read_text())["steps"] == 3
    model = load_model(dataclasses.replace(app.model, path=str(out)))
    assert model.arch.n_layers == TOY_SPECS["toy-induction"].n_layer
    assert "train" in json.loads((tmp_path / "manifest.json").read_text())["stages"]


_TRACER = importlib.util.find_spec("attncomm.methods.acc_tracing")


@pytest.mark.skipif(_TRACER is None, reason="attncomm.methods.acc_tracing (trace_prompts) is not there yet")
def test_acc_finds_previous_token_to_induction_edge() -> None:
    """ACC finds previous-token head -> induction head on the key (source) side in >= 90% of prompts."""
    from attncomm.methods.acc_tracing import trace_prompts

    name = "toy-induction"
    require_shipped(name)
    app = compose_app([f"model={name}"])
    model = load_model(app.model)
    reference = load_reference(name)
    prev, ind = tuple(reference["previous_token_head"]), tuple(reference["induction_head"])
    task_name, options = TOY_TASKS[name]
    task = get_task(task_name, **options)
    prompts = task.make_prompts(model.tokenizer, 20, seed=HELDOUT_SEED, prepend_bos=False)
    found, traced = 0, 0
    for trace in trace_prompts(
        model,
        task,
        prompts,
        prompt_ids=list(range(len(prompts))),
        with_tokens=False,
        skip_incorrect=True,
        dtype=torch.float32,
        progress=False,
    ):
        if trace.graph is None:
            continue
        traced += 1
        found += any(
            len(u) == 4
            and len(v) == 4
            and tuple(u[:2]) == prev
            and tuple(v[:2]) == ind
            and data["type"] == "s"
            for u, v, data in trace.graph.edges(data=True)
        )
    assert traced >= 15
    assert found / traced >= 0.9, f"edge {prev} -> {ind} (s) in {found} of {traced} traced prompts"
