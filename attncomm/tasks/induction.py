"""Induction on repeated random token sequences, a task for toy models.

A prompt is a random sequence of ``seq_len`` distinct tokens followed by the same sequence again
(``[bos] + seq + seq`` with ``prepend_bos``). As for IOI the answer is part of the tokens: ``end`` =
the second-to-last position, where an induction head should predict the last token ``seq[-1]``
(``correct``; ``wrong`` = -1). Tokens are drawn directly (not from text): for each prompt
``numpy.random.default_rng(seed).choice(candidates, seq_len, replace=False)``, where ``candidates`` are
the ids in ``token_range`` (default: the whole vocabulary) minus the tokenizer's special tokens. So
``texts`` are the decoded tokens, for display only: re-tokenizing them need not give ``tokens``.

Metric: ``logit(correct) - mean_v logit(v)`` at ``end`` (no single wrong answer exists; the mean over
the whole vocabulary is the natural baseline), so the direction is ``W_U[:, correct] - mean_v W_U[:, v]``
(just ``W_U[:, correct]`` for a centred unembedding) and ``metric = resid . direction + b_U[correct] -
mean(b_U)``. Correct when the argmax at ``end`` is ``correct``.

Roles: ``A{i}`` / ``B{i}`` = position ``i`` of the first / second copy, then the roles that matter for
induction, which win collisions: ``starts`` = 0, ``prev`` = the earlier occurrence of the token at
``end`` (``A{L-2}``), ``next`` = the token after it (``A{L-1}``, where an induction head attends),
``end-1``, ``end``. The role list depends on ``seq_len``, fixed per task object
(``get_task("induction", seq_len=12)``).

Corrupted counterpart: the first copy replaced by a fresh random block of ``seq_len`` distinct tokens
that share none with the sequence (``[bos] + fresh + seq``), so the token at ``end`` has no earlier
occurrence and an induction head has nothing to copy. The blocks are drawn with a separate
``numpy.random.default_rng([seed, 1])``, so the clean prompts do not depend on them; when the
candidates hold fewer than ``2 * seq_len`` tokens the fresh block may share tokens with the sequence
(but never the token at ``end``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from attncomm.tasks.base import (
    Task,
    TaskPrompts,
    TaskTokenizerError,
    at_end,
    bos_id,
    check_n,
    check_options,
    check_w_u,
    pad_id,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_SEQ_LEN = 8


def fresh_block(rng: np.random.Generator, pool: np.ndarray, seq: Sequence[int]) -> list[int]:
    """``len(seq)`` distinct tokens from ``pool`` avoiding ``seq`` (or, if too few, avoiding ``seq[-2]``)."""
    others = pool[~np.isin(pool, np.asarray(seq))]
    if len(others) < len(seq):
        others = pool[pool != seq[-2]]
    if len(others) < len(seq):
        raise TaskTokenizerError(
            f"induction: the corrupted block needs {len(seq)} tokens other than the sequence's, "
            f"only {len(others)} are available; use a wider token_range"
        )
    return [int(t) for t in rng.choice(others, size=len(seq), replace=False)]


class InductionTask(Task):
    """Predict the next token of a repeated random sequence (``A B C ... A B [C]``)."""

    name = "induction"
    direction_name = "Correct - mean"

    def __init__(self, seq_len: int = DEFAULT_SEQ_LEN) -> None:
        if not isinstance(seq_len, int) or seq_len < 3:
            raise ValueError(f"induction: seq_len must be an integer >= 3, got {seq_len!r}")
        self.seq_len = seq_len
        self.role_names = (
            [f"A{i}" for i in range(seq_len)]
            + [f"B{i}" for i in range(seq_len)]
            + ["starts", "prev", "next", "end-1", "end"]
        )

    def candidates(
        self, tokenizer: PreTrainedTokenizerBase, token_range: Sequence[int] | None = None
    ) -> np.ndarray:
        """Token ids the sequences are drawn from: ``token_range`` (or the vocabulary) minus special ids."""
        low, high = (0, len(tokenizer)) if token_range is None else (int(token_range[0]), int(token_range[1]))
        if not 0 <= low < high <= len(tokenizer):
            raise ValueError(
                f"induction: token_range must satisfy 0 <= low < high <= vocabulary size {len(tokenizer)}, "
                f"got {tuple(token_range or ())}"
            )
        special = set(tokenizer.all_special_ids)
        return np.array([t for t in range(low, high) if t not in special], dtype=np.int64)

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Need at least ``seq_len`` non-special tokens (and a pad id)."""
        available = len(self.candidates(tokenizer))
        if available < self.seq_len:
            raise TaskTokenizerError(
                f"induction: tokenizer {type(tokenizer).__name__} has {available} non-special tokens, fewer "
                f"than seq_len={self.seq_len}; use a shorter sequence or a larger vocabulary"
            )
        pad_id(tokenizer)

    def make_prompts(
        self,
        tokenizer: PreTrainedTokenizerBase,
        n: int,
        seed: int = 0,
        prepend_bos: bool = False,
        token_range: Sequence[int] | None = None,
        **opts: Any,
    ) -> TaskPrompts:
        """``n`` repeated random sequences from ``seed``, drawn from ``token_range`` when given."""
        check_n(n, self.name)
        check_options(
            self.name, opts, "token_range (seq_len is fixed per task: get_task('induction', seq_len=...))"
        )
        self.check_tokenizer(tokenizer)
        pool = self.candidates(tokenizer, token_range)
        if len(pool) < self.seq_len:
            raise TaskTokenizerError(
                f"induction: token_range {tuple(token_range or ())} holds {len(pool)} usable tokens, "
                f"fewer than seq_len={self.seq_len}"
            )
        rng = np.random.default_rng(seed)
        L, offset = self.seq_len, 1 if prepend_bos else 0
        rows, texts, roles, meta, correct = [], [], [], [], []
        corrupt_rng = np.random.default_rng([seed, 1])
        corrupted_rows, corrupted_texts = [], []
        for _ in range(n):
            seq = [int(t) for t in rng.choice(pool, size=L, replace=False)]
            fresh = fresh_block(corrupt_rng, pool, seq)
            corrupted_rows.append(([bos_id(tokenizer)] if prepend_bos else []) + fresh + seq)
            corrupted_texts.append(tokenizer.decode(fresh + seq))
            ids = seq + seq
            role = {f"A{i}": i + offset for i in range(L)} | {f"B{i}": L + i + offset for i in range(L)}
            end = 2 * L - 2 + offset
            role |= {
                "starts": 0,
                "prev": L - 2 + offset,
                "next": L - 1 + offset,
                "end-1": end - 1,
                "end": end,
            }
            rows.append(([bos_id(tokenizer)] if prepend_bos else []) + ids)
            texts.append(tokenizer.decode(ids))
            roles.append(role)
            correct.append(seq[-1])
            meta.append({"sequence": seq, "corrupted_block": fresh})
        return self._assemble(
            tokenizer,
            rows,
            texts,
            roles,
            correct,
            None,
            meta,
            prepend_bos,
            corrupted_rows=corrupted_rows,
            corrupted_texts=corrupted_texts,
        )

    def direction(
        self, W_U: Float[Tensor, "d_model d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, "batch d_model"]:
        """``W_U[:, correct] - mean_v W_U[:, v]`` per prompt."""
        check_w_u(W_U, prompts)
        return (W_U[:, prompts.correct.to(W_U.device)] - W_U.mean(dim=1, keepdim=True)).T

    def metric(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Float[Tensor, " batch"]:
        """``logit(correct) - mean_v logit(v)`` at ``end``."""
        final = at_end(logits, prompts)
        rows = torch.arange(final.shape[0], device=final.device)
        return final[rows, prompts.correct.to(final.device)] - final.mean(-1)

    def is_correct(
        self, logits: Float[Tensor, "batch pos d_vocab"], prompts: TaskPrompts
    ) -> Bool[Tensor, " batch"]:
        """Argmax at ``end`` is the correct next token."""
        return at_end(logits, prompts).argmax(-1) == prompts.correct.to(logits.device)
