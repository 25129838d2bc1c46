"""The task contract: a batch of prompts with role positions and answers, and the abstract :class:`Task`.

A task turns ``(tokenizer, n, seed, prepend_bos)`` into a :class:`TaskPrompts` (texts, right-padded
tokens, the position ``end`` where the answer is predicted, role positions, answers) and defines the
task direction in the residual space (section 4.1 of docs/METHOD.md), the logit-difference metric at
``end`` and the correctness check used to skip prompts (section 4.2).

Conventions shared by every task:

* ``tokens[i] = [bos] + tokenizer(texts[i], add_special_tokens=False)`` when ``prepend_bos`` (else
  without ``[bos]``), right padded with the tokenizer's pad id (its eos id when it has no pad token).
* every role except ``starts`` shifts by one with BOS; ``starts`` is always position 0 (the first
  token of the sequence: the BOS when there is one).
* ``labels`` gives each position with a role exactly one label: when two roles share a position, the
  role listed later in :attr:`Task.role_names` wins (section 4.4).
* every task also builds a *corrupted counterpart* of each prompt (``corrupted_tokens``, for the
  patching methods); the metric of a corrupted run is the task's own metric with the clean prompt's
  answers at the clean ``end`` (see :class:`TaskPrompts`).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attncomm.errors import AttncommError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class TaskTokenizerError(AttncommError, ValueError):
    """The tokenizer cannot express the task (e.g. a name that is not a single token)."""


class UnknownTaskError(AttncommError, ValueError):
    """A task name that is not registered."""


class CorruptedPromptsError(AttncommError, ValueError):
    """A method needs corrupted prompts the task does not have, or of another length than the clean ones."""


@dataclass
class TaskPrompts:
    """A batch of task prompts: texts, tokens, role positions, answers and per-prompt metadata.

    ``roles[i]`` maps every role present in prompt ``i`` to its position (before collision
    resolution); ``labels[i]`` maps a position to its one label (the later role in the task's role list
    wins). For greater-than ``correct`` holds the YY token, ``wrong`` is -1, ``yy`` the start year's last
    two digits and ``two_digit_ids[k]`` the token of the string ``f"{k:02d}"``. For induction ``wrong`` is
    -1 (the metric compares with the mean logit).

    Corrupted counterparts (for activation patching and the other methods that contrast a clean run
    with a corrupted one): ``corrupted_texts[i]`` / ``corrupted_tokens[i]`` / ``corrupted_lengths[i]`` are
    the corrupted version of prompt ``i`` (``None`` when the task has none). ``corrupted_tokens`` is
    right padded to the same width as ``tokens`` (both are padded to the longer of the two), with the
    same BOS convention. The built-in tasks corrupt token for token, so their corrupted prompts have
    the clean lengths: IOI -> the ABC prompt (the IO, S1 and S2 names replaced by three distinct names,
    also distinct from the clean IO and S, same template), gt -> the start year's ``YY`` replaced by
    ``01``, gp -> the name of the other gender, induction -> the first copy replaced by a fresh random
    block (so the token at ``end`` has no earlier occurrence); file tasks use their ``corrupted``
    column, which may tokenize to another length. The metric of a corrupted run is the task's own
    metric with the *clean* prompt's answers (``correct``, ``wrong``, ``yy``) at the *clean* ``end``:
    ``task.metric(model(prompts.corrupted_tokens), prompts)``. Use :meth:`require_corrupted` to get
    the tokens with a clear error when they are missing or of the wrong length.
    """

    texts: list[str]
    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    end: Int[Tensor, " batch"]
    roles: list[dict[str, int]]
    labels: list[dict[int, str]]
    correct: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    meta: list[dict[str, Any]]
    task: str = ""
    prepend_bos: bool = False
    yy: Int[Tensor, " batch"] | None = None
    two_digit_ids: Int[Tensor, " 100"] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    corrupted_texts: list[str] | None = None
    corrupted_tokens: Int[Tensor, "batch pos"] | None = None
    corrupted_lengths: Int[Tensor, " batch"] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int] | Tensor) -> TaskPrompts:
        """The prompts at ``idx`` (in that order), keeping the padded width of ``tokens``."""
        index = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        n = len(self)
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"TaskPrompts.subset: index out of range for {n} prompts: {index.tolist()}")
        rows = [int(i) % n for i in index.tolist()]
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("two_digit_ids", "extra", "task", "prepend_bos"):
                values[f.name] = value
            elif isinstance(value, Tensor):
                values[f.name] = value[index]
            elif isinstance(value, list):
                values[f.name] = [value[r] for r in rows]
            else:
                values[f.name] = value
        return TaskPrompts(**values)

    def require_corrupted(self, what: str, equal_lengths: bool = True) -> Int[Tensor, "batch pos"]:
        """The corrupted tokens, for the method ``what``; a :class:`CorruptedPromptsError` when unusable.

        Raises when the task has no corrupted counterpart or, with ``equal_lengths``, naming the first
        prompt whose clean and corrupted versions tokenize to different lengths (methods that patch
        position by position need equal lengths).
        """
        if self.corrupted_tokens is None or self.corrupted_lengths is None:
            raise CorruptedPromptsError(
                f"{what} needs a corrupted counterpart of every prompt, but task '{self.task}' has none; "
                "use a task that defines one (ioi, gt, gp, induction, or a prompt file with a "
                "'corrupted' column)"
            )
        if equal_lengths:
            differ = (self.corrupted_lengths != self.lengths).nonzero().reshape(-1)
            if differ.numel():
                i = int(differ[0])
                where = self.meta[i].get("source", f"prompt {i}") if i < len(self.meta) else f"prompt {i}"
                clean = self.texts[i]
                corrupted = self.corrupted_texts[i] if self.corrupted_texts is not None else "?"
                raise CorruptedPromptsError(
                    f"{what} needs clean and corrupted prompts of equal token length, but {where} "
                    f"({differ.numel()} of {len(self)} prompts differ) has clean {clean!r} "
                    f"({int(self.lengths[i])} tokens) and corrupted {corrupted!r} "
                    f"({int(self.corrupted_lengths[i])} tokens); rewrite the corrupted prompt to the same "
                    "number of tokens or drop that row"
                )
        return self.corrupted_tokens

    def role_positions(self, role: str) -> Int[Tensor, " batch"]:
        """Position of ``role`` in each prompt, -1 where the prompt has no such role."""
        return torch.tensor([r.get(role, -1) for r in self.roles], dtype=torch.long)

    def token_labels(self, tokenizer: PreTrainedTokenizerBase) -> list[dict[int, str]]:
        """The trace-with-tokens labels: each position's decoded token, with ``" (k)"`` for its k-th repeat.

        Repeats are counted by decoded string within a prompt; the first occurrence has no suffix, the
        second gets ``" (1)"`` (section 4.4). Padding positions get no label.
        """
        out: list[dict[int, str]] = []
        for i in range(len(self)):
            seen: dict[str, int] = {}
            labels: dict[int, str] = {}
            for pos in range(int(self.lengths[i])):
                text = tokenizer.decode([int(self.tokens[i, pos])])
                k = seen.get(text, 0)
                labels[pos] = text if k == 0 else f"{text} ({k})"
                seen[text] = k + 1
            out.append(labels)
        return out


def resolve_labels(roles: dict[str, int], role_names: Sequence[str]) -> dict[int, str]:
    """One label per position: roles are applied in ``role_names`` order so that the later role wins."""
    labels: dict[int, str] = {}
    for name in role_names:
        if name in roles:
            labels[roles[name]] = name
    return labels


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for right padding: the pad token, else the eos token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise TaskTokenizerError(
        f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token, so prompts cannot be "
        "right padded; set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token)"
    )


def bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The BOS id used with ``prepend_bos=True`` (the bos token, else the eos token as GPT-2 does)."""
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise TaskTokenizerError(
        f"prepend_bos=True but tokenizer {type(tokenizer).__name__} has no bos or eos token; "
        "use prepend_bos=False or a tokenizer with a BOS token"
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added by the tokenizer."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token (not the unknown token), else ``None``.

    A tokenizer that maps words it does not know to its unknown token cannot express them, even
    though each becomes "one token".
    """
    ids = encode(tokenizer, text)
    if len(ids) != 1:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and text.strip() != str(tokenizer.unk_token):
        return None
    return ids[0]


def require_single_tokens(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str], task: str, what: str
) -> dict[str, int]:
    """Ids of ``words`` (each must be one token), or a :class:`TaskTokenizerError` listing the offenders."""
    ids: dict[str, int] = {}
    bad: list[str] = []
    for word in words:
        tok = single_token(tokenizer, word)
        if tok is None:
            bad.append(repr(word))
        else:
            ids[word] = tok
    if bad:
        raise TaskTokenizerError(
            f"task '{task}': {what} must each be a single token, but tokenizer "
            f"{type(tokenizer).__name__} splits {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; "
            "use a tokenizer that can express the task (e.g. GPT-2's)"
        )
    return ids


def _first_per_token(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[str]:
    """The first word of each token id (later words mapping to the same id are dropped)."""
    seen: set[int | None] = set()
    out = []
    for w in words:
        tok = single_token(tokenizer, " " + w)
        if tok not in seen:
            seen.add(tok)
            out.append(w)
    return out


def keep_single_tokens(
    tokenizer: PreTrainedTokenizerBase, words: Sequence[str], task: str, what: str, minimum: int
) -> list[str]:
    """The words whose ``" " + word`` is one token (others dropped with a warning); at least ``minimum``."""
    kept = [w for w in words if single_token(tokenizer, " " + w) is not None]
    distinct = {single_token(tokenizer, " " + w) for w in kept}
    if len(distinct) < len(kept):  # words that share a token cannot be told apart
        kept = _first_per_token(tokenizer, kept)
    if len(kept) < len(words):
        dropped = sorted(set(words) - set(kept))
        logger.warning(
            "task %s: dropping %d %s that are not single tokens: %s", task, len(dropped), what, dropped
        )
    if len(kept) < minimum:
        raise TaskTokenizerError(
            f"task '{task}': only {len(kept)} of {len(words)} {what} are single tokens with a leading space "
            f"for tokenizer {type(tokenizer).__name__}, need at least {minimum}; "
            "use a tokenizer that can express the task (e.g. GPT-2's)"
        )
    return kept


def word_token_positions(
    tokenizer: PreTrainedTokenizerBase,
    pieces: Sequence[tuple[str | None, str]],
    task: str,
    multi_token: Sequence[str] = (),
) -> tuple[str, list[int], dict[str, list[int]]]:
    """Tokenize the concatenation of ``pieces`` and find the token(s) of each named piece.

    ``pieces`` are ``(name, text)`` in order (``name`` None for unnamed text); a piece's leading space
    is not part of its word. Each named piece must be exactly one token that holds no other named
    word, unless its name is in ``multi_token``. Uses the fast tokenizer's character offsets.
    Returns ``(text, ids, name -> token positions)``; raises :class:`TaskTokenizerError` otherwise.
    """
    text = "".join(p for _, p in pieces)
    if not getattr(tokenizer, "is_fast", False):
        raise TaskTokenizerError(
            f"task '{task}' locates words through character offsets, which need a fast tokenizer; "
            f"{type(tokenizer).__name__} is not one (load it with use_fast=True)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    spans: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name, piece in pieces:
        start, stop = cursor + (len(piece) - len(piece.lstrip(" "))), cursor + len(piece)
        cursor += len(piece)
        if name is not None:
            spans[name] = (start, stop)
    found: dict[str, list[int]] = {}
    for name, (start, stop) in spans.items():
        hits = [t for t, (a, b) in enumerate(offsets) if a < stop and b > start and b > a]
        owners = [
            other
            for t in hits
            for other, (a2, b2) in spans.items()
            if other != name and offsets[t][0] < b2 and offsets[t][1] > a2
        ]
        if not hits or owners or (len(hits) != 1 and name not in multi_token):
            words = [tokenizer.decode([ids[t]]) for t in hits]
            raise TaskTokenizerError(
                f"task '{task}': in {text!r} the word {text[start:stop]!r} (role {name}) is tokenized as "
                f"{words}{' shared with ' + str(sorted(set(owners))) if owners else ''}; the task needs it "
                f"to be a single token of its own; use a tokenizer that can express the task (e.g. GPT-2's)"
            )
        found[name] = hits
    return text, ids, found


def pad_batch(
    rows: Sequence[Sequence[int]], pad: int, width: int | None = None
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Right-pad token rows with ``pad`` to ``width`` (default: the longest row); tokens and lengths."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    longest = int(lengths.max()) if len(rows) else 0
    width = longest if width is None else max(width, longest)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return tokens, lengths


def check_n(n: int, task: str) -> None:
    """Reject a non-positive prompt count with a clear message."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"task '{task}': the number of prompts must be a positive integer, got n={n!r}")


def check_options(task: str, opts: dict[str, Any], valid: str = "none") -> None:
    """Reject unknown ``make_prompts`` options; IOI's ``prompt_type`` is accepted at its default ``"mixed"``.

    Generic callers may pass ``prompt_type=cfg.task.prompt_type`` to every task, so the default is ignored.
    """
    rest = {k: v for k, v in opts.items() if not (k == "prompt_type" and v in (None, "mixed"))}
    if rest:
        raise TypeError(f"task '{task}' make_prompts: unknown or unsupported options {rest}; valid: {valid}")


def at_end(
    logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
) -> Float[Tensor, "batch d_vocab"]:
    """The logits at each prompt's ``end`` position."""
    if logits.ndim != 3 or logits.shape[0] != len(prompts):
        raise ValueError(
            f"task '{prompts.task}': expected logits of shape [batch={len(prompts)}, pos, d_vocab], "
            f"got {tuple(logits.shape)}"
        )
    end = prompts.end.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), end]


