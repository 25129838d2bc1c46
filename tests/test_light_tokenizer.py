"""The light GPT-2 tokenizer of tracing's fast start equals the HF tokenizer it replaces on every call
attncomm makes: ids, character offsets, decoding of the whole vocabulary, special tokens, and the
prompts of every built-in task."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from attncomm.models.adapter import _offline_gpt2_tokenizer_dir
from attncomm.models.light_tokenizer import LightTokenizer, load_light_tokenizer
from attncomm.tasks import FILE_TASKS, TASK_NAMES, get_task
from tests.models_fixtures import test_cache_dir

AWKWARD = [
    "",
    " ",
    "When Mary and John went to the store, John gave a drink to Mary",
    "  two  spaces\tand a tab\nand a newline\r\n",
    "So, Dr. O'Neil -- who'd said \"no\" twice -- tried again at 3:45pm?",
    "<|endoftext|> inside <|endoftext|>text",
    "é ü ß 漢字 한국어 🙂👍🏽 \u200b zero width \x00 nul \x7f del",
    "The war lasted from the year 1732 to the year 17",
    "x" * 3000,
]


@pytest.fixture(scope="module")
def pair() -> tuple[object, LightTokenizer]:
    where = _offline_gpt2_tokenizer_dir(test_cache_dir())
    light = load_light_tokenizer(where)
    assert light is not None
    return AutoTokenizer.from_pretrained(str(where)), light


def test_encodes_like_the_hf_tokenizer(pair: tuple) -> None:
    hf, light = pair
    rng = random.Random(0)
    texts = AWKWARD + ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(60)) for _ in range(50)]
    for text in texts:
        theirs = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ours = light(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ours["input_ids"] == list(theirs["input_ids"]), text
        assert ours["offset_mapping"] == [tuple(o) for o in theirs["offset_mapping"]], text
        assert light(text)["input_ids"] == list(hf(text)["input_ids"]), text


def test_decodes_the_whole_vocabulary_like_the_hf_tokenizer(pair: tuple) -> None:
    hf, light = pair
    assert len(light) == len(hf)
    for i in range(len(hf)):
        assert light.decode([i]) == hf.decode([i]), i
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 30))]
        assert light.decode(ids) == hf.decode(ids)
        assert light.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert light.convert_ids_to_tokens([0, 50256]) == hf.convert_ids_to_tokens([0, 50256])


def test_special_tokens_are_the_hf_tokenizers(pair: tuple) -> None:
    hf, light = pair
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "mask_token"):
        assert getattr(light, attr) == getattr(hf, attr), attr
        assert getattr(light, attr + "_id") == getattr(hf, attr + "_id"), attr
    assert light.all_special_ids == hf.all_special_ids
    assert light.is_fast and light.padding_side == "right"
    with pytest.raises(AttributeError):
        light.no_such_thing  # noqa: B018


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if n not in FILE_TASKS])
def test_every_task_makes_the_same_prompts(pair: tuple, name: str) -> None:
    hf, light = pair
    hf.padding_side = "right"
    task = get_task(name)
    for prepend_bos in (False, True):
        theirs = task.make_prompts(hf, 16, seed=5, prepend_bos=prepend_bos)
        ours = task.make_prompts(light, 16, seed=5, prepend_bos=prepend_bos)
        assert torch.equal(ours.tokens, theirs.tokens) and ours.texts == theirs.texts
        assert ours.labels == theirs.labels
        assert ours.token_labels(light) == theirs.token_labels(hf)


def test_other_tokenizers_are_not_served(tmp_path: Path) -> None:
    source = _offline_gpt2_tokenizer_dir(test_cache_dir())
    assert load_light_tokenizer(tmp_path) is None  # no files
    for change in (
        {"tokenizer_class": "LlamaTokenizer"},
        {"tokenizer_class": None},
        {"clean_up_tokenization_spaces": True},
        {"add_bos_token": True},
        {"add_prefix_space": True},
    ):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(source, d)
        config = json.loads((d / "tokenizer_config.json").read_text()) | change
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        assert load_light_tokenizer(d) is None, change
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "tokenizer.json").write_text("{not json")
    assert load_light_tokenizer(broken) is None
