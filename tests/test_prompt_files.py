"""Prompt-file tasks: the file formats researchers have (our JSONL, EAP-IG/MIB CSV, auto-circuit JSON),
answers, dropped rows, roles, metric, the packaged seed tasks, the whole pipeline on tiny models, and
every bad input through the CLI (exit 2, one message, no traceback)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
from transformers import GPT2TokenizerFast

from attncomm.io.prompt_files import PromptFileError, read_prompt_file
from attncomm.models.gpt2_tokenizer import gpt2_tokenizer
from attncomm.runtime.registry import RunContext, get_stage
from attncomm.stages.pipeline import run_pipeline
from attncomm.tasks import get_task, task_run_name
from attncomm.tasks.base import CorruptedPromptsError
from attncomm.tasks.file_tasks import seed_task_path
from attncomm.tasks.seed_data import generate
from tests.conftest import compose_app
from tests.fakes import RecordingTracker

REPO_ROOT = Path(__file__).resolve().parents[1]

SYLLOGISM = {
    "prompt": "All birds are endothermic, not ectothermic. Dogs are birds. Therefore, dogs are",
    "corrupted": "All birds are ectothermic, not endothermic. Dogs are birds. Therefore, dogs are",
    "answer": " endothermic",
    "wrong": " ectothermic",
}


@pytest.fixture(scope="module")
def tok() -> GPT2TokenizerFast:
    return gpt2_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ids(tok: GPT2TokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def eap_csv(tmp_path: Path, tok: GPT2TokenizerFast) -> Path:
    """An EAP-IG IOI-style CSV: clean, corrupted, correct_idx, incorrect_idx (token ids)."""
    lines = ["clean,corrupted,correct_idx,incorrect_idx"]
    for io, s, c in (("Mary", "John", "Anna"), ("Paul", "Lisa", "Mark"), ("Kate", "Ryan", "Jack")):
        clean = f"When {io} and {s} went to the store, {s} gave a drink to"
        corrupt = f"When {io} and {s} went to the store, {c} gave a drink to"
        lines.append(f'"{clean}","{corrupt}",{ids(tok, " " + io)[0]},{ids(tok, " " + s)[0]}')
    lines.append(lines[1])  # an exact duplicate: dropped and counted
    path = tmp_path / "eap_ioi.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def autocircuit_json(tmp_path: Path) -> Path:
    """auto-circuit's format: several answers per prompt, shared word_idxs."""
    data = {
        "prompts": [
            {
                "clean": f"The capital of {country} is",
                "corrupt": f"The capital of {other} is",
                "answers": answers,
                "wrong_answers": wrong,
            }
            for country, other, answers, wrong in (
                ("France", "Spain", [" Paris"], [" Madrid", " London"]),
                ("Spain", "France", [" Madrid"], [" Paris"]),
                ("England", "Italy", [" London"], [" Rome", " Paris"]),
            )
        ],
        "word_idxs": {"country": -2},
    }
    path = tmp_path / "capitals.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- formats


