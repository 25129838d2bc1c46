"""Indirect object identification (IOI; Wang et al. 2022), written anew from the facts of its dataset.

Prompts: ``"When Mary and John went to the store, John gave a drink to Mary"``; the model must predict
the indirect object (IO, ``[A]``) rather than the subject (S, ``[B]``) after the final ``" to"``.

Generation (``random.Random(seed)``, in this order): the template list for ``prompt_type`` (``"mixed"``:
the first 7 BABA and the first 7 ABBA templates, shuffled once; ``"BABA"``/``"ABBA"``: all 15 of that
family, not shuffled); then for each prompt: a template (uniform ``choice``), three names drawn with
``choice`` until all three differ (IO = first, S = second, the third is unused), a place, an object.

Tokens: the whole sentence, final IO included, is tokenized; ``end`` = the position just before the
final IO (``" to"``). Roles (section 4.4 of docs/METHOD.md): IO / S1 = first occurrence of the IO / S
name token, S2 = last occurrence of S, their neighbours ``+-1``, ``end``, ``end-1``, ``starts`` = 0,
``punct`` = last ``"."`` if the sentence holds one else last ``","``, ``verb`` = last ``" said"``, else
``" give"``, else ``" gave"`` (the later-listed word present wins). Names must be single tokens with a
leading space: names that are not are dropped (with a warning) before sampling, a no-op for GPT-2
(all 89 are single tokens). Metric ``logit(IO) - logit(S)`` at ``end`` = ``resid . (W_U[:, IO] - W_U[:, S])
+ b_U[IO] - b_U[S]``.

Corrupted counterpart: the ABC prompt of Wang et al., token for token: the IO, S1 and S2 names (and
the final IO) are replaced by three names ``X``, ``Y``, ``Z`` that differ from each other and from the
clean IO and S, same template, place and object (``"When X and Y went to the store, Z gave a drink
to X"``). They are drawn with a separate ``random.Random(f"ioi-abc-{seed}")``, so the clean prompts do
not depend on it. The name tokens are swapped in place, so the corrupted prompt has the clean length.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from attncomm.tasks.base import (
    TaskPrompts,
    TaskTokenizerError,
    TokenPairTask,
    bos_id,
    check_n,
    check_options,
    encode,
    keep_single_tokens,
    pad_id,
    require_single_tokens,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NAMES: tuple[str, ...] = (
    "Adam",
    "Alan",
    "Alex",
    "Alice",
    "Amy",
    "Anderson",
    "Andre",
    "Andrew",
    "Andy",
    "Anna",
    "Anthony",
    "Arthur",
    "Austin",
    "Brian",
    "Carter",
    "Charles",
    "Charlie",
    "Christian",
    "Christopher",
    "Clark",
    "Cole",
    "Collins",
    "Daniel",
    "David",
    "Dean",
    "Edward",
    "Elizabeth",
    "Eric",
    "Eva",
    "Ford",
    "Frank",
    "George",
    "Georgia",
    "Graham",
    "Grant",
    "Henry",
    "Ian",
    "Jack",
    "Jacob",
    "James",
    "Jane",
    "Jason",
    "Jay",
    "John",
    "Jonathan",
    "Jordan",
    "Joseph",
    "Justin",
    "Kate",
    "Kelly",
    "Kevin",
    "Laura",
    "Leon",
    "Lewis",
    "Lisa",
    "Louis",
    "Luke",
    "Marco",
    "Marcus",
    "Maria",
    "Mark",
    "Martin",
    "Mary",
    "Matthew",
    "Max",
    "Michael",
    "Morgan",
    "Patrick",
    "Paul",
    "Peter",
    "Prince",
    "Richard",
    "River",
    "Robert",
    "Roman",
    "Rose",
    "Ruby",
    "Russell",
    "Ryan",
    "Sarah",
    "Scott",
    "Simon",
    "Stephen",
    "Steven",
    "Taylor",
    "Thomas",
    "Victoria",
    "Warren",
    "William",
)

PLACES: tuple[str, ...] = (
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "station",
)

OBJECTS: tuple[str, ...] = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)


def swap_first_clause(template: str) -> str:
    """The ABBA twin of a BABA template: the first ``[B] and [A]`` becomes ``[A] and [B]``."""
    if "[B] and [A]" not in template:
        raise ValueError(f"IOI template {template!r} has no '[B] and [A]' clause to swap")
    return template.replace("[B] and [A]", "[A] and [B]", 1)


ABBA_TEMPLATES: tuple[str, ...] = tuple(swap_first_clause(t) for t in BABA_TEMPLATES)

PROMPT_TYPES: tuple[str, ...] = ("mixed", "BABA", "ABBA")
PUNCT_WORDS: tuple[str, ...] = (",", ".")  # later-listed present wins
VERB_WORDS: tuple[str, ...] = (" gave", " give", " said")  # later-listed present wins


def template_list(prompt_type: str, rng: random.Random) -> list[str]:
    """The templates a ``prompt_type`` samples from (``"mixed"`` consumes one shuffle of ``rng``)."""
    if prompt_type == "mixed":
        templates = list(BABA_TEMPLATES[:7]) + list(ABBA_TEMPLATES[:7])
        rng.shuffle(templates)
        return templates
    if prompt_type == "BABA":
        return list(BABA_TEMPLATES)
    if prompt_type == "ABBA":
        return list(ABBA_TEMPLATES)
    raise ValueError(f"IOI: unknown prompt_type {prompt_type!r}; valid: {', '.join(PROMPT_TYPES)}")


def fill_template(template: str, io: str, s: str, place: str, obj: str) -> str:
    """The sentence of ``template`` with its names, place and object filled in."""
    return template.replace("[PLACE]", place).replace("[OBJECT]", obj).replace("[A]", io).replace("[B]", s)


def abc_names(rng: random.Random, names: Sequence[str], avoid: Sequence[str]) -> tuple[str, str, str]:
    """Three names that differ from each other and from ``avoid`` (the clean IO and S), for the ABC prompt."""
    pool = [w for w in names if w not in set(avoid)]
    if len(pool) < 3:
        raise TaskTokenizerError(
            f"IOI: the ABC corruption needs 5 single-token names, the tokenizer has {len(names)}"
        )
    x, y, z = rng.sample(pool, 3)
    return x, y, z


def fill_abc(template: str, x: str, y: str, z: str, place: str, obj: str) -> str:
    """The ABC text of ``template``: IO -> ``x`` (both occurrences), S1 -> ``y``, S2 -> ``z``."""
    first, second = template.find("[B]"), template.rfind("[B]")
    filled = template[:first] + y + template[first + 3 : second] + z + template[second + 3 :]
    return fill_template(filled, x, y, place, obj)


def abc_ids(ids: Sequence[int], roles: dict[str, int], offset: int, x: int, y: int, z: int) -> list[int]:
    """The ABC token row of a tokenized IOI sentence: IO and final IO -> ``x``, S1 -> ``y``, S2 -> ``z``."""
    out = list(ids)
    out[roles["IO"] - offset] = x
    out[-1] = x
    out[roles["S1"] - offset] = y
    out[roles["S2"] - offset] = z
    return out


def _last(ids: Sequence[int], tok: int) -> int | None:
    hits = [i for i, t in enumerate(ids) if t == tok]
    return hits[-1] if hits else None


def ioi_roles(
    ids: Sequence[int],
    io_tok: int,
    s_tok: int,
    punct_toks: Sequence[int],
    verb_toks: Sequence[int],
    offset: int,
) -> dict[str, int]:
    """Role positions in one tokenized IOI sentence (answer included); ``offset`` = 1 with a BOS, else 0."""
    ids = list(ids)
    io = ids.index(io_tok)
    s1 = ids.index(s_tok)
    s2 = _last(ids, s_tok)
    end = len(ids) - 2
    roles = {
        "IO": io,
        "IO-1": io - 1,
        "IO+1": io + 1,
        "S1": s1,
        "S1-1": s1 - 1,
        "S1+1": s1 + 1,
        "S2": s2,
        "S2-1": s2 - 1,  # type: ignore[operator]
        "S2+1": s2 + 1,  # type: ignore[operator]
        "end": end,
        "end-1": end - 1,
    }
    roles = {k: v + offset for k, v in roles.items() if v is not None and v >= 0}
    roles["starts"] = 0
    for key, candidates in (("punct", punct_toks), ("verb", verb_toks)):
        for tok in candidates:
            pos = _last(ids, tok)
            if pos is not None:
                roles[key] = pos + offset
    return roles


class IOITask(TokenPairTask):
    """Indirect object identification: predict the IO name after ``... gave a drink to``."""

    name = "ioi"
    direction_name = "IO-S direction"
    role_names = [
        "IO",
        "IO-1",
        "IO+1",
        "S1",
        "S1-1",
        "S1+1",
        "S2",
        "S2-1",
        "S2+1",
        "end",
        "end-1",
        "starts",
        "punct",
        "verb",
    ]

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Need >= 3 single-token names, single-token punctuation and verbs (and a pad id)."""
        keep_single_tokens(tokenizer, NAMES, self.name, "names", minimum=3)
        require_single_tokens(tokenizer, PUNCT_WORDS + VERB_WORDS, self.name, "punctuation and verbs")
        pad_id(tokenizer)

    def make_prompts(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n: int,
        seed: int = 0,
        prepend_bos: bool = False,
        prompt_type: str = "mixed",
        templates: Sequence[str] | None = None,
        **opts: Any,
    ) -> TaskPrompts:
        """``n`` IOI prompts from ``seed``; ``templates`` (optional) replaces the ``prompt_type`` list."""
        check_n(n, self.name)
        check_options(self.name, opts, "prompt_type, templates")
        self.check_tokenizer(tokenizer)
        names = keep_single_tokens(tokenizer, NAMES, self.name, "names", minimum=3)
        punct_toks = [encode(tokenizer, w)[0] for w in PUNCT_WORDS]
        verb_toks = [encode(tokenizer, w)[0] for w in VERB_WORDS]
        rng = random.Random(seed)
        pool = template_list(prompt_type, rng) if templates is None else list(templates)
        if not pool:
            raise ValueError("IOI make_prompts: the template list is empty")
        offset = 1 if prepend_bos else 0
        rows: list[list[int]] = []
        texts: list[str] = []
        roles: list[dict[str, int]] = []
        meta: list[dict[str, Any]] = []
        correct: list[int] = []
        wrong: list[int] = []
        corrupt_rng = random.Random(f"ioi-abc-{seed}")
        corrupted_rows: list[list[int]] = []
        corrupted_texts: list[str] = []
        for _ in range(n):
            template = rng.choice(pool)
            a = b = c = ""
            while len({a, b, c}) < 3:
                a, b, c = rng.choice(names), rng.choice(names), rng.choice(names)
            place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
            text = fill_template(template, a, b, place, obj)
            ids = encode(tokenizer, text)
            io_tok, s_tok = encode(tokenizer, " " + a)[0], encode(tokenizer, " " + b)[0]
            if ids[-1] != io_tok or ids.count(io_tok) < 2 or ids.count(s_tok) < 2:
                raise TaskTokenizerError(
                    f"IOI: in {text!r} the names {a!r} (IO) and {b!r} (S) do not tokenize as "
                    f"the single tokens of ' {a}' and ' {b}' (template {template!r}); "
                    "each template must end with ' [A]' and name IO and S twice each, after a space"
                )
            role = ioi_roles(ids, io_tok, s_tok, punct_toks, verb_toks, offset)
            x, y, z = abc_names(corrupt_rng, names, (a, b))
            corrupted_texts.append(fill_abc(template, x, y, z, place, obj))
            corrupted_rows.append(
                ([bos_id(tokenizer)] if prepend_bos else [])
                + abc_ids(ids, role, offset, *(encode(tokenizer, " " + w)[0] for w in (x, y, z)))
            )
            rows.append(([bos_id(tokenizer)] if prepend_bos else []) + ids)
            texts.append(text)
            roles.append(role)
            correct.append(io_tok)
            wrong.append(s_tok)
            family = (
                "BABA" if template in BABA_TEMPLATES else "ABBA" if template in ABBA_TEMPLATES else "custom"
            )
            family_list = BABA_TEMPLATES if family == "BABA" else ABBA_TEMPLATES
            meta.append(
                {
                    "template_id": pool.index(template),
                    "template": template,
                    "family": family,
                    "family_index": family_list.index(template) if family != "custom" else -1,
                    "IO": a,
                    "S": b,
                    "C": c,
                    "PLACE": place,
                    "OBJECT": obj,
                    "corrupted_names": (x, y, z),
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