def check_w_u(W_U: Float[Tensor, "d_model d_vocab"], prompts: TaskPrompts) -> None:
    """Validate the unembedding's shape against the prompts' answer ids."""
    top = int(prompts.correct.max()) if len(prompts) else -1
    if W_U.ndim != 2 or W_U.shape[1] <= top:
        raise ValueError(
            f"task '{prompts.task}': expected W_U of shape [d_model, d_vocab > {top}], "
            f"got {tuple(W_U.shape)}; "
            "pass the model's unembedding (model.W_U), not its transpose"
        )


class Task(abc.ABC):
    """A task: how to build prompts, its role names, its direction, metric and correctness check.

    ``metric(logits)`` at ``end`` equals ``resid_final_normalized[end] . direction(W_U)`` plus the same
    combination of the unembedding bias ``b_U`` (zero for centred, bias-free unembeddings), since
    ``logits = resid_final_normalized @ W_U + b_U`` and both apply the same linear functional over the
    vocabulary.
    """

    name: str = ""
    direction_name: str = ""
    role_names: list[str] = []

    @abc.abstractmethod
    def make_prompts(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n: int,
        seed: int = 0,
        prepend_bos: bool = False,
        **opts: Any,
    ) -> TaskPrompts:
        """Build ``n`` prompts deterministically from ``seed``."""

    @abc.abstractmethod
    def direction(
        self, W_U: Float[Tensor, "d_model d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, "batch d_model"]:
        """The task direction in the residual space, one per prompt (section 4.1)."""

    @abc.abstractmethod
    def metric(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, " batch"]:
        """The task's logit difference at ``end``."""

    @abc.abstractmethod
    def is_correct(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Bool[Tensor, " batch"]:
        """Whether the model gets each prompt right (section 4.2)."""

    @abc.abstractmethod
    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Raise :class:`TaskTokenizerError` when the tokenizer cannot express the task."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def _assemble(
        self,
        tokenizer: PreTrainedTokenizerBase,
        rows: list[list[int]],
        texts: list[str],
        roles: list[dict[str, int]],
        correct: Sequence[int] | Tensor,
        wrong: Sequence[int] | Tensor | None,
        meta: list[dict[str, Any]],
        prepend_bos: bool,
        corrupted_rows: list[list[int]] | None = None,
        corrupted_texts: list[str] | None = None,
        **extra: Any,
    ) -> TaskPrompts:
        """Pad the token rows and bundle them with roles, resolved labels and answers (``wrong=None``: -1).

        ``corrupted_rows`` / ``corrupted_texts`` (optional) are the corrupted counterparts; clean and
        corrupted tokens are padded to one common width.
        """
        n = len(rows)
        width = max((len(r) for r in list(rows) + list(corrupted_rows or [])), default=0)
        tokens, lengths = pad_batch(rows, pad_id(tokenizer), width)
        corrupted_tokens = corrupted_lengths = None
        if corrupted_rows is not None:
            if len(corrupted_rows) != n or corrupted_texts is None or len(corrupted_texts) != n:
                raise ValueError(
                    f"task '{self.name}': {n} prompts but {len(corrupted_rows)} corrupted token rows and "
                    f"{None if corrupted_texts is None else len(corrupted_texts)} corrupted texts"
                )
            corrupted_tokens, corrupted_lengths = pad_batch(corrupted_rows, pad_id(tokenizer), width)
        return TaskPrompts(
            texts=texts,
            tokens=tokens,
            lengths=lengths,
            end=torch.tensor([r["end"] for r in roles], dtype=torch.long),
            roles=roles,
            labels=[resolve_labels(r, self.role_names) for r in roles],
            correct=torch.as_tensor(correct, dtype=torch.long),
            wrong=torch.full((n,), -1, dtype=torch.long)
            if wrong is None
            else torch.as_tensor(wrong, dtype=torch.long),
            meta=meta,
            task=self.name,
            prepend_bos=prepend_bos,
            corrupted_texts=corrupted_texts if corrupted_rows is not None else None,
            corrupted_tokens=corrupted_tokens,
            corrupted_lengths=corrupted_lengths,
            **extra,
        )


class TokenPairTask(Task):
    """A task whose answer is one token against one wrong token (IOI: IO vs S; gp: pronoun vs the other)."""

    def direction(
        self, W_U: Float[Tensor, "d_model d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, "batch d_model"]:
        """``W_U[:, correct] - W_U[:, wrong]`` per prompt."""
        check_w_u(W_U, prompts)
        return (W_U[:, prompts.correct.to(W_U.device)] - W_U[:, prompts.wrong.to(W_U.device)]).T

    def metric(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, " batch"]:
        """``logit(correct) - logit(wrong)`` at ``end``."""
        final = at_end(logits, prompts)
        rows = torch.arange(final.shape[0], device=final.device)
        return final[rows, prompts.correct.to(final.device)] - final[rows, prompts.wrong.to(final.device)]

    def is_correct(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Bool[Tensor, " batch"]:
        """The argmax at ``end`` is the correct token."""
        return at_end(logits, prompts).argmax(-1) == prompts.correct.to(logits.device)
