"""Value types shared by the core and the rest of the package: model facts, weights, firings, node ids.

They live here, inside ``attncomm.core``, so that the mathematics imports nothing outside core; the model
adapter fills :class:`ArchFacts`/:class:`HeadWeights`, tracing produces :class:`FiringRecord` keyed by
:data:`FiringKey`, and graphs are keyed by :data:`NodeId`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from jaxtyping import Float
from torch import Tensor

#: one firing: ``(prompt, layer, head, dest, src)``
FiringKey: TypeAlias = tuple[int, int, int, int, int]

#: ``(layer, head|'MLP'|'AH bias'|'Embedding', dest_label, src_label)`` or the root ``(name, label)``
NodeId: TypeAlias = tuple[int, int | str, str, str] | tuple[str, str]

#: non-head components of a node id
COMPONENT_KINDS: frozenset[str] = frozenset({"MLP", "AH bias", "Embedding"})


@dataclass(frozen=True)
class ArchFacts:
    """Architecture facts the ACC maths depends on, read from the booted model."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    normalization: str  # "LN" | "RMS"
    rotary: bool
    rotary_dim: int | None
    rotary_base: float | None
    rotary_adjacent_pairs: bool
    parallel_attn: bool
    post_attn_norm: bool  # Gemma-2 ln1_post
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float
    has_attn_bias: bool
    attn_scale: float  # hook_attn_scores = q.k / attn_scale

    @property
    def kv_group_size(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads


@dataclass
class HeadWeights:
    """Processed weights (after compatibility mode), GQA keys/values expanded to query heads."""

    W_Q: Float[Tensor, "layer head_index d_model d_head"]
    W_K: Float[Tensor, "layer head_index d_model d_head"]
    W_V: Float[Tensor, "layer head_index d_model d_head"]
    W_O: Float[Tensor, "layer head_index d_head d_model"]
    b_Q: Float[Tensor, "layer head_index d_head"]
    b_K: Float[Tensor, "layer head_index d_head"]
    b_V: Float[Tensor, "layer head_index d_head"]
    b_O: Float[Tensor, "layer d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"]
    W_E: Float[Tensor, "d_vocab d_model"]  # unscaled (Gemma: times ArchFacts.embed_scale at run time)
    W_pos: Float[Tensor, "n_ctx d_model"] | None  # None for rotary models
    #: multiplicative gain of Gemma-2's post-attention norm (``1 + w``); None without post-norms
    ln1_post_gain: Float[Tensor, "layer d_model"] | None = None


@dataclass
class FiringRecord:
    """What tracing keeps of one firing for later stages (interventions, sparsity, control signals)."""

    dest_terms: np.ndarray  # int64 [n_selected] (selection order)
    src_terms: np.ndarray  # int64 [n_selected] (empty: side not traced)
    contrib_dest: np.ndarray  # float [layer, H+2, d+1]
    contrib_src: np.ndarray  # float [layer, H+2, d+1]
