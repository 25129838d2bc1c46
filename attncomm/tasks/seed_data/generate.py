"""Generate the seed tasks' prompt files (``syllogism.jsonl``, ``sequence.jsonl``) checked in beside it.

Run ``python -m attncomm.tasks.seed_data.generate`` to rewrite them; the output is deterministic
(``random.Random(0)``), so rerunning it changes nothing unless this script changes.

* syllogism: ``"All {category} are {descriptor}, not {opposite}. {Noun} are {category}. Therefore,
  {noun} are"`` -> ``" {descriptor}"``, wrong answer ``" {opposite}"``; the corrupted prompt swaps the
  descriptor pair (``"All birds are ectothermic, not endothermic. ..."``), so the premise supports the
  wrong answer. Every pair is used both ways round (each descriptor is its opposite's wrong answer).
  Roles: ``category``, ``descriptor``, ``opposite`` (their first occurrence), ``subject`` (the noun
  of the second sentence) and ``noun`` (the noun of the conclusion).
* sequence: increasing digits (``"1 2 3 4"`` -> ``" 5"``), months (``"January February March"`` ->
  ``" April"``) and number words (``"one two three"`` -> ``" four"``), 3 to 5 items; the wrong answer is
  the last item shown (repeating it is the commonest non-continuation) and the corrupted prompt is the
  same items with all but the first shuffled out of order (the same words with the same spacing, so
  the same number of tokens for tokenizers that split at spaces).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

CATEGORIES: tuple[str, ...] = (
    "birds",
    "fish",
    "insects",
    "mammals",
    "reptiles",
    "amphibians",
    "spiders",
    "worms",
)
#: descriptor pairs: each is the other's wrong answer
DESCRIPTOR_PAIRS: tuple[tuple[str, str], ...] = (
    ("endothermic", "ectothermic"),
    ("herbivorous", "carnivorous"),
    ("bipedal", "quadrupedal"),
    ("exoskeletal", "endoskeletal"),
    ("digitigrade", "plantigrade"),
)
#: nouns for the conclusion (plural, so "{Noun} are {category}" reads well)
NOUNS: tuple[str, ...] = ("dogs", "cats", "horses", "cows", "sheep", "rabbits", "lions", "bears")

MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
NUMBER_WORDS: tuple[str, ...] = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
DIGITS: tuple[str, ...] = tuple(str(k) for k in range(1, 10))


def syllogism_rows(rng: random.Random) -> list[dict]:
    """Every (category, pair, orientation) once, with a noun drawn for each."""
    rows = []
    for category in CATEGORIES:
        for pair in DESCRIPTOR_PAIRS:
            for descriptor, opposite in (pair, pair[::-1]):
                noun = rng.choice(NOUNS)
                template = "All {c} are {d}, not {o}. {N} are {c}. Therefore, {n} are"
                clean = template.format(c=category, d=descriptor, o=opposite, N=noun.capitalize(), n=noun)
                corrupted = template.format(c=category, d=opposite, o=descriptor, N=noun.capitalize(), n=noun)
                rows.append(
                    {
                        "prompt": clean,
                        "corrupted": corrupted,
                        "answer": f" {descriptor}",
                        "wrong": f" {opposite}",
                        "roles": {
                            "category": category,
                            "descriptor": descriptor,
                            "opposite": opposite,
                            "subject": noun.capitalize(),
                            "noun": noun,
                        },
                    }
                )
    rng.shuffle(rows)
    return rows


def _shuffled(rng: random.Random, items: list[str]) -> list[str]:
    """``items`` with all but the first reordered so that they are no longer in order (the first stays,
    so that every word keeps its leading space or lack of one and the token count stays the same)."""
    rest = list(items[1:])
    while rest == items[1:]:
        rng.shuffle(rest)
    return [items[0], *rest]


def sequence_rows(rng: random.Random) -> list[dict]:
    """Every run of 3..5 consecutive items of the three series that has a next item."""
    rows = []
    for kind, series in (("digits", DIGITS), ("months", MONTHS), ("number words", NUMBER_WORDS)):
        for length in (3, 4, 5):
            for start in range(len(series) - length):
                items = list(series[start : start + length])
                answer = series[start + length]
                rows.append(
                    {
                        "prompt": " ".join(items),
                        "corrupted": " ".join(_shuffled(rng, items)),
                        "answer": f" {answer}",
                        "wrong": f" {items[-1]}",
                        "kind": kind,
                    }
                )
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    write_jsonl(HERE / "syllogism.jsonl", syllogism_rows(rng))
    write_jsonl(HERE / "sequence.jsonl", sequence_rows(rng))


if __name__ == "__main__":
    main()
