"""Gendered pronoun (Mathwin et al.), written anew from the facts of its dataset.

Prompts: ``"So John is a really great friend, isn't"``; the model should continue with ``" he"`` for a
male name and ``" she"`` for a female one (the wrong answer is the other pronoun).

Prompts: the published set is every (name, template) pair, name-major (the 10 male names, then the
10 female names, in the listed order), templates inner: 100 prompts, the published N. For ``n < 100``
a seeded subset (``numpy.random.default_rng(seed).permutation(100)[:n]``) is taken, kept in that
order of the full list; ``n = 100`` gives the published order for every seed; ``n > 100`` is refused
(there are only 100 distinct prompts).

Roles are found through the tokenizer's character offsets: ``So``, ``name``, ``is``, the four words
between ``is`` and the comma (``I1``, ``I2``, ``adj``, ``noun``), ``punct`` (the comma) and the tail
``" isn't"``, whose last tokens are ``end``, ``end-1`` (and ``end-2`` when the tail has three tokens,
as for Gemma); ``starts`` = 0. This reproduces the published positions counted from the end: for
GPT-2 and Pythia without BOS ``So`` and ``starts`` share position 0 and ``starts`` wins (it is later
in :attr:`GenderedPronounTask.role_names`); with a BOS, ``So`` is position 1. Metric: ``logit(correct) -
logit(wrong)`` at ``end`` = ``resid . (W_U[:, correct] - W_U[:, wrong]) + b_U[correct] - b_U[wrong]``.

Corrupted counterpart: the same template with the name of the other gender at the same index of its
list (John <-> Mary, David <-> Lisa, ...), token for token (names are single tokens), so the length is
the clean one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from attncomm.tasks.base import (
    TaskPrompts,
    TokenPairTask,
    bos_id,
    check_n,
    check_options,
    pad_id,
    require_single_tokens,
    single_token,
    word_token_positions,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES: tuple[str, ...] = (
    "So {name} is a really great friend, isn't",
    "So {name} is such a good cook, isn't",
    "So {name} is a very good athlete, isn't",
    "So {name} is a really nice person, isn't",
    "So {name} is such a funny person, isn't",
)

MALE_NAMES: tuple[str, ...] = ("John", "David", "Mark", "Paul", "Ryan", "Gary", "Jack", "Sean", "Carl", "Joe")

FEMALE_NAMES: tuple[str, ...] = (
    "Mary",
    "Lisa",
    "Anna",
    "Sarah",
    "Amy",
    "Carol",
    "Karen",
    "Susan",
    "Julie",
    "Judy",
)

ANSWERS: dict[str, str] = {"male": " he", "female": " she"}
_TEMPLATE = re.compile(r"^So \{name\} is (\S+) (\S+) (\S+) (\S+), (isn't)$")


def opposite_name(name: str) -> str:
    """The name at the same index of the other gender's list (``John`` <-> ``Mary``)."""
    if name in MALE_NAMES:
        return FEMALE_NAMES[MALE_NAMES.index(name)]
    return MALE_NAMES[FEMALE_NAMES.index(name)]


def all_prompts() -> list[tuple[str, str, int]]:
    """The 100 published prompts as ``(name, gender, template index)``, in the published order."""
    people = [(n, "male") for n in MALE_NAMES] + [(n, "female") for n in FEMALE_NAMES]
    return [(name, gender, t) for name, gender in people for t in range(len(TEMPLATES))]


def prompt_pieces(template: str, name: str) -> list[tuple[str | None, str]]:
    """The prompt as ``(role, text)`` pieces, roles as in the module docstring (``tail`` = ``" isn't"``)."""
    match = _TEMPLATE.match(template)
    if match is None:
        raise ValueError(f'gp: template {template!r} is not of the form "So {{name}} is W1 W2 W3 W4, isn\'t"')
    i1, i2, adj, noun, tail = match.groups()
    return [
        ("So", "So"),
        ("name", f" {name}"),
        ("is", " is"),
        ("I1", f" {i1}"),
        ("I2", f" {i2}"),
        ("adj", f" {adj}"),
        ("noun", f" {noun}"),
        ("punct", ","),
        ("tail", f" {tail}"),
    ]


class GenderedPronounTask(TokenPairTask):
    """Gendered pronoun: after ``So John is a really great friend, isn't`` predict `` he``."""

    name = "gp"
    direction_name = "Correct - Incorrect pronoum"  # sic, as published
    role_names = ["end", "end-1", "end-2", "punct", "noun", "adj", "I2", "I1", "is", "name", "So", "starts"]

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Need single-token pronouns and names; every template word must be a token of its own."""
        require_single_tokens(tokenizer, list(ANSWERS.values()), self.name, "the pronouns")
        require_single_tokens(
            tokenizer,
            [" " + n for n in MALE_NAMES + FEMALE_NAMES],
            self.name,
            "the names (with a leading space)",
        )
        for template in TEMPLATES:
            word_token_positions(tokenizer, prompt_pieces(template, MALE_NAMES[0]), self.name, ("tail",))
        pad_id(tokenizer)

    def make_prompts(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n: int = 100,
        seed: int = 0,
        prepend_bos: bool = False,
        **opts: Any,
    ) -> TaskPrompts:
        """``n <= 100`` gendered-pronoun prompts (all 100 in the published order when ``n = 100``)."""
        check_n(n, self.name)
        check_options(self.name, opts)
        full = all_prompts()
        if n > len(full):
            raise ValueError(
                f"gp: there are only {len(full)} distinct prompts ({len(TEMPLATES)} templates x "
                f"{len(MALE_NAMES) + len(FEMALE_NAMES)} names), got n={n}; use n <= {len(full)}"
            )
        self.check_tokenizer(tokenizer)
        chosen = sorted(np.random.default_rng(seed).permutation(len(full))[:n].tolist())
        pronoun = require_single_tokens(tokenizer, list(ANSWERS.values()), self.name, "the pronouns")
        offset = 1 if prepend_bos else 0
        rows, texts, roles, meta, correct, wrong = [], [], [], [], [], []
        corrupted_rows, corrupted_texts = [], []
        for index in chosen:
            name, gender, t = full[index]
            text, ids, found = word_token_positions(
                tokenizer, prompt_pieces(TEMPLATES[t], name), self.name, ("tail",)
            )
            role = {k: v[0] + offset for k, v in found.items() if k != "tail"}
            for k, pos in enumerate(reversed(found["tail"][-3:])):
                role["end" if k == 0 else f"end-{k}"] = pos + offset
            role["starts"] = 0
            other = "female" if gender == "male" else "male"
            bos = [bos_id(tokenizer)] if prepend_bos else []
            rows.append(bos + ids)
            texts.append(text)
            roles.append(role)
            correct.append(pronoun[ANSWERS[gender]])
            wrong.append(pronoun[ANSWERS[other]])
            swapped = opposite_name(name)
            corrupted = list(ids)
            corrupted[found["name"][0]] = single_token(tokenizer, " " + swapped)  # type: ignore[call-overload]
            corrupted_rows.append(bos + corrupted)
            corrupted_texts.append(TEMPLATES[t].format(name=swapped))
            meta.append(
                {
                    "prompt_index": index,
                    "name": name,
                    "gender": gender,
                    "template_id": t,
                    "corrupted_name": swapped,
                }
            )
        return self._assemble(
            tokenizer,
            rows,
            texts,
            roles,
            correct,
            wrong,
            meta,
            prepend_bos,
            corrupted_rows=corrupted_rows,
            corrupted_texts=corrupted_texts,
        )