def test_jsonl_rows_roles_padding_and_multi_token_answers(tmp_path: Path, tok, caplog) -> None:
    rows = [
        {**SYLLOGISM, "roles": {"category": "birds", "noun": "dogs", "first": 0}},
        {"prompt": "1 2 3 4", "corrupted": "1 3 4 2", "answer": " 5", "wrong": " 3"},
        {"prompt": "1 2 3 4", "corrupted": "1 3 4 2", "answer": " 5", "wrong": " 3"},  # duplicate
        {
            "prompt": "All fish are bipedal",
            "corrupted": "All fish are quadrupedal",
            "answer": " ab",
            "wrong": " abc",
        },
    ]
    task = get_task("file", path=write_jsonl(tmp_path / "mine.jsonl", rows))
    with caplog.at_level(logging.WARNING):
        p = task.make_prompts(tok, 2, prepend_bos=True)
    report = p.extra["prompt_file"]
    assert report["rows_read"] == 4 and report["rows_dropped"] == 2 and report["rows_used"] == 2
    assert report["dropped_reasons"] == {
        "duplicate of an earlier row": 1,
        "answer and wrong answer start with the same token": 1,  # " ab" / " abc" share " ab"
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("first token is used" in w for w in warnings) == 1  # logged once
    assert sum("dropped 2" in w for w in warnings) == 1
    # tokens: BOS + the prompt, right padded; end = the last prompt token
    for i, text in enumerate([SYLLOGISM["prompt"], "1 2 3 4"]):
        want = [tok.bos_token_id] + ids(tok, text)
        assert p.tokens[i, : len(want)].tolist() == want and int(p.lengths[i]) == len(want)
        assert int(p.end[i]) == len(want) - 1 and p.labels[i][len(want) - 1] == "end"
        assert p.labels[i][0] == "starts" and p.labels[i][len(want) - 3] == "end-2"
    assert (p.tokens[1, int(p.lengths[1]) :] == tok.eos_token_id).all()
    assert int(p.correct[0]) == ids(tok, " endothermic")[0] and int(p.wrong[0]) == ids(tok, " ectothermic")[0]
    # roles from the file win over the end-relative names; a word is its last token, an index counts
    # tokens without BOS
    labels = p.labels[0]
    birds = ids(tok, "All birds")
    assert labels[len(birds)] == "category" and tok.decode([int(p.tokens[0, len(birds)])]) == " birds"
    noun_pos = len(ids(tok, SYLLOGISM["prompt"])) - 1  # " dogs" is the last-but-one prompt token
    assert labels[noun_pos] == "noun" and labels[1] == "first"
    assert p.require_corrupted("act_patch").shape == p.tokens.shape


def test_strict_answers_refuses_multi_token(tmp_path: Path, tok) -> None:
    task = get_task("file", path=write_jsonl(tmp_path / "s.jsonl", [SYLLOGISM]), strict_answers=True)
    with pytest.raises(PromptFileError, match=r"s.jsonl line 1: the answer ' endothermic' is \d tokens"):
        task.make_prompts(tok, 1)


def test_eap_csv_token_ids_and_label_column(tmp_path: Path, tok) -> None:
    p = get_task("file", path=eap_csv(tmp_path, tok)).make_prompts(tok, 3)
    assert p.extra["prompt_file"]["rows_dropped"] == 1
    assert [m["answers"] for m in p.meta] == [[" Mary"], [" Paul"], [" Kate"]]
    assert [m["wrong_answers"] for m in p.meta] == [[" John"], [" Lisa"], [" Ryan"]]
    assert p.corrupted_texts[0].endswith("Anna gave a drink to")
    # the `label` column: one id (no wrong answer: compared with the mean logit) or [correct, wrong]
    path = tmp_path / "label.csv"
    path.write_text(f'clean,corrupted,label\nThe cat,The dog,{ids(tok, " sat")[0]}\nA,B,"[10, 11]"\n')
    q = get_task("file", path=path).make_prompts(tok, 2)
    assert q.wrong.tolist() == [-1, 11] and q.correct.tolist() == [ids(tok, " sat")[0], 10]


def test_autocircuit_json_several_answers(tmp_path: Path, tok) -> None:
    p = get_task("file", path=autocircuit_json(tmp_path)).make_prompts(tok, 3)
    assert p.meta[0]["answers"] == [" Paris"] and p.meta[0]["wrong_answers"] == [" Madrid", " London"]
    assert p.labels[0][len(ids(tok, "The capital of"))] == "country"
    logits = torch.zeros(3, p.tokens.shape[1], len(tok), dtype=torch.float64)
    end = int(p.end[0])
    logits[0, end, ids(tok, " Paris")[0]] = 3.0
    logits[0, end, ids(tok, " Madrid")[0]] = 1.0
    # mean of the answers (3) minus the mean of the wrong answers ((1 + 0) / 2)
    assert float(task_metric(p, logits)[0]) == pytest.approx(2.5)


def task_metric(p, logits):
    return get_task("file", path=p.extra["prompt_file"]["path"]).metric(logits, p)


def test_metric_is_resid_dot_direction(tmp_path: Path, tok) -> None:
    clean = {k: v for k, v in SYLLOGISM.items() if k != "corrupted"}
    rows = [
        clean,
        {"prompt": "1 2 3", "answer": " 4"},
        {"prompt": "Paris is in", "answer": [" France", " Europe"], "wrong": " Spain"},
    ]
    task = get_task("file", path=write_jsonl(tmp_path / "m.jsonl", rows))
    p = task.make_prompts(tok, 3)
    assert p.corrupted_tokens is None
    with pytest.raises(CorruptedPromptsError, match="act_patch needs a corrupted counterpart"):
        p.require_corrupted("act_patch")
    g = torch.Generator().manual_seed(0)
    W_U = torch.randn(8, len(tok), generator=g, dtype=torch.float64)
    resid = torch.randn(3, p.tokens.shape[1], 8, generator=g, dtype=torch.float64)
    expected = (resid[torch.arange(3), p.end] * task.direction(W_U, p)).sum(-1)
    torch.testing.assert_close(task.metric(resid @ W_U, p), expected)
    final = (resid @ W_U)[torch.arange(3), p.end]
    torch.testing.assert_close(task.metric(resid @ W_U, p)[1], final[1, ids(tok, " 4")[0]] - final[1].mean())
    logits = torch.zeros(3, p.tokens.shape[1], len(tok))
    logits[2, int(p.end[2]), ids(tok, " Europe")[0]] = 1.0  # any of the answers is correct
    assert task.is_correct(logits, p).tolist()[2] is True


def test_unequal_corrupted_lengths_error_names_the_row(tmp_path: Path, tok) -> None:
    rows = [SYLLOGISM, {**SYLLOGISM, "corrupted": "All birds are cold. Dogs are birds. Therefore, dogs are"}]
    p = get_task("file", path=write_jsonl(tmp_path / "u.jsonl", rows)).make_prompts(tok, 2)
    assert p.corrupted_tokens.shape == p.tokens.shape
    with pytest.raises(CorruptedPromptsError, match=r"act_patch .*/u.jsonl line 2 \(1 of 2 prompts differ\)"):
        p.require_corrupted("act_patch")
    assert p.require_corrupted("eap", equal_lengths=False) is p.corrupted_tokens


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([SYLLOGISM, {"prompt": "1 2 3", "answer": " 4"}], "line 2: no corrupted prompt, while other rows"),
        ([{"prompt": "1 2 3", "answer": " 4", "roles": {"x": "seven"}}], "role 'x' names the word 'seven'"),
        ([{"prompt": "1 2 3", "answer": " 4", "roles": {"end": 0}}], "role 'end' is a built-in position"),
        ([{"prompt": "1 2 3", "answer": " 4", "roles": {"x": 9}}], "role 'x' at token index 9"),
        ([{"prompt": "1 2 3", "answer": " 4", "roles": ["x"]}], "'roles' must map role names"),
        ([{"prompt": "1 2 3", "label": "[1, 2, 3]"}], "column 'label' holds 3 ids"),
        ([{"prompt": "1 2 3", "correct_idx": "four"}], "column 'correct_idx' must hold a token id"),
        ([{"prompt": "1 2 3", "corrupted": "", "answer": " 4"}], "empty corrupted prompt"),
    ],
)
def test_structure_errors_name_the_row(tmp_path: Path, tok, rows: list[dict], message: str) -> None:
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(PromptFileError, match=re.escape(message)) as err:
        get_task("file", path=path).make_prompts(tok, len(rows))
    assert str(path) in str(err.value)


