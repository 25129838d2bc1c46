"""Prompt-file tasks: a researcher's own prompts, answers and corrupted prompts, read from a file.

``task=file task.path=data.jsonl`` (also ``.csv`` and ``.json``; formats in
:mod:`attncomm.io.prompt_files`). One prompt per row; the answer is predicted at the prompt's last
token (``end``), which is **not** followed by the answer (unlike IOI, whose tokens include it).

Answers: text answers are tokenized as written (so write the leading space: ``" Paris"``). An answer
that is more than one token is replaced by its first token, and that choice is logged once (as MIB
does); with ``strict_answers=True`` such a row is refused with a message naming it. Token-id answers
(EAP-IG's ``correct_idx``) are used as given. Several answers (auto-circuit's ``answers`` lists) are
averaged: metric = mean logit of the answers - mean logit of the wrong answers at ``end`` (minus the
mean logit over the vocabulary when a row has no wrong answer), so the direction is the same
combination of ``W_U`` columns. Correct when the argmax at ``end`` is one of the answers.

Dropped rows (counted in the log, in ``prompts.extra["prompt_file"]``, which the run context writes to
the manifest and to wandb): exact duplicates of an earlier row, and rows whose answer and wrong answer
differ as text but start with the same token (a one-token metric cannot tell them apart). The first
``n`` remaining rows, in file order, are the prompts (``seed`` does not change them); fewer than ``n``
is an error that says how many there are.

Roles: ``starts`` = position 0; every other position is named by its distance from the end (``end``,
``end-1``, ...), so prompts of one template unify; roles given in the file (``roles: {name: word or
token index}``; a word is the last token of its first occurrence, an index counts tokens of the prompt
without BOS, negative from the end; auto-circuit's top-level ``word_idxs`` alike) win over those.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from attncomm.io.prompt_files import PromptFileError, PromptRow, read_prompt_file
from attncomm.tasks.base import Task, TaskPrompts, at_end, bos_id, check_n, check_options, encode, pad_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_BUILTIN_ROLE = re.compile(r"starts|end(-\d+)?")


def is_builtin_role(name: str) -> bool:
    """Whether ``name`` is one of the position names every file prompt gets (``starts``, ``end-k``)."""
    return _BUILTIN_ROLE.fullmatch(name) is not None


#: where the seed tasks' files live (package data)
SEED_DATA = Path(__file__).resolve().parent / "seed_data"


class FilePromptTask(Task):
    """Prompts, answers and corrupted prompts read from a file (see the module docstring)."""

    direction_name = "Answer - Wrong answer"

    def __init__(self, path: str | Path | None = None, strict_answers: bool = False, name: str = "file"):
        if not path:
            raise PromptFileError(
                f"task '{name}' reads its prompts from a file: set task.path=FILE (.jsonl, .csv or .json)"
            )
        self.name = name
        self.path = Path(path)
        self.strict_answers = bool(strict_answers)
        self.rows: list[PromptRow] = read_prompt_file(self.path)
        with_corrupted = [r.corrupted is not None for r in self.rows]
        if any(with_corrupted) and not all(with_corrupted):
            missing = self.rows[with_corrupted.index(False)].where
            raise PromptFileError(
                f"{missing}: no corrupted prompt, while other rows have one; give every row a corrupted "
                "prompt or none"
            )
        self.role_names = ["starts", "end"]

    # --- tokenization ---------------------------------------------------------------------------
    def _answer_id(self, tokenizer: PreTrainedTokenizerBase, row: PromptRow, answer: Any, what: str) -> int:
        """One token id for ``answer`` (text or id); first token of a longer text unless strict."""
        vocab = len(tokenizer)
        if isinstance(answer, int):
            if not 0 <= answer < vocab:
                raise PromptFileError(
                    f"{row.where}: the {what} token id {answer} is not in the tokenizer's vocabulary "
                    f"(0..{vocab - 1}); the ids must come from this model's tokenizer"
                )
            return answer
        ids = encode(tokenizer, answer)
        unk = tokenizer.unk_token_id
        if not ids or (unk is not None and unk in ids):
            raise PromptFileError(
                f"{row.where}: the tokenizer {type(tokenizer).__name__} cannot express the {what} "
                f"{answer!r} (tokens {ids}); write it in characters the tokenizer knows"
            )
        if len(ids) > 1:
            if self.strict_answers:
                words = [tokenizer.decode([i]) for i in ids]
                raise PromptFileError(
                    f"{row.where}: the {what} {answer!r} is {len(ids)} tokens {words} and "
                    "task.strict_answers=true; use a one-token answer or task.strict_answers=false "
                    "(which uses the first token)"
                )
            self._multi_token.append((row.where, answer, tokenizer.decode([ids[0]])))
        return ids[0]

    def _positions(
        self, tokenizer: PreTrainedTokenizerBase, row: PromptRow, ids: list[int], offset: int
    ) -> dict[str, int]:
        """Role positions: ``starts``, ``end-k`` for every position, then the file's roles."""
        n = len(ids)
        end = n - 1 + offset
        roles = {("end" if k == 0 else f"end-{k}"): end - k for k in range(n + offset)}
        roles["starts"] = 0
        named: dict[str, int] = {}
        for role, where in row.roles.items():
            if is_builtin_role(role):  # end, end-k, starts: it must agree, it cannot move
                pos = where % n + offset if isinstance(where, int) and -n <= where < n else None
                if pos is None or pos != roles.get(role):
                    raise PromptFileError(
                        f"{row.where}: role {role!r} is a built-in position name (starts = 0, end = the "
                        f"last token, end-k = k tokens before it) and cannot be moved to {where!r}; "
                        "rename the role"
                    )
                continue
            if isinstance(where, int):
                if not -n <= where < n:
                    raise PromptFileError(
                        f"{row.where}: role {role!r} at token index {where}, but the prompt has {n} tokens; "
                        f"use an index in {-n}..{n - 1}"
                    )
                named[role] = where % n + offset
            else:
                named[role] = self._word_position(tokenizer, row, role, where) + offset
        roles.update(named)
        return roles

    @staticmethod
    def _word_position(tokenizer: PreTrainedTokenizerBase, row: PromptRow, role: str, word: str) -> int:
        start = row.clean.find(word)
        if not word or start < 0:
            raise PromptFileError(
                f"{row.where}: role {role!r} names the word {word!r}, which is not in the prompt "
                f"{row.clean!r}; name a word of the prompt or give a token index"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise PromptFileError(
                f"{row.where}: roles given as words need a fast tokenizer (character offsets); give token "
                "indices instead"
            )
        enc = tokenizer(row.clean, add_special_tokens=False, return_offsets_mapping=True)
        stop = start + len(word)
        hits = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < stop and b > start and b > a]
        return hits[-1]

    def _labels(self, roles: dict[str, int], named: list[str]) -> dict[int, str]:
        """One label per position: the end-relative names, then ``starts``, then the file's roles."""
        labels: dict[int, str] = {}
        for role, pos in roles.items():
            if role not in named and role != "starts":
                labels[pos] = role
        labels[roles["starts"]] = "starts"
        for role in named:
            labels[roles[role]] = role
        return labels

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Need a pad id; the answers are checked row by row in :meth:`make_prompts`."""
        pad_id(tokenizer)

    def make_prompts(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n: int,
        seed: int = 0,
        prepend_bos: bool = False,
        **opts: Any,
    ) -> TaskPrompts:
        """The first ``n`` usable rows of the file (dropped rows are counted and logged)."""
        check_n(n, self.name)
        check_options(self.name, opts)
        self._multi_token: list[tuple[str, str, str]] = []
        offset = 1 if prepend_bos else 0
        bos = [bos_id(tokenizer)] if prepend_bos else []
        seen: dict[tuple[Any, ...], str] = {}
        dropped: Counter[str] = Counter()
        kept: list[tuple[PromptRow, list[int], list[int]]] = []
        for row in self.rows:
            answers = [self._answer_id(tokenizer, row, a, "answer") for a in row.answers]
            wrong = [self._answer_id(tokenizer, row, w, "wrong answer") for w in row.wrong]
            if row.key() in seen:
                dropped["duplicate of an earlier row"] += 1
                continue
            seen[row.key()] = row.where
            if set(answers) & set(wrong):
                dropped["answer and wrong answer start with the same token"] += 1
                continue
            kept.append((row, answers, wrong))
        report = {
            "path": str(self.path),
            "rows_read": len(self.rows),
            "rows_dropped": sum(dropped.values()),
            "dropped_reasons": dict(dropped),
            "rows_usable": len(kept),
            "rows_used": min(n, len(kept)),
            "multi_token_answers": len(self._multi_token),
        }
        if dropped:
            logger.warning(
                "task %s: %s: read %d rows, dropped %d (%s)",
                self.name,
                self.path,
                len(self.rows),
                report["rows_dropped"],
                ", ".join(f"{k}: {v}" for k, v in dropped.items()),
            )
        if self._multi_token:
            where, answer, first = self._multi_token[0]
            logger.warning(
                "task %s: %d answers are more than one token; the first token is used (e.g. %s: %r -> %r); "
                "set task.strict_answers=true to refuse them",
                self.name,
                len(self._multi_token),
                where,
                answer,
                first,
            )
        if not kept:
            raise PromptFileError(
                f"{self.path}: no usable rows (read {len(self.rows)}, all dropped: {dict(dropped)}); "
                "make each row's answer and wrong answer start with different tokens of this model's "
                "tokenizer"
            )
        if len(kept) < n:
            raise PromptFileError(
                f"{self.path}: {len(kept)} usable rows (read {len(self.rows)}, dropped "
                f"{report['rows_dropped']}{': ' + str(dict(dropped)) if dropped else ''}), fewer than "
                f"task.n_prompts={n}; set task.n_prompts={len(kept)} or add rows"
            )
        rows, texts, roles, labels, meta = [], [], [], [], []
        corrupted_rows: list[list[int]] = []
        corrupted_texts: list[str] = []
        correct, wrong_first = [], []
        names: list[str] = []
        for row, answers, wrong in kept[:n]:
            ids = encode(tokenizer, row.clean)
            role = self._positions(tokenizer, row, ids, offset)
            named = [r for r in row.roles if not is_builtin_role(r)]
            rows.append(bos + ids)
            texts.append(row.clean)
            roles.append(role)
            labels.append(self._labels(role, named))
            for name in list(role) + named:
                if name not in names:
                    names.append(name)
            if row.corrupted is not None:
                corrupted_rows.append(bos + encode(tokenizer, row.corrupted))
                corrupted_texts.append(row.corrupted)
            correct.append(answers[0])
            wrong_first.append(wrong[0] if wrong else -1)
            meta.append(
                {
                    "source": row.where,
                    "answers": [tokenizer.decode([a]) for a in answers],
                    "wrong_answers": [tokenizer.decode([w]) for w in wrong],
                    "answer_ids": answers,
                    "wrong_ids": wrong,
                }
            )
        self.role_names = names
        has_corrupted = self.rows[0].corrupted is not None
        prompts = self._assemble(
            tokenizer,
            rows,
            texts,
            roles,
            correct,
            wrong_first,
            meta,
            prepend_bos,
            corrupted_rows=corrupted_rows if has_corrupted else None,
            corrupted_texts=corrupted_texts if has_corrupted else None,
        )
        prompts.labels = labels
        prompts.extra["prompt_file"] = report
        return prompts

    # --- metric ---------------------------------------------------------------------------------
    @staticmethod
    def _weights(prompts: TaskPrompts, d_vocab: int, dtype: torch.dtype) -> Float[Tensor, "batch d_vocab"]:
        """Per prompt: +1/|answers| on the answers, -1/|wrong| on the wrong answers (or -1/d_vocab on all)."""
        weights = torch.zeros(len(prompts), d_vocab, dtype=dtype)
        for i, m in enumerate(prompts.meta):
            answers = m.get("answer_ids", [int(prompts.correct[i])])
            wrong = m.get("wrong_ids", [] if int(prompts.wrong[i]) < 0 else [int(prompts.wrong[i])])
            if wrong:
                weights[i, wrong] -= 1.0 / len(wrong)
            else:
                weights[i] -= 1.0 / d_vocab
            weights[i, answers] += 1.0 / len(answers)
        return weights

    def direction(
        self, W_U: Float[Tensor, "d_model d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, "batch d_model"]:
        """Mean ``W_U`` column of the answers minus that of the wrong answers (or of the vocabulary)."""
        weights = self._weights(prompts, W_U.shape[1], W_U.dtype).to(W_U.device)
        return weights @ W_U.T

    def metric(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, " batch"]:
        """Mean logit of the answers minus that of the wrong answers (or of the vocabulary) at ``end``."""
        final = at_end(logits, prompts)
        weights = self._weights(prompts, final.shape[-1], final.dtype).to(final.device)
        return (final * weights).sum(-1)

    def is_correct(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Bool[Tensor, " batch"]:
        """The argmax at ``end`` is one of the row's answers."""
        pred = at_end(logits, prompts).argmax(-1).cpu()
        return torch.tensor(
            [
                int(pred[i]) in m.get("answer_ids", [int(prompts.correct[i])])
                for i, m in enumerate(prompts.meta)
            ],
            dtype=torch.bool,
            device=logits.device,
        )


def seed_task_path(name: str) -> Path:
    """The packaged file of the seed task ``name`` (``syllogism`` or ``sequence``)."""
    return SEED_DATA / f"{name}.jsonl"


class SeedFileTask(FilePromptTask):
    """A prompt-file task whose file ships with the package (``task=syllogism``, ``task=sequence``)."""

    seed_name = ""

    def __init__(self, strict_answers: bool = False, path: str | Path | None = None) -> None:
        super().__init__(path or seed_task_path(self.seed_name), strict_answers, name=self.seed_name)


class SyllogismTask(SeedFileTask):
    """``All birds are endothermic, not ectothermic. Dogs are birds. Therefore, dogs are`` -> `` end``."""

    seed_name = "syllogism"


class SequenceTask(SeedFileTask):
    """Sequence continuation: ``1 2 3 4`` -> `` 5``, ``January February March`` -> `` April``, ..."""

    seed_name = "sequence"
