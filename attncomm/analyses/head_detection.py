"""Head-type scores for every head: previous-token, duplicate-token, induction and attention to BOS.

The first three use TransformerLens's ``transformer_lens.head_detector`` detection patterns
(``get_previous_token_head_detection_pattern``, ``get_duplicate_token_head_detection_pattern``,
``get_induction_head_detection_pattern``) and its ``compute_head_attention_similarity_score``
(``error_measure="mul"``: the share of a head's attention that falls on the pattern), averaged over
``n_sequences`` sequences of ``seq_len`` random tokens repeated twice. Attention to BOS is the mean
attention of every query position after the first to position 0 on the task's prompts (within each
prompt's length).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.tasks.base import TaskPrompts

HEAD_TYPES = ("previous_token", "duplicate_token", "induction", "bos")


def repeated_random_tokens(model: ModelAdapter, seq_len: int, n: int, seed: int = 0) -> Tensor:
    """``n`` sequences of ``seq_len`` distinct random ordinary tokens, each repeated twice."""
    from attncomm.tasks.induction import InductionTask

    try:
        pool = np.asarray(InductionTask(max(seq_len, 3)).candidates(model.tokenizer))
    except Exception:  # noqa: BLE001 - any tokenizer the induction task cannot use: fall back to ids
        pool = np.arange(model.arch.d_vocab)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    pool = np.asarray([t for t in pool.tolist() if t not in special and t < model.arch.d_vocab])
    rng = np.random.default_rng(seed)
    rows = [rng.choice(pool, size=seq_len, replace=False) for _ in range(n)]
    first = torch.as_tensor(np.stack(rows), dtype=torch.long)
    return torch.cat([first, first], dim=1)


def head_scores(
    model: ModelAdapter, prompts: TaskPrompts | None, seq_len: int = 20, n_sequences: int = 16, seed: int = 0
) -> pd.DataFrame:
    """One row per (type, layer, head): ``type``, ``layer``, ``head``, ``value``."""
    from transformer_lens import head_detector as hd

    L, H = model.arch.n_layers, model.arch.n_heads
    tokens = repeated_random_tokens(model, seq_len, n_sequences, seed)
    names = [model.pattern(layer) for layer in range(L)]
    _, cache = model.run_with_cache(tokens, names)
    detectors = {
        "previous_token": hd.get_previous_token_head_detection_pattern,
        "duplicate_token": hd.get_duplicate_token_head_detection_pattern,
        "induction": hd.get_induction_head_detection_pattern,
    }
    scores = {kind: torch.zeros(L, H, dtype=torch.float64) for kind in detectors}
    for i in tqdm(range(len(tokens)), desc="head detection", leave=False):
        patterns = {kind: fn(tokens[i].cpu()) for kind, fn in detectors.items()}
        for layer in range(L):
            attn = cache[names[layer]][i].detach().cpu().to(torch.float64)
            for kind, det in patterns.items():
                det = det.to(torch.float64)
                for head in range(H):
                    scores[kind][layer, head] += hd.compute_head_attention_similarity_score(
                        attn[head], det, exclude_bos=False, exclude_current_token=False, error_measure="mul"
                    )
    rows = []
    for kind, mat in scores.items():
        mat = mat / len(tokens)
        rows += [
            {"type": kind, "layer": la, "head": h, "value": float(mat[la, h])}
            for la in range(L)
            for h in range(H)
        ]
    if prompts is not None:
        _, pc = model.run_with_cache(prompts.tokens, names)
        lengths = prompts.lengths
        for layer in range(L):
            pat = pc[names[layer]].to(torch.float64)  # [batch head q k]
            q = torch.arange(pat.shape[2])
            valid = (q[None, :] >= 1) & (q[None, :] < lengths[:, None])  # [batch q]
            to_bos = (pat[..., 0] * valid[:, None, :]).sum((0, 2)) / valid.sum()
            rows += [{"type": "bos", "layer": layer, "head": h, "value": float(to_bos[h])} for h in range(H)]
    return pd.DataFrame(rows)


def top_heads(df: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` highest-scoring heads of each type (``rank`` 1 is the top)."""
    out = df.sort_values(["type", "value"], ascending=[True, False]).groupby("type", sort=False).head(k)
    return out.assign(rank=out.groupby("type").cumcount() + 1).reset_index(drop=True)
