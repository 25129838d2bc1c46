"""Corrupted counterparts of every task: what each corruption changes, checked token by token against
the clean prompt, the shared padding width, ``subset``, ``require_corrupted``'s errors, and (on the
shipped toys) that the corruption removes the behaviour the metric measures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import GPT2TokenizerFast

from attncomm.errors import AttncommError
from attncomm.models.adapter import load_model
from attncomm.models.gpt2_tokenizer import gpt2_tokenizer
from attncomm.runtime.config import AppConfig, register_configs
from attncomm.tasks import TaskPrompts, get_task
from attncomm.tasks import gp as gp_mod
from attncomm.tasks.base import CorruptedPromptsError, pad_id
from attncomm.toys.reference import TOY_TASKS, toy_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def tok() -> GPT2TokenizerFast:
    return gpt2_tokenizer()


def changed(p: TaskPrompts, i: int) -> list[int]:
    """Positions where the corrupted row differs from the clean one (within the clean length)."""
    n = int(p.lengths[i])
    return [k for k in range(n) if int(p.tokens[i, k]) != int(p.corrupted_tokens[i, k])]


def words(tok: GPT2TokenizerFast, p: TaskPrompts, i: int, positions: list[int]) -> list[str]:
    return [tok.decode([int(p.corrupted_tokens[i, k])]) for k in positions]


@pytest.mark.parametrize("name", ["ioi", "gt", "gp", "induction"])
@pytest.mark.parametrize("bos", [False, True])
def test_same_shape_length_and_bos(tok: GPT2TokenizerFast, name: str, bos: bool) -> None:
    p = get_task(name).make_prompts(tok, 12, seed=3, prepend_bos=bos)
    c = p.require_corrupted("act_patch")
    assert c.shape == p.tokens.shape and c.dtype == torch.long
    assert torch.equal(p.corrupted_lengths, p.lengths) and len(p.corrupted_texts) == 12
    for i in range(12):
        n = int(p.lengths[i])
        assert (c[i, n:] == pad_id(tok)).all()
        if bos:
            assert int(c[i, 0]) == int(p.tokens[i, 0]) == tok.bos_token_id
        assert changed(p, i), "the corrupted prompt must differ from the clean one"
        assert p.corrupted_texts[i] != p.texts[i]
    # the clean prompts do not depend on the corruption: a second build gives the same both
    q = get_task(name).make_prompts(tok, 12, seed=3, prepend_bos=bos)
    assert torch.equal(q.tokens, p.tokens) and torch.equal(q.corrupted_tokens, c)


def test_ioi_is_the_abc_prompt(tok: GPT2TokenizerFast) -> None:
    p = get_task("ioi").make_prompts(tok, 30, seed=0, prepend_bos=True)
    for i in range(30):
        r, n = p.roles[i], int(p.lengths[i])
        assert changed(p, i) == sorted([r["IO"], r["S1"], r["S2"], n - 1])
        x, y, z, last = words(tok, p, i, [r["IO"], r["S1"], r["S2"], n - 1])
        names = {x, y, z}
        assert len(names) == 3 and last == x
        assert not names & {" " + p.meta[i]["IO"], " " + p.meta[i]["S"]}
        # the corrupted text is that sentence, and GPT-2 tokenizes it into the corrupted row
        assert tok(p.corrupted_texts[i])["input_ids"] == p.corrupted_tokens[i, 1:n].tolist()
        assert p.corrupted_texts[i].endswith(x)


def test_gt_is_the_01_year(tok: GPT2TokenizerFast) -> None:
    p = get_task("gt").make_prompts(tok, 40, seed=1)
    for i in range(40):
        assert changed(p, i) == [p.roles[i]["YY"]] and words(tok, p, i, [p.roles[i]["YY"]]) == ["01"]
        xx = p.meta[i]["XX"]
        assert f"the year {xx}01 to the year {xx}" in p.corrupted_texts[i]
        if xx != 10:  # " 1001" is not " 10" + "01" for GPT-2 (documented in the gt module)
            assert tok(p.corrupted_texts[i])["input_ids"] == p.corrupted_tokens[i].tolist()


def test_gp_is_the_opposite_gender_name(tok: GPT2TokenizerFast) -> None:
    p = get_task("gp").make_prompts(tok, 100, seed=0)
    for i in range(100):
        pos = p.roles[i]["name"]
        assert changed(p, i) == [pos]
        (swapped,) = words(tok, p, i, [pos])
        clean_male = p.meta[i]["name"] in gp_mod.MALE_NAMES
        assert (swapped.strip() in gp_mod.FEMALE_NAMES) == clean_male
        assert (swapped.strip() in gp_mod.MALE_NAMES) == (not clean_male)
        assert p.corrupted_texts[i] == p.texts[i].replace(p.meta[i]["name"], swapped.strip(), 1)


def test_induction_is_a_fresh_block(tok: GPT2TokenizerFast) -> None:
    L = 6
    p = get_task("induction", seq_len=L).make_prompts(tok, 10, seed=2)
    for i in range(10):
        clean, corrupt = p.tokens[i].tolist(), p.corrupted_tokens[i].tolist()
        assert corrupt[L:] == clean[L:]  # the second copy is untouched
        assert not set(corrupt[:L]) & set(clean[:L]) and len(set(corrupt[:L])) == L
        end = int(p.end[i])
        assert corrupt[end] not in corrupt[:end]  # nothing for an induction head to copy


def test_subset_keeps_corrupted_consistent(tok: GPT2TokenizerFast) -> None:
    p = get_task("ioi").make_prompts(tok, 6, seed=0)
    q = p.subset([4, 1])
    assert q.corrupted_texts == [p.corrupted_texts[4], p.corrupted_texts[1]]
    assert torch.equal(q.corrupted_tokens, p.corrupted_tokens[[4, 1]])
    assert torch.equal(q.corrupted_lengths, p.corrupted_lengths[[4, 1]])
    assert q.corrupted_tokens.shape[1] == q.tokens.shape[1]


def test_require_corrupted_errors(tok: GPT2TokenizerFast) -> None:
    p = get_task("gp").make_prompts(tok, 4, seed=0)
    bare = TaskPrompts(**{**p.__dict__, "corrupted_tokens": None, "corrupted_lengths": None})
    with pytest.raises(CorruptedPromptsError, match="act_patch needs a corrupted counterpart") as err:
        bare.require_corrupted("act_patch")
    assert isinstance(err.value, AttncommError) and "'gp'" in str(err.value)
    # a longer corrupted prompt at row 2: both are padded to the longer width
    rows = [p.tokens[i, : int(p.lengths[i])].tolist() for i in range(4)]
    crow = [list(r) for r in rows]
    crow[2] = crow[2] + [crow[2][-1]]
    texts = list(p.corrupted_texts)
    built = get_task("gp")._assemble(
        tok, rows, p.texts, p.roles, p.correct, p.wrong, p.meta, False, crow, texts
    )
    assert built.tokens.shape == built.corrupted_tokens.shape == (4, p.tokens.shape[1] + 1)
    with pytest.raises(CorruptedPromptsError, match=r"prompt 2 \(1 of 4 prompts differ\)"):
        built.require_corrupted("act_patch")
    assert torch.equal(built.require_corrupted("eap", equal_lengths=False), built.corrupted_tokens)


def _toy(name: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, AppConfig)
    return load_model(app.model)


@pytest.mark.parametrize("name", ["toy-ioi", "toy-induction"])
def test_corruption_removes_the_behaviour_on_the_toys(name: str) -> None:
    """The metric of a corrupted run (clean answers at the clean ``end``) collapses on the trained toys."""
    if not (toy_dir(name) / "config.json").is_file():
        pytest.skip(f"toy {name} is not shipped")
    model = _toy(name)
    task_name, options = TOY_TASKS[name]
    task = get_task(task_name, **options)
    p = task.make_prompts(model.tokenizer, 40, seed=4242, prepend_bos=model.cfg.prepend_bos)
    with torch.no_grad():
        clean_logits, _ = model.run_with_cache(p.tokens, [])
        corrupt_logits, _ = model.run_with_cache(p.require_corrupted("test"), [])
    clean = task.metric(clean_logits.double(), p).mean()
    corrupt = task.metric(corrupt_logits.double(), p).mean()
    assert clean > 1.0 and corrupt < 0.5 * clean, (float(clean), float(corrupt))
