"""Tests of the tasks: data against tasks.yaml, role positions checked by decoding, rules, metrics, errors.

Expected positions are computed independently of the generators: by tokenizing the text up to a word
(GPT-2 splits words at spaces) and by decoding the token found there.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2TokenizerFast

from attncomm.models.gpt2_tokenizer import gpt2_tokenizer
from attncomm.tasks import (
    TASK_NAMES,
    TaskPrompts,
    TaskTokenizerError,
    UnknownTaskError,
    get_task,
)
from attncomm.tasks import gp as gp_mod
from attncomm.tasks import gt as gt_mod
from attncomm.tasks import ioi as ioi_mod

SEEDS = [0, 1, 7]


@pytest.fixture(scope="module")
def tok() -> GPT2TokenizerFast:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def spec(reference_dir: Path) -> dict:
    return yaml.safe_load((reference_dir / "tasks.yaml").read_text())


@pytest.fixture(scope="module")
def char_tok(tok: GPT2TokenizerFast) -> GPT2TokenizerFast:
    """A character-level (byte-level, no merges) tokenizer that cannot express any of the three tasks."""
    vocab = {t: i for t, i in tok.get_vocab().items() if i < 256}
    vocab["<|endoftext|>"] = 256
    return GPT2TokenizerFast(vocab=vocab, merges=[], bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def ids(tok: GPT2TokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def dec(tok: GPT2TokenizerFast, prompts: TaskPrompts, i: int, pos: int) -> str:
    return tok.decode([int(prompts.tokens[i, pos])])


def pos_of_char(tok: GPT2TokenizerFast, text: str, char: int, offset: int) -> int:
    """Position of the token starting at character ``char`` (a word boundary), by prefix tokenization."""
    return len(ids(tok, text[:char])) + offset


def expected_labels(roles: dict[str, int], role_names: list[str]) -> dict[int, str]:
    """Independent collision rule: for each position, the role that comes last in ``role_names``."""
    out: dict[int, str] = {}
    for pos in set(roles.values()):
        here = [r for r in roles if roles[r] == pos]
        out[pos] = max(here, key=role_names.index)
    return out


# ------------------------------------------------------------------------------------------- data


def test_package_data_matches_reference(spec: dict) -> None:
    assert list(ioi_mod.NAMES) == spec["ioi"]["names"]
    assert list(ioi_mod.PLACES) == spec["ioi"]["places"]
    assert list(ioi_mod.OBJECTS) == spec["ioi"]["objects"]
    assert list(ioi_mod.BABA_TEMPLATES) == spec["ioi"]["baba_templates"]
    assert list(gt_mod.NOUNS) == spec["gt"]["nouns"]
    assert list(gp_mod.TEMPLATES) == spec["gp"]["templates"]
    assert list(gp_mod.MALE_NAMES) == spec["gp"]["male_names"]
    assert list(gp_mod.FEMALE_NAMES) == spec["gp"]["female_names"]


def test_abba_templates_swap_first_clause_only() -> None:
    for baba, abba in zip(ioi_mod.BABA_TEMPLATES, ioi_mod.ABBA_TEMPLATES, strict=True):
        first_b, first_a = baba.index("[B]"), baba.index("[A]")
        assert first_b < first_a
        assert abba.index("[A]") == first_b and abba.index("[B]") == first_a
        # the second clause keeps [B] as subject and [A] as indirect object
        assert abba[first_a + 3 :] == baba[first_a + 3 :]
        assert abba.endswith(" [A]")


def test_task_registry_and_published_root_names() -> None:
    assert set(TASK_NAMES) == {"ioi", "gt", "gp", "induction", "file", "syllogism", "sequence"}
    assert get_task("ioi").direction_name == "IO-S direction"
    assert get_task("gt").direction_name == "True YY - False YY"
    assert get_task("gp").direction_name == "Correct - Incorrect pronoum"
    assert get_task("ioi").role_names == [
        "IO", "IO-1", "IO+1", "S1", "S1-1", "S1+1", "S2", "S2-1", "S2+1",
        "end", "end-1", "starts", "punct", "verb",
    ]  # fmt: skip


# -------------------------------------------------------------------------------------------- IOI


def check_ioi_prompt(tok: GPT2TokenizerFast, p: TaskPrompts, i: int, bos: bool) -> None:
    text, meta, roles = p.texts[i], p.meta[i], p.roles[i]
    io, s = meta["IO"], meta["S"]
    off = 1 if bos else 0
    assert text == ioi_mod.fill_template(meta["template"], io, s, meta["PLACE"], meta["OBJECT"])
    row = p.tokens[i, : int(p.lengths[i])].tolist()
    assert row == ([tok.bos_token_id] if bos else []) + ids(tok, text)
    assert (p.tokens[i, int(p.lengths[i]) :] == tok.eos_token_id).all()
    words = [m.start() for m in re.finditer(rf" {io}\b", text)]
    s_words = [m.start() for m in re.finditer(rf" {s}\b", text)]
    assert len(words) == 2 and len(s_words) == 2
    assert roles["IO"] == pos_of_char(tok, text, words[0], off)
    assert roles["S1"] == pos_of_char(tok, text, s_words[0], off)
    assert roles["S2"] == pos_of_char(tok, text, s_words[-1], off)
    assert dec(tok, p, i, roles["IO"]) == f" {io}"
    assert dec(tok, p, i, roles["S1"]) == f" {s}" == dec(tok, p, i, roles["S2"])
    last_to = text.rindex(" to ")
    assert roles["end"] == pos_of_char(tok, text, last_to, off) == int(p.end[i]) == int(p.lengths[i]) - 2
    assert dec(tok, p, i, roles["end"]) == " to" and int(p.tokens[i, roles["end"] + 1]) == int(p.correct[i])
    punct_char = text.rindex(".") if "." in text else text.rindex(",")
    assert roles["punct"] == pos_of_char(tok, text, punct_char, off)
    verb = next(v for v in (" said", " give", " gave") if v in text)
    assert roles["verb"] == pos_of_char(tok, text, text.rindex(verb), off)
    assert dec(tok, p, i, roles["verb"]) == verb
    assert roles["starts"] == 0
    for name in ("IO", "S1", "S2"):
        assert roles[f"{name}-1"] == roles[name] - 1 and roles[f"{name}+1"] == roles[name] + 1
    assert roles["end-1"] == roles["end"] - 1
    assert set(roles) == set(get_task("ioi").role_names)
    assert int(p.correct[i]) == ids(tok, f" {io}")[0] and int(p.wrong[i]) == ids(tok, f" {s}")[0]
    assert p.labels[i] == expected_labels(roles, get_task("ioi").role_names)


@pytest.mark.parametrize("family", ["BABA", "ABBA"])
def test_ioi_every_template_roles(tok: GPT2TokenizerFast, family: str) -> None:
    task = get_task("ioi")
    templates = ioi_mod.BABA_TEMPLATES if family == "BABA" else ioi_mod.ABBA_TEMPLATES
    assert len(templates) == 15
    for k, template in enumerate(templates):
        for bos in (False, True):
            p = task.make_prompts(tok, 2, seed=k, prepend_bos=bos, templates=[template])
            for i in range(len(p)):
                assert p.meta[i]["family"] == family and p.meta[i]["family_index"] == k
                check_ioi_prompt(tok, p, i, bos)
                io, s1 = p.roles[i]["IO"], p.roles[i]["S1"]
                # the method's named collisions (section 4.4)
                if family == "BABA":
                    assert io == s1 + 2 and p.labels[i][io - 1] == "S1+1"
                else:
                    assert s1 == io + 2 and p.labels[i][io + 1] == "S1-1"
                if p.roles[i]["S2+1"] == p.roles[i]["verb"]:
                    assert p.labels[i][p.roles[i]["verb"]] == "verb"
                if p.roles[i]["S1-1"] == p.roles[i]["punct"]:
                    assert p.labels[i][p.roles[i]["punct"]] == "punct"


@pytest.mark.parametrize("seed", SEEDS)
def test_ioi_mixed_prompts(tok: GPT2TokenizerFast, seed: int) -> None:
    p = get_task("ioi").make_prompts(tok, 40, seed=seed)
    allowed = set(ioi_mod.BABA_TEMPLATES[:7]) | set(ioi_mod.ABBA_TEMPLATES[:7])
    for i in range(len(p)):
        m = p.meta[i]
        assert m["template"] in allowed
        assert len({m["IO"], m["S"], m["C"]}) == 3
        assert m["PLACE"] in ioi_mod.PLACES and m["OBJECT"] in ioi_mod.OBJECTS
        check_ioi_prompt(tok, p, i, bos=False)
    many = get_task("ioi").make_prompts(tok, 300, seed=seed)
    assert {m["template"] for m in many.meta} == allowed


def test_ioi_deterministic_and_seed_dependent(tok: GPT2TokenizerFast) -> None:
    task = get_task("ioi")
    a, b, c = (task.make_prompts(tok, 12, seed=s) for s in (3, 3, 4))
    assert a.texts == b.texts and torch.equal(a.tokens, b.tokens) and a.roles == b.roles
    assert a.texts != c.texts


def test_bos_shifts_every_role_but_starts(tok: GPT2TokenizerFast) -> None:
    for name, n in (("ioi", 6), ("gt", 6), ("gp", 10), ("induction", 4)):
        task = get_task(name)
        plain, bos = task.make_prompts(tok, n, seed=2), task.make_prompts(tok, n, seed=2, prepend_bos=True)
        assert plain.texts == bos.texts
        assert (bos.tokens[:, 0] == tok.bos_token_id).all()
        assert torch.equal(bos.lengths, plain.lengths + 1) and torch.equal(bos.end, plain.end + 1)
        for i in range(n):
            length = int(plain.lengths[i])
            assert torch.equal(bos.tokens[i, 1 : length + 1], plain.tokens[i, :length])
            assert bos.roles[i]["starts"] == plain.roles[i]["starts"] == 0
            for role, pos in plain.roles[i].items():
                if role != "starts":
                    assert bos.roles[i][role] == pos + 1, (name, role)


# ------------------------------------------------------------------------------------ greater-than


def independent_valid_years(tok: GPT2TokenizerFast) -> list[int]:
    two_tokens = []
    for year in range(1000, 1900):
        t = ids(tok, f" {year}")
        if len(t) == 2 and tok.decode([t[1]]) == str(year)[2:]:
            two_tokens.append(year)
    centuries: dict[int, list[int]] = {}
    for y in two_tokens:
        centuries.setdefault(y // 100, []).append(y)
    return [y for y in two_tokens if y not in (min(centuries[y // 100]), max(centuries[y // 100]))]


def test_gt_valid_years(tok: GPT2TokenizerFast) -> None:
    assert gt_mod.valid_years(tok) == independent_valid_years(tok)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_gt_prompts_obey_every_rule(tok: GPT2TokenizerFast, seed: int) -> None:
    n = 200
    p = get_task("gt").make_prompts(tok, n, seed=seed)
    valid = independent_valid_years(tok)
    years = [m["year"] for m in p.meta]
    # rule: years from 1000 to 1899
    assert all(1000 <= y <= 1899 for y in years)
    # rule: " XXYY" is exactly two tokens, the second being the two digits YY
    for y in years:
        t = ids(tok, f" {y}")
        assert len(t) == 2 and tok.decode([t[1]]) == f"{y % 100:02d}" and tok.decode([t[0]]) == f" {y // 100}"
    # rule: the first and last valid year of each century are dropped
    for y in years:
        same = [v for v in range(1000, 1900) if v // 100 == y // 100 and len(ids(tok, f" {v}")) == 2]
        same = [v for v in same if tok.decode([ids(tok, f" {v}")[1]]) == f"{v % 100:02d}"]
        assert y != min(same) and y != max(same)
    # rule: sampling balanced over YY = 02..98, cycling
    cycle = [yy for yy in range(2, 99) if any(v % 100 == yy for v in valid)]
    assert [y % 100 for y in years] == [cycle[i % len(cycle)] for i in range(n)]
    assert torch.equal(p.yy, torch.tensor([y % 100 for y in years]))
    # rule: single-token nouns with a leading space, from the list
    for m in p.meta:
        assert m["noun"] in gt_mod.NOUNS and len(ids(tok, f" {m['noun']}")) == 1
    # rule: an end-of-text token, a space, then the sentence
    for i, m in enumerate(p.meta):
        y = m["year"]
        assert p.texts[i] == f"<|endoftext|> The {m['noun']} lasted from the year {y} to the year {y // 100}"
        assert int(p.tokens[i, 0]) == tok.eos_token_id


def test_gt_roles_and_answers(tok: GPT2TokenizerFast) -> None:
    task = get_task("gt")
    p = task.make_prompts(tok, 30, seed=5)
    for i, m in enumerate(p.meta):
        xx, yy = str(m["XX"]), f"{m['YY']:02d}"
        expected = {
            "starts": "<|endoftext|>", "The": " The", "NOUN": f" {m['noun']}", "lasted": " lasted",
            "from": " from", "the": " the", "year": " year", "XX1": f" {xx}", "YY": yy, "to": " to",
            "the (1)": " the", "year (1)": " year", "end": f" {xx}",
        }  # fmt: skip
        assert set(p.roles[i]) == set(expected)
        for role, word in expected.items():
            assert dec(tok, p, i, p.roles[i][role]) == word, role
        assert sorted(p.roles[i].values()) == list(range(13))
        assert p.labels[i] == {pos: role for role, pos in p.roles[i].items()}
        assert int(p.end[i]) == 12 and int(p.wrong[i]) == -1
        assert tok.decode([int(p.correct[i])]) == yy
    assert [tok.decode([int(t)]) for t in p.two_digit_ids] == [f"{k:02d}" for k in range(100)]
    assert task.make_prompts(tok, 30, seed=5).texts == p.texts
    assert task.make_prompts(tok, 30, seed=6).texts != p.texts


def test_gt_is_correct(tok: GPT2TokenizerFast) -> None:
    task = get_task("gt")
    p = task.make_prompts(tok, 4, seed=0)
    digits = {f"{k:02d}": ids(tok, f"{k:02d}")[0] for k in range(100)}
    logits = torch.zeros(4, p.tokens.shape[1], len(tok))
    yy = p.yy.tolist()
    picks = [digits[f"{yy[0] + 1:02d}"], digits[f"{yy[1]:02d}"], ids(tok, " the")[0], digits["99"]]
    for i, t in enumerate(picks):
        logits[i, int(p.end[i]), t] = 5.0
    assert task.is_correct(logits, p).tolist() == [True, False, False, True]


# --------------------------------------------------------------------------------- gendered pronoun


def test_gp_published_prompts_and_roles(tok: GPT2TokenizerFast) -> None:
    task = get_task("gp")
    p = task.make_prompts(tok, 100, seed=0)
    names = gp_mod.MALE_NAMES + gp_mod.FEMALE_NAMES
    expected_texts = [t.format(name=n) for n in names for t in gp_mod.TEMPLATES]
    assert p.texts == expected_texts
    assert task.make_prompts(tok, 100, seed=9).texts == expected_texts  # all 100: the published order
    he, she = ids(tok, " he")[0], ids(tok, " she")[0]
    order = ["end", "end-1", "punct", "noun", "adj", "I2", "I1", "is", "name"]
    for i, text in enumerate(p.texts):
        n = int(p.lengths[i])
        assert n == 10 and p.tokens[i].tolist() == ids(tok, text)
        for k, role in enumerate(order):  # counted from the end (tasks.yaml)
            assert p.roles[i][role] == n - 1 - k, role
        words = text.replace(",", " ,").split(" ")
        assert dec(tok, p, i, p.roles[i]["name"]) == f" {words[1]}"
        assert dec(tok, p, i, p.roles[i]["punct"]) == ","
        assert dec(tok, p, i, p.roles[i]["end"]) == "'t" and dec(tok, p, i, p.roles[i]["end-1"]) == " isn"
        assert dec(tok, p, i, p.roles[i]["noun"]) == f" {words[6]}"
        assert p.roles[i]["So"] == p.roles[i]["starts"] == 0 and p.labels[i][0] == "starts"
        assert "So" not in p.labels[i].values() and "end-2" not in p.roles[i]
        male = i < 50
        assert (int(p.correct[i]), int(p.wrong[i])) == ((he, she) if male else (she, he))


def test_gp_labels_cover_published_graph_labels(tok: GPT2TokenizerFast, published_gp_dir: Path) -> None:
    p = get_task("gp").make_prompts(tok, 100, seed=0)
    ours = {lab for labels in p.labels for lab in labels.values()}
    published: set[str] = set()
    for path in sorted((published_gp_dir / "traced_graphs").glob("*.graphml"))[:10]:
        for node in re.findall(r'node id="([^"]*)"', path.read_text()):
            published.update(re.findall(r"'([^']*)'", node))
    published -= {"MLP", "AH bias", "Embedding", "Correct - Incorrect pronoum"}
    assert published and published <= ours


def test_gp_subset_and_bos(tok: GPT2TokenizerFast) -> None:
    task = get_task("gp")
    p = task.make_prompts(tok, 10, seed=3)
    idx = [m["prompt_index"] for m in p.meta]
    assert idx == sorted(idx) and len(set(idx)) == 10
    assert p.texts == task.make_prompts(tok, 10, seed=3).texts != task.make_prompts(tok, 10, seed=4).texts
    b = task.make_prompts(tok, 10, seed=3, prepend_bos=True)
    assert all(r["So"] == 1 and r["starts"] == 0 for r in b.roles) and all(lab[1] == "So" for lab in b.labels)
    with pytest.raises(ValueError, match="only 100 distinct prompts"):
        task.make_prompts(tok, 101)


# ----------------------------------------------------------------------------------------- induction


def test_induction_prompts(tok: GPT2TokenizerFast) -> None:
    task = get_task("induction", seq_len=6)
    p = task.make_prompts(tok, 5, seed=1)
    special = set(tok.all_special_ids)
    for i in range(5):
        row = p.tokens[i].tolist()
        seq = row[:6]
        assert row == seq + seq and len(set(seq)) == 6 and not special & set(seq)
        r = p.roles[i]
        assert int(p.end[i]) == r["end"] == 10 and int(p.correct[i]) == row[11] == row[r["next"]]
        assert row[r["prev"]] == row[r["end"]] and r["next"] == r["prev"] + 1
        assert p.labels[i] == expected_labels(r, task.role_names)
    assert torch.equal(p.tokens, task.make_prompts(tok, 5, seed=1).tokens)
    ranged = task.make_prompts(tok, 5, seed=1, token_range=(100, 120))
    assert ((ranged.tokens >= 100) & (ranged.tokens < 120)).all()
    with pytest.raises(ValueError, match="seq_len"):
        get_task("induction", seq_len=2)


# ------------------------------------------------------------------------------- metrics, directions


@pytest.mark.parametrize("name", ["ioi", "gt", "gp", "induction"])
def test_metric_is_resid_dot_direction(tok: GPT2TokenizerFast, name: str) -> None:
    task = get_task(name)
    p = task.make_prompts(tok, 6, seed=4)
    g = torch.Generator().manual_seed(0)
    d_model = 8
    W_U = torch.randn(d_model, len(tok), generator=g, dtype=torch.float64)
    resid = torch.randn(6, p.tokens.shape[1], d_model, generator=g, dtype=torch.float64)
    logits = resid @ W_U
    direction = task.direction(W_U, p)
    assert direction.shape == (6, d_model)
    rows = torch.arange(6)
    expected = (resid[rows, p.end] * direction).sum(-1)
    torch.testing.assert_close(task.metric(logits, p), expected)
    # and the metric as the spec defines it, computed by hand
    final = logits[rows, p.end]
    for i in range(6):
        if name in ("ioi", "gp"):
            want = final[i, p.correct[i]] - final[i, p.wrong[i]]
        elif name == "gt":
            yy, digit = int(p.yy[i]), [ids(tok, f"{k:02d}")[0] for k in range(100)]
            want = final[i, digit[yy + 1 :]].mean() - final[i, digit[: yy + 1]].mean()
        else:
            want = final[i, p.correct[i]] - final[i].mean()
        torch.testing.assert_close(task.metric(logits, p)[i], want)


@pytest.mark.parametrize("name", ["ioi", "gp", "induction"])
def test_is_correct_argmax(tok: GPT2TokenizerFast, name: str) -> None:
    task = get_task(name)
    p = task.make_prompts(tok, 3, seed=0)
    logits = torch.zeros(3, p.tokens.shape[1], len(tok))
    other = [int(p.wrong[0]) if name != "induction" else 0, int(p.correct[1]), int(p.correct[2])]
    for i, t in enumerate(other):
        logits[i, int(p.end[i]), t] = 1.0
    logits[2, int(p.end[2]) - 1, 5] = 10.0  # other positions do not matter
    assert task.is_correct(logits, p).tolist() == [False, True, True]


# ------------------------------------------------------------------------------ labels, subset, errors


def test_token_labels_repeat_suffixes(tok: GPT2TokenizerFast) -> None:
    p = get_task("ioi").make_prompts(tok, 4, seed=0)
    for i, labels in enumerate(p.token_labels(tok)):
        assert sorted(labels) == list(range(int(p.lengths[i])))
        seen: Counter[str] = Counter()
        for pos in range(int(p.lengths[i])):
            text = dec(tok, p, i, pos)
            assert labels[pos] == (text if seen[text] == 0 else f"{text} ({seen[text]})")
            seen[text] += 1
        io, s = p.meta[i]["IO"], p.meta[i]["S"]
        assert labels[p.roles[i]["IO"]] == f" {io}" and labels[p.roles[i]["S2"]] == f" {s} (1)"
        assert labels[int(p.lengths[i]) - 1] == f" {io} (1)"


def test_subset(tok: GPT2TokenizerFast) -> None:
    p = get_task("gt").make_prompts(tok, 5, seed=0)
    q = p.subset([3, 1])
    assert q.texts == [p.texts[3], p.texts[1]] and q.roles == [p.roles[3], p.roles[1]]
    assert torch.equal(q.tokens, p.tokens[[3, 1]]) and torch.equal(q.yy, p.yy[[3, 1]])
    assert torch.equal(q.two_digit_ids, p.two_digit_ids) and q.task == "gt"


def test_errors(tok: GPT2TokenizerFast, char_tok: GPT2TokenizerFast) -> None:
    with pytest.raises(UnknownTaskError, match="ioi, gt, gp, induction"):
        get_task("iio")
    for name in ("ioi", "gt", "gp", "induction", "syllogism", "sequence"):  # file needs a path
        for n in (0, -3):
            with pytest.raises(ValueError, match="positive integer"):
                get_task(name).make_prompts(tok, n, seed=0)
        get_task(name).check_tokenizer(tok)
    for name, what in (("ioi", "names"), ("gt", "two-digit"), ("gp", "pronouns")):
        with pytest.raises(TaskTokenizerError, match=what):
            get_task(name).check_tokenizer(char_tok)
        with pytest.raises(TaskTokenizerError):
            get_task(name).make_prompts(char_tok, 2, seed=0)
    p = get_task("induction").make_prompts(char_tok, 2, seed=0)  # a character tokenizer suffices here
    assert p.tokens.max() < 256
    with pytest.raises(ValueError, match="prompt_type"):
        get_task("ioi").make_prompts(tok, 2, prompt_type="CBA")
    for name in ("gt", "gp", "induction"):  # generic callers may pass IOI's default prompt_type
        assert len(get_task(name).make_prompts(tok, 2, seed=0, prompt_type="mixed")) == 2
        with pytest.raises(TypeError, match="unsupported options"):
            get_task(name).make_prompts(tok, 2, seed=0, prompt_type="BABA")
        with pytest.raises(TypeError, match="unsupported options"):
            get_task(name).make_prompts(tok, 2, seed=0, colour="red")