def test_too_few_rows_says_how_many(tmp_path: Path, tok) -> None:
    path = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "1 2 3", "answer": " 4"}])
    with pytest.raises(PromptFileError, match=r"1 usable rows .* set task.n_prompts=1"):
        get_task("file", path=path).make_prompts(tok, 5)
    with pytest.raises(PromptFileError, match="set task.path=FILE"):
        get_task("file")


def test_run_name_of_a_file_task() -> None:
    class Cfg:
        name, path = "file", "/data/My Prompts.v2.jsonl"

    assert task_run_name(Cfg) == "file-My_Prompts.v2"


# ------------------------------------------------------------------------------------- seed tasks


def test_seed_files_are_what_the_script_generates(tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    for name, rows in (
        ("syllogism", generate.syllogism_rows(rng)),
        ("sequence", generate.sequence_rows(rng)),
    ):
        generate.write_jsonl(tmp_path / f"{name}.jsonl", rows)
        assert (tmp_path / f"{name}.jsonl").read_text() == seed_task_path(name).read_text(), name


def test_seed_tasks(tok) -> None:
    syl = get_task("syllogism").make_prompts(tok, 80)
    pairs = {tuple(sorted(p)) for p in generate.DESCRIPTOR_PAIRS}
    for i in range(80):
        row = json.loads(seed_task_path("syllogism").read_text().splitlines()[i])
        answer, wrong = row["answer"].strip(), row["wrong"].strip()
        assert tuple(sorted((answer, wrong))) in pairs
        assert (
            f"are {answer}, not {wrong}." in syl.texts[i]
            and f"are {wrong}, not {answer}." in syl.corrupted_texts[i]
        )
    assert {
        (r["answer"], r["wrong"])
        for r in map(json.loads, seed_task_path("syllogism").read_text().splitlines())
    } >= {(" endothermic", " ectothermic"), (" ectothermic", " endothermic")}
    syl.require_corrupted("act_patch")  # GPT-2: the swapped descriptors keep the length
    seq = get_task("sequence").make_prompts(tok, len(read_prompt_file(seed_task_path("sequence"))))
    seq.require_corrupted("act_patch")
    texts = dict(zip(seq.texts, [m["answers"][0] for m in seq.meta], strict=True))
    assert texts["1 2 3 4"] == " 5" and texts["January February March"] == " April"
    assert texts["one two three"] == " four"
    for text, corrupted in zip(seq.texts, seq.corrupted_texts, strict=True):
        assert sorted(text.split()) == sorted(corrupted.split()) and text != corrupted


# --------------------------------------------------------------------------- pipeline on tiny models


@pytest.mark.slow
@pytest.mark.parametrize("which", ["syllogism", "sequence", "eap_csv", "autocircuit"])
def test_pipeline_on_a_prompt_file(tmp_path: Path, tok, which: str) -> None:
    task = {
        "syllogism": ["task=syllogism"],
        "sequence": ["task=sequence"],
        "eap_csv": ["task=file", f"task.path={eap_csv(tmp_path, tok)}"],
        "autocircuit": ["task=file", f"task.path={autocircuit_json(tmp_path)}"],
    }[which]
    model = "tiny-pythia" if which == "sequence" else "tiny-gpt2"
    app = compose_app(
        [
            f"model={model}",
            *task,
            "task.n_prompts=3",
            "stage=pipeline",
            "pipeline.stages=[trace,unify,interventions,prune]",
            "trace.skip_incorrect=false",
            "prune.n_min=1",
            f"paths.root={tmp_path / 'out'}",
            "logger.mode=disabled",
        ]
    )
    ctx = RunContext.from_config(app)
    summary = run_pipeline(app, ctx)
    name = {"eap_csv": "file-eap_ioi", "autocircuit": "file-capitals"}.get(which, which)
    assert ctx.task_name == name and f"/{model}/{name}/" in str(ctx.run_dir)
    manifest = json.loads((ctx.run_dir / "manifest.json").read_text())
    assert {"trace", "unify", "interventions", "prune"} <= set(manifest["stages"])
    assert manifest["stages"]["trace"]["prompt_file"]["rows_used"] == 3
    (pruned,) = ctx.run_dir.glob("pruned_graphs*/*_0.0.graphml")
    assert nx.read_graphml(pruned).number_of_edges() > 0, summary
    assert list(ctx.run_dir.glob(f"interventions_graph_{model}_{name}_n3_*.graphml"))


@pytest.mark.slow
def test_describe_reports_rows_and_logs_drops(tmp_path: Path, tok, caplog) -> None:
    app = compose_app(
        [
            "model=tiny-gpt2",
            "task=file",
            f"task.path={eap_csv(tmp_path, tok)}",
            "task.n_prompts=2",
            "stage=describe",
            f"paths.root={tmp_path / 'out'}",
        ]
    )
    tracker = RecordingTracker()
    ctx = RunContext.from_config(app, tracker=tracker)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="attncomm.stages.describe"):
        summary = get_stage("describe").run(app, ctx)
    printed = caplog.text
    assert "read 4 rows, dropped 1 (duplicate of an earlier row: 1)" in printed
    assert "eap_ioi.csv row 1: [' Mary'] | [' John']" in printed
    assert summary["file_rows_read"] == 4 and summary["file_rows_dropped"] == 1
    assert summary["file_rows_used"] == 2 and summary["n_prompts"] == 2
    assert tracker.logged["task_file/rows_dropped"] == 1
    assert tracker.logged["task_file/dropped/duplicate of an earlier row"] == 1


