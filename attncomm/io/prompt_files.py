"""Read prompt files in the formats researchers already have, into one list of :class:`PromptRow`.

Formats (chosen by the file's extension):

* ``.jsonl`` -- one JSON object per line (our documented format): ``prompt`` (or ``clean``), optional
  ``corrupted`` (or ``corrupt``), ``answer`` (or ``correct``) and optional ``wrong`` (or
  ``incorrect``), each a string or a list of strings, optional ``roles: {name: word or token index}``.
* ``.csv`` -- a header row, then one prompt per row: EAP-IG / MIB's ``clean, corrupted, label`` (the
  correct answer's token id, or ``[correct_id, wrong_id]``) or ``clean, corrupted, correct_idx,
  incorrect_idx`` (token ids), or text answers ``correct, incorrect`` (or ``answer, wrong``).
* ``.json`` -- auto-circuit's ``{"prompts": [{"clean", "corrupt", "answers": [...],
  "wrong_answers": [...]}], "word_idxs"?: {name: token index}}``, or a JSON list of the JSONL objects.

Only the file's structure is checked here (the tokenizer checks are the task's): a file that is not
UTF-8, an unknown extension, malformed JSON, a missing column, an empty prompt or an answer equal to
the wrong answer raise :class:`PromptFileError` naming the file, the row and the fix.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attncomm.errors import AttncommError

#: column aliases, first the name of our JSONL format
CLEAN_KEYS = ("prompt", "clean")
CORRUPTED_KEYS = ("corrupted", "corrupt")
ANSWER_TEXT_KEYS = ("answer", "correct", "answers")
WRONG_TEXT_KEYS = ("wrong", "incorrect", "wrong_answers")
ANSWER_ID_KEYS = ("correct_idx", "label")
WRONG_ID_KEYS = ("incorrect_idx",)
FORMATS = (".jsonl", ".csv", ".json")

#: an answer: its text (tokenized by the model's tokenizer) or a token id
Answer = str | int


class PromptFileError(AttncommError, ValueError):
    """A prompt file that cannot be read as prompts; the message names the file, the row and the fix."""


@dataclass
class PromptRow:
    """One prompt of a file: texts, answers (text or token ids), roles, and where it came from."""

    where: str  # "data.jsonl line 3", "data.csv row 2", "data.json prompts[1]"
    clean: str
    corrupted: str | None
    answers: list[Answer]
    wrong: list[Answer]
    roles: dict[str, str | int] = field(default_factory=dict)

    def key(self) -> tuple[Any, ...]:
        """What makes two rows duplicates of each other."""
        return (self.clean, self.corrupted, tuple(map(str, self.answers)), tuple(map(str, self.wrong)))


def read_prompt_file(path: str | Path) -> list[PromptRow]:
    """The rows of the prompt file at ``path`` (format from its extension), checked for structure."""
    p = Path(path)
    if p.suffix.lower() not in FORMATS:
        raise PromptFileError(
            f"{p}: unknown prompt file format {p.suffix or '(no extension)'!r}; use one of "
            f"{', '.join(FORMATS)} (JSONL: one object per line with prompt, corrupted, answer, wrong; "
            "CSV: clean, corrupted and label or correct_idx/incorrect_idx or correct/incorrect; "
            'JSON: auto-circuit\'s {"prompts": [...]})'
        )
    if not p.is_file():
        raise PromptFileError(
            f"{p}: prompt file not found; set task.path to an existing .jsonl, .csv or .json file"
        )
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise PromptFileError(
            f"{p}: not UTF-8 (byte {err.start}, line {line}: {raw[err.start : err.start + 1]!r}); save the "
            "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
        ) from None
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(p, text)
    elif suffix == ".csv":
        rows = _read_csv(p, text)
    else:
        rows = _read_json(p, text)
    if not rows:
        raise PromptFileError(f"{p}: the file holds no prompts; add at least one row")
    return rows


def _read_jsonl(p: Path, text: str) -> list[PromptRow]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(
                f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line must be one JSON "
                'object such as {"prompt": "...", "answer": " x", "wrong": " y"}'
            ) from None
        rows.append(_row(where, obj))
    return rows


def _read_csv(p: Path, text: str) -> list[PromptRow]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise PromptFileError(f"{p}: the CSV has no header row; the first row must name the columns")
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    rows = []
    for number, record in enumerate(reader, start=1):
        if None in record:
            raise PromptFileError(
                f"{p} row {number}: more fields than the {len(reader.fieldnames)} columns of the header; "
                "quote fields that contain commas"
            )
        rows.append(_row(f"{p} row {number}", {k: v for k, v in record.items() if v is not None}))
    return rows


def _read_json(p: Path, text: str) -> list[PromptRow]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptFileError(
            f"{p}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix the JSON "
            "or use one JSON object per line in a .jsonl file"
        ) from None
    shared_roles: dict[str, Any] = {}
    if isinstance(data, dict):
        if "prompts" not in data or not isinstance(data["prompts"], list):
            raise PromptFileError(
                f'{p}: a JSON object prompt file needs a "prompts" list (auto-circuit\'s format: '
                '{"prompts": [{"clean": ..., "corrupt": ..., "answers": [...], "wrong_answers": [...]}]})'
            )
        shared_roles = data.get("word_idxs") or {}
        if not isinstance(shared_roles, dict):
            raise PromptFileError(f'{p}: "word_idxs" must map role names to token indices')
        items = data["prompts"]
        label = "prompts"
    elif isinstance(data, list):
        items, label = data, ""
    else:
        raise PromptFileError(f'{p}: expected a JSON object with a "prompts" list or a JSON list of rows')
    rows = []
    for k, obj in enumerate(items):
        row = _row(f"{p} {label}[{k}]", obj)
        if not row.roles and shared_roles:
            row.roles = dict(shared_roles)
        rows.append(row)
    return rows


def _first(obj: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in obj:
            return key, obj[key]
    return None, None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _token_id(where: str, column: str, value: Any) -> int:
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    raise PromptFileError(
        f"{where}: column {column!r} must hold a token id (an integer), got {value!r}; for text answers "
        "use the columns correct/incorrect (or answer/wrong)"
    )


def _answers(where: str, obj: dict[str, Any]) -> tuple[list[Answer], list[Answer]]:
    key, value = _first(obj, ANSWER_TEXT_KEYS)
    if key is not None:
        answers: list[Answer] = [str(v) for v in _as_list(value)]
        _, wrong_value = _first(obj, WRONG_TEXT_KEYS)
        wrong: list[Answer] = [] if wrong_value is None else [str(v) for v in _as_list(wrong_value)]
        return answers, [w for w in wrong if w != ""]
    key, value = _first(obj, ANSWER_ID_KEYS)
    if key is None:
        raise PromptFileError(
            f"{where}: missing answer column; give the text answer as 'answer' (or 'correct'/'answers') "
            "and the wrong answer as 'wrong' (or 'incorrect'), or token ids as 'correct_idx' and "
            f"'incorrect_idx' (or 'label'); the row has {sorted(obj)}"
        )
    if key == "label" and isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise PromptFileError(
                f"{where}: column 'label' {value!r} is neither a token id nor a list [correct_id, wrong_id]"
            ) from None
    values = _as_list(value)
    if key == "label" and len(values) > 2:
        raise PromptFileError(
            f"{where}: column 'label' holds {len(values)} ids; give one id or [correct_id, wrong_id]"
        )
    answers = [_token_id(where, key, values[0])]
    wrong = [_token_id(where, key, v) for v in values[1:]]
    wkey, wvalue = _first(obj, WRONG_ID_KEYS)
    if wkey is not None and str(wvalue).strip() != "":
        wrong = [_token_id(where, wkey, v) for v in _as_list(wvalue)]
    return answers, wrong


def _row(where: str, obj: Any) -> PromptRow:
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected an object with named fields, got {type(obj).__name__}")
    key, clean = _first(obj, CLEAN_KEYS)
    if key is None:
        raise PromptFileError(
            f"{where}: missing column 'prompt' (or 'clean') holding the prompt text; "
            f"the row has {sorted(obj)}"
        )
    if not isinstance(clean, str) or not clean.strip():
        raise PromptFileError(
            f"{where}: empty prompt in column {key!r}; write the prompt text or drop the row"
        )
    ckey, corrupted = _first(obj, CORRUPTED_KEYS)
    if ckey is not None and (not isinstance(corrupted, str) or not corrupted.strip()):
        raise PromptFileError(
            f"{where}: empty corrupted prompt in column {ckey!r}; write a corrupted prompt for every row "
            "or leave the column out of the whole file"
        )
    answers, wrong = _answers(where, obj)
    if any(isinstance(a, str) and a == "" for a in answers) or not answers:
        raise PromptFileError(f"{where}: empty answer; write the expected continuation, e.g. ' Paris'")
    same = [a for a in answers if a in wrong]
    if same:
        raise PromptFileError(
            f"{where}: the answer {same[0]!r} is also the wrong answer; the metric compares the two, so "
            "they must differ; fix the row's answer or wrong answer"
        )
    roles = obj.get("roles") or {}
    if not isinstance(roles, dict) or not all(isinstance(v, str | int) for v in roles.values()):
        raise PromptFileError(
            f"{where}: 'roles' must map role names to a word of the prompt or a token index, e.g. "
            '{"subject": "Dogs", "verb": 5}'
        )
    return PromptRow(where, clean, corrupted if ckey is not None else None, answers, wrong, dict(roles))
