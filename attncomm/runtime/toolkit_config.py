"""Typed config sections of the toolkit stages (``dla``, ``logit_lens``, ``act_patch``, ``path_patch``,
``ablate``, ``attr_patch``, ``heads``, ``qk_ov``); each is a top-level key of :class:`AppConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DlaConfig:
    top_k: int = 10  # heads in the bar chart of the top heads


@dataclass
class LogitLensConfig:
    incl_mid: bool = True  # include resid_mid entries where the model has them


@dataclass
class ActPatchConfig:
    #: denoising: run corrupted, patch in clean; noising: run clean, patch in corrupted; both: both tables
    direction: str = "denoising"
    #: what to patch: resid_pre, attn_out, mlp_out (layer x pos), z, q, k, v, pattern (layer x head, all
    #: positions and by position)
    kinds: list[str] = field(
        default_factory=lambda: ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]
    )
    by_position: bool = True  # head kinds also by position (layer x head x pos)
    max_batch: int = 256  # rows per forward pass (prompts x cells patched at once)


@dataclass
class PathPatchConfig:
    direction: str = "denoising"
    #: [[layer, head], ...] sender heads; null: every head
    senders: list[list[int]] | None = None
    #: receivers: [layer, head, q|k|v] heads' inputs, or [logits]; e.g. [[9,6,q],[10,0,k]]
    receivers: list[list[Any]] = field(default_factory=lambda: [["logits"]])
    #: positions where the receivers read the patched paths; null: every position
    positions: list[int] | None = None
    max_batch: int = 256


@dataclass
class AblateConfig:
    heads: list[list[int]] = field(default_factory=list)  # [[layer, head], ...]
    method: str = "mean"  # zero | mean (over the task's prompts) | resample (from the corrupted run)
    positions: list[int] | None = None  # null: every position


@dataclass
class AttrPatchConfig:
    direction: str = "denoising"
    kinds: list[str] = field(default_factory=lambda: ["z", "q", "k", "v", "mlp_out"])
    compare: bool = True  # also run act_patch on the same cells and report the correlation
    max_batch: int = 256


@dataclass
class HeadsConfig:
    seq_len: int = 20  # length of the random sequence that is repeated for induction scores
    n_sequences: int = 16
    seed: int = 0
    top_k: int = 5


@dataclass
class QkOvConfig:
    heads: list[list[int]] = field(default_factory=lambda: [[0, 0]])
    top_k: int = 10
    #: tokens (strings) whose top destinations (OV) and top keys (QK) are listed; empty: the answer
    #: tokens of the first prompts
    tokens: list[str] = field(default_factory=list)
