"""Greater-than (Hanna et al. 2023), written anew from the facts of its dataset.

Prompts: ``"<|endoftext|> The war lasted from the year 1732 to the year 17"``; the model should give a
two-digit completion ``YY' > 32``. The text is the tokenizer's eos token, a space, then the sentence
(the published runs used ``eos=True``).

Valid years (:func:`valid_years`): 1000..1899 whose ``" XXYY"`` is exactly two tokens, the second being
the two digits ``YY``; then the first and the last valid year of each century are dropped. Nouns must
be single tokens with a leading space (the others are dropped with a warning; none for GPT-2).

Generation (``numpy.random.default_rng(seed)``, in this order): all ``n`` noun indices at once
(``rng.integers(0, len(nouns), n)``), then for prompt ``i`` the year: ``YY`` cycles over 02, 03, ..., 98,
02, ... (a ``YY`` with no valid year is skipped), and the year is drawn uniformly among the valid years
ending in ``YY`` (``rng.integers(0, len(pool))``).

Roles, one per token: ``starts`` (the eos token), ``The``, ``NOUN``, ``lasted``, ``from``, ``the``,
``year``, ``XX1``, ``YY``, ``to``, ``the (1)``, ``year (1)``, ``end`` (= XX2, where YY' is predicted).
``correct`` is the YY token, ``wrong`` is -1, ``yy`` the integer YY and ``two_digit_ids[k]`` the token of
``f"{k:02d}"``. With ``prepend_bos`` a BOS is put before the eos token (for GPT-2 the same token
twice): ``starts`` stays 0 (the BOS), the other roles shift by one and the eos at position 1 has no
role; the published runs used no BOS. Direction: mean of ``W_U[:, YY']`` over the two-digit
completions ``YY' > YY`` minus the mean over ``YY' <= YY``; the metric is the same combination of
the logits at ``end`` (so it equals ``resid . direction`` plus the same combination of ``b_U``).
This is the task's own sign; the published intervention code used the opposite one for
greater-than (section 7 of docs/METHOD.md).

Corrupted counterpart: the "01" start year of Hanna et al. (``"... from the year 1701 to the year
17"``): the ``YY`` token is replaced by the token of ``"01"`` (token for token, so the length is the
clean one; for GPT-2 this is also the tokenization of the corrupted text, except for 10xx years, where
``" 1001"`` tokenizes differently and the corrupted row keeps the clean ``" 10"`` + ``"01"`` split).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attncomm.tasks.base import (
    Task,
    TaskPrompts,
    TaskTokenizerError,
    at_end,
    bos_id,
    check_n,
    check_options,
    encode,
    keep_single_tokens,
    require_single_tokens,
    word_token_positions,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FIRST_YEAR, LAST_YEAR = 1000, 1899
#: the YY values the balanced sampler cycles over
YY_CYCLE: tuple[int, ...] = tuple(range(2, 99))
NOUNS: tuple[str, ...] = (
    "abduction",
    "accord",
    "affair",
    "agreement",
    "appraisal",
    "assaults",
    "assessment",
    "attack",
    "attempts",
    "campaign",
    "captivity",
    "case",
    "challenge",
    "chaos",
    "clash",
    "collaboration",
    "coma",
    "competition",
    "confrontation",
    "consequence",
    "conspiracy",
    "construction",
    "consultation",
    "contact",
    "contract",
    "convention",
    "cooperation",
    "custody",
    "deal",
    "decline",
    "decrease",
    "demonstrations",
    "development",
    "disagreement",
    "disorder",
    "dispute",
    "domination",
    "dynasty",
    "effect",
    "effort",
    "employment",
    "endeavor",
    "engagement",
    "epidemic",
    "evaluation",
    "exchange",
    "existence",
    "expansion",
    "expedition",
    "experiments",
    "fall",
    "fame",
    "flights",
    "friendship",
    "growth",
    "hardship",
    "hostility",
    "illness",
    "impact",
    "imprisonment",
    "improvement",
    "incarceration",
    "increase",
    "insurgency",
    "invasion",
    "investigation",
    "journey",
    "kingdom",
    "marriage",
    "modernization",
    "negotiation",
    "notoriety",
    "obstruction",
    "operation",
    "order",
    "outbreak",
    "outcome",
    "overhaul",
    "patrols",
    "pilgrimage",
    "plague",
    "plan",
    "practice",
    "process",
    "program",
    "progress",
    "project",
    "pursuit",
    "quest",
    "raids",
    "reforms",
    "reign",
    "relationship",
    "retaliation",
    "riot",
    "rise",
    "rivalry",
    "romance",
    "rule",
    "sanctions",
    "shift",
    "siege",
    "slump",
    "stature",
    "stint",
    "strikes",
    "study",
    "test",
    "testing",
    "tests",
    "therapy",
    "tour",
    "tradition",
    "treaty",
    "trial",
    "trip",
    "unemployment",
    "voyage",
    "warfare",
    "work",
)

SENTENCE_WORDS: tuple[str, ...] = (" The", " lasted", " from", " the", " year", " to")


def two_digit_ids(tokenizer: PreTrainedTokenizerBase) -> Int[Tensor, " 100"]:
    """Token ids of the strings ``"00"`` .. ``"99"`` (each must be a single token)."""
    words = [f"{k:02d}" for k in range(100)]
    ids = require_single_tokens(tokenizer, words, "gt", "the two-digit strings '00'..'99'")
    return torch.tensor([ids[w] for w in words], dtype=torch.long)


def is_valid_year_token(tokenizer: PreTrainedTokenizerBase, year: int) -> bool:
    """Whether ``" " + str(year)`` is exactly two tokens, the second being the year's two last digits."""
    ids = encode(tokenizer, f" {year}")
    return len(ids) == 2 and tokenizer.decode([ids[1]]) == f"{year % 100:02d}"


