"""Hook names of the residual-stream quantities attncomm reads, shared by every model view.

Both :class:`~attncomm.models.adapter.ModelAdapter` (the TransformerLens bridge) and
:class:`~attncomm.models.plain_model.PlainModel` (tracing's fast start) cache activations under these
names, so code that reads a cache does not depend on which of them ran the model.
"""

from __future__ import annotations

from typing import Any

from attncomm.core.types import ArchFacts


class HookNames:
    """Names of the hooks attncomm caches (the bridge's names; see ``models.adapter``)."""

    cfg: Any
    arch: ArchFacts

    def resid_pre(self, layer: int) -> str:
        """Residual stream entering block ``layer`` (``blocks.0``: the embedding)."""
        return f"blocks.{layer}.hook_resid_pre"

    def ln1_normalized(self, layer: int) -> str:
        """Attention input after normalisation, before the (folded) gain: ``x_t`` of docs/METHOD.md."""
        return f"blocks.{layer}.ln1.hook_normalized"

    def ln1_scale(self, layer: int) -> str:
        """``scale_t`` of the attention input norm, shape ``[batch pos 1]``."""
        return f"blocks.{layer}.ln1.hook_scale"

    def attn_scores(self, layer: int) -> str:
        """Pre-softmax scores divided by ``attn_scale`` (Gemma-2: after the softcap), causal-masked."""
        return f"blocks.{layer}.attn.hook_attn_scores"

    def pattern(self, layer: int) -> str:
        """Attention pattern ``[batch head_index query_pos key_pos]``."""
        return f"blocks.{layer}.attn.hook_pattern"

    def q(self, layer: int) -> str:
        """Queries before rotary, ``[batch pos head_index d_head]``."""
        return f"blocks.{layer}.attn.hook_q"

    def k(self, layer: int) -> str:
        """Keys before rotary, ``[batch pos kv_head d_head]`` (kv heads for GQA models)."""
        return f"blocks.{layer}.attn.hook_k"

    def v(self, layer: int) -> str:
        """Values ``[batch pos kv_head d_head]`` (kv heads for GQA models)."""
        return f"blocks.{layer}.attn.hook_v"

    def z(self, layer: int) -> str:
        """Per-head attention-weighted values ``[batch pos head_index d_head]``."""
        return f"blocks.{layer}.attn.hook_z"

    def attn_out(self, layer: int) -> str:
        """The attention block's write into the residual (Gemma-2: after ``ln1_post``)."""
        return f"blocks.{layer}.hook_attn_out"

    def mlp_out(self, layer: int) -> str:
        """The MLP's write into the residual (Gemma-2: after ``ln2_post``)."""
        return f"blocks.{layer}.hook_mlp_out"

    def ln1_post_scale(self, layer: int) -> str:
        """Scale of Gemma-2's post-attention norm; raises for models without one."""
        if not self.arch.post_attn_norm:
            raise ValueError(f"model {self.cfg.name!r} has no post-attention norm (ln1_post)")
        return f"blocks.{layer}.ln1_post.hook_scale"

    def ln_final_scale(self) -> str:
        """Scale of the final norm, ``[batch pos 1]``."""
        return "ln_final.hook_scale"