# ------------------------------------------------------------------------- bad input, through the CLI

BAD_INPUTS = {
    "missing_column": (
        "bad.jsonl",
        b'{"prompt": "The cat sat on the", "wrong": " dog"}\n',
        "missing answer column",
    ),
    "empty_prompt": ("bad.jsonl", b'{"prompt": "  ", "answer": " mat"}\n', "empty prompt"),
    "answer_is_wrong": (
        "bad.csv",
        b"clean,corrupted,correct,incorrect\nThe cat sat on the,The dog sat on the, mat, mat\n",
        "is also the wrong answer",
    ),
    "unknown_format": ("bad.txt", b"The cat sat on the\n", "unknown prompt file format '.txt'"),
    "not_utf8": (
        "bad.jsonl",
        '{"prompt": "caf\u00e9 au", "answer": " lait"}\n'.encode("latin-1"),
        "not UTF-8",
    ),
    "inexpressible": (
        "bad.csv",
        b"clean,corrupted,correct_idx,incorrect_idx\nThe cat,The dog,99999999,5\n",
        "is not in the tokenizer's vocabulary",
    ),
    "strict_multi_token": ("bad.jsonl", json.dumps(SYLLOGISM).encode() + b"\n", "strict_answers=true"),
}


@pytest.mark.cli
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_prompt_files_exit_2(tmp_path: Path, case: str) -> None:
    name, content, message = BAD_INPUTS[case]
    path = tmp_path / name
    path.write_bytes(content)
    args = ["model=tiny-gpt2", "task=file", f"task.path={path}", "task.n_prompts=1", "stage=describe"]
    args += [f"paths.root={tmp_path / 'out'}", "logger.mode=disabled"]
    if case == "strict_multi_token":
        args.append("task.strict_answers=true")
    env = dict(os.environ, ATTNCOMM_CACHE=os.environ.get("ATTNCOMM_CACHE", str(tmp_path / "cache")))
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and str(path) in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    if case != "unknown_format":
        assert "line 1" in errors[0] or "row 1" in errors[0]