def drop_century_edges(years: list[int]) -> list[int]:
    """Drop the first and the last year of each century from a sorted list of years."""
    by_century: dict[int, list[int]] = {}
    for y in years:
        by_century.setdefault(y // 100, []).append(y)
    edges = {ys[0] for ys in by_century.values()} | {ys[-1] for ys in by_century.values()}
    return [y for y in years if y not in edges]


def valid_years(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The years 1000..1899 the task samples from, by the rules in the module docstring."""
    years = [y for y in range(FIRST_YEAR, LAST_YEAR + 1) if is_valid_year_token(tokenizer, y)]
    return drop_century_edges(years)


def balanced_years(years: list[int], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` years whose YY cycles over 02..98 (skipping YY without a valid year), uniform within a YY."""
    pools = {yy: [y for y in years if y % 100 == yy] for yy in YY_CYCLE}
    cycle = [yy for yy in YY_CYCLE if pools[yy]]
    if not cycle:
        raise TaskTokenizerError("gt: no valid year ends in 02..98 for this tokenizer; see gt.valid_years")
    out: list[int] = []
    for i in range(n):
        pool = pools[cycle[i % len(cycle)]]
        out.append(pool[int(rng.integers(0, len(pool)))])
    return out


def sentence_pieces(eos: str, noun: str, year: int) -> list[tuple[str | None, str]]:
    """The prompt as ``(role, text)`` pieces: eos, a space, the sentence ending in the century ``XX``."""
    xx, yy = f"{year // 100}", f"{year % 100:02d}"
    return [
        ("starts", eos),
        ("The", " The"),
        ("NOUN", f" {noun}"),
        ("lasted", " lasted"),
        ("from", " from"),
        ("the", " the"),
        ("year", " year"),
        ("XX1", f" {xx}"),
        ("YY", yy),
        ("to", " to"),
        ("the (1)", " the"),
        ("year (1)", " year"),
        ("end", f" {xx}"),
    ]


class GreaterThanTask(Task):
    """Greater-than: after ``... from the year 1732 to the year 17`` predict a two-digit YY' > 32."""

    name = "gt"
    direction_name = "True YY - False YY"
    role_names = [
        "starts",
        "The",
        "NOUN",
        "lasted",
        "from",
        "the",
        "year",
        "XX1",
        "YY",
        "to",
        "the (1)",
        "year (1)",
        "end",
    ]

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Need an eos token, single-token words, nouns and two-digit strings, and valid years."""
        if tokenizer.eos_token is None:
            raise TaskTokenizerError(
                f"gt: tokenizer {type(tokenizer).__name__} has no eos token to put before the sentence"
            )
        two_digit_ids(tokenizer)
        require_single_tokens(tokenizer, SENTENCE_WORDS, self.name, "the sentence's words")
        keep_single_tokens(tokenizer, NOUNS, self.name, "nouns", minimum=1)
        if not valid_years(tokenizer):
            raise TaskTokenizerError(
                f"gt: no year in {FIRST_YEAR}..{LAST_YEAR} tokenizes as ' XX' + 'YY' with tokenizer "
                f"{type(tokenizer).__name__}; the task needs two-digit year tokens (e.g. GPT-2's tokenizer)"
            )

    def make_prompts(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n: int,
        seed: int = 0,
        prepend_bos: bool = False,
        **opts: Any,
    ) -> TaskPrompts:
        """``n`` greater-than prompts from ``seed`` (generation order in the module docstring)."""
        check_n(n, self.name)
        check_options(self.name, opts)
        self.check_tokenizer(tokenizer)
        nouns = keep_single_tokens(tokenizer, NOUNS, self.name, "nouns", minimum=1)
        digits = two_digit_ids(tokenizer)
        rng = np.random.default_rng(seed)
        noun_idx = rng.integers(0, len(nouns), size=n)
        years = balanced_years(valid_years(tokenizer), n, rng)
        offset = 1 if prepend_bos else 0
        rows, texts, roles, meta = [], [], [], []
        corrupted_rows, corrupted_texts = [], []
        for i in range(n):
            noun, year = nouns[int(noun_idx[i])], years[i]
            text, ids, found = word_token_positions(
                tokenizer, sentence_pieces(tokenizer.eos_token, noun, year), self.name
            )
            role = {name: pos[0] + offset for name, pos in found.items()}
            role["starts"] = 0
            bos = [bos_id(tokenizer)] if prepend_bos else []
            rows.append(bos + ids)
            texts.append(text)
            roles.append(role)
            meta.append({"noun": noun, "year": year, "XX": year // 100, "YY": year % 100})
            corrupted = list(ids)
            corrupted[found["YY"][0]] = int(digits[1])
            corrupted_rows.append(bos + corrupted)
            corrupted_texts.append(
                "".join(p for _, p in sentence_pieces(tokenizer.eos_token, noun, year - year % 100 + 1))
            )
        yy = torch.tensor([m["YY"] for m in meta], dtype=torch.long)
        return self._assemble(
            tokenizer,
            rows,
            texts,
            roles,
            digits[yy],
            None,
            meta,
            prepend_bos,
            corrupted_rows=corrupted_rows,
            corrupted_texts=corrupted_texts,
            yy=yy,
            two_digit_ids=digits,
        )

    @staticmethod
    def _weights(prompts: TaskPrompts) -> Float[Tensor, "batch 100"]:
        """Per prompt, +1/|{YY' > YY}| on completions above YY and -1/|{YY' <= YY}| on the others."""
        if prompts.yy is None or prompts.two_digit_ids is None:
            raise ValueError(
                "gt: prompts lack yy/two_digit_ids; build them with GreaterThanTask.make_prompts"
            )
        values = torch.arange(100)
        above = (values[None, :] > prompts.yy[:, None]).double()
        below = 1.0 - above
        return above / above.sum(-1, keepdim=True) - below / below.sum(-1, keepdim=True)

    def direction(
        self, W_U: Float[Tensor, "d_model d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, "batch d_model"]:
        """Mean of ``W_U[:, YY']`` over ``YY' > YY`` minus the mean over ``YY' <= YY``, per prompt."""
        weights = self._weights(prompts).to(device=W_U.device, dtype=W_U.dtype)
        cols = W_U[:, prompts.two_digit_ids.to(W_U.device)]  # type: ignore[union-attr]
        return weights @ cols.T

    def metric(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, " batch"]:
        """Mean logit over two-digit completions ``> YY`` minus the mean over ``<= YY``, at ``end``."""
        final = at_end(logits, prompts)[:, prompts.two_digit_ids.to(logits.device)]  # type: ignore[union-attr]
        above = prompts.yy.to(logits.device)[:, None] < torch.arange(100, device=logits.device)[None, :]  # type: ignore[union-attr]
        mean_above = (final * above).sum(-1) / above.sum(-1)
        mean_below = (final * ~above).sum(-1) / (~above).sum(-1)
        return mean_above - mean_below

    def is_correct(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Bool[Tensor, " batch"]:
        """The argmax at ``end`` is a two-digit token whose value is ``> YY`` (any other argmax is wrong)."""
        self._weights(prompts)
        pred = at_end(logits, prompts).argmax(-1)
        digits = prompts.two_digit_ids.to(pred.device)  # type: ignore[union-attr]
        match = pred[:, None] == digits[None, :]
        value = match.long().argmax(-1)
        return match.any(-1) & (value > prompts.yy.to(pred.device))  # type: ignore[union-attr]
