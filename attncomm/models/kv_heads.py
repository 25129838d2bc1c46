"""Grouped-query attention turned, for a while, into the same model with one key/value head per query
head, so that each query head's key and value inputs can be patched alone.

A grouped-query model (Llama, Qwen2, Mistral, Gemma-2) computes ``n_kv_heads`` keys and values, each
read by the ``n_heads / n_kv_heads`` query heads of its group (query head ``h`` reads kv head
``h // group``, the ``repeat_interleave`` layout). Repeating each kv head's projection rows ``group``
times gives a multi-head model with exactly the same outputs, in which query head ``h`` has its own key
and value computed from its own copy of the residual (``hook_k_input[..., h, :]`` /
``hook_v_input[..., h, :]`` with split q/k/v inputs on). Edge-level methods need that: the edge graph has
a ``<k>`` and a ``<v>`` slot per query head, and patching ``u -> a{l}.h{h}<k>`` must change query head
``h``'s key only, not its group-mates'.

:func:`per_query_head_kv` does the expansion in place on the TransformerLens bridge (the ``k`` / ``v``
linear weights and biases of every attention block, the HF module's ``num_key_value_groups`` and the
attention configs' ``n_key_value_heads``) and undoes it on exit, so the loaded model is unchanged
afterwards. Verified on TransformerLens 4.3's ``PositionEmbeddingsAttentionBridge`` (the Llama family and
Gemma-2); the tests check that the expanded model's logits equal the grouped model's and that patching
all of a group's per-head key inputs equals patching the shared key input of the grouped model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _expand_linear(linear: nn.Linear, n_kv: int, group: int) -> tuple[Any, Any, int]:
    """Repeat each of the ``n_kv`` head blocks of rows of ``linear`` ``group`` times, in place; return
    the old ``(weight, bias, out_features)`` for restoring."""
    old = (linear.weight, linear.bias, linear.out_features)
    d_head = linear.weight.shape[0] // n_kv
    with torch.no_grad():
        w = linear.weight.detach().view(n_kv, d_head, -1).repeat_interleave(group, dim=0)
        linear.weight = nn.Parameter(w.reshape(n_kv * group * d_head, -1).contiguous(), requires_grad=False)
        if linear.bias is not None:
            b = linear.bias.detach().view(n_kv, d_head).repeat_interleave(group, dim=0)
            linear.bias = nn.Parameter(b.reshape(-1).contiguous(), requires_grad=False)
    linear.out_features = linear.weight.shape[0]
    return old


@contextlib.contextmanager
def per_query_head_kv(bridge: Any, n_heads: int, n_kv_heads: int) -> Iterator[None]:
    """Within the block, ``bridge`` computes one key and one value per query head (same outputs)."""
    if n_kv_heads == n_heads:
        yield
        return
    group = n_heads // n_kv_heads
    undo: list[Any] = []
    try:
        for block in bridge.blocks:
            attn = block.attn
            hf_attn = attn.original_component
            for name in ("k", "v"):
                linear = getattr(attn, name).original_component
                old = _expand_linear(linear, n_kv_heads, group)
                undo.append(lambda lin=linear, old=old: _restore_linear(lin, old))
            groups = getattr(hf_attn, "num_key_value_groups", None)
            if groups is not None:
                hf_attn.num_key_value_groups = 1
                undo.append(lambda m=hf_attn, g=groups: setattr(m, "num_key_value_groups", g))
            for cfg in {id(c): c for c in (attn.config, bridge.cfg) if c is not None}.values():
                if getattr(cfg, "n_key_value_heads", None) is not None:
                    old_kv = cfg.n_key_value_heads
                    cfg.n_key_value_heads = n_heads
                    undo.append(lambda c=cfg, v=old_kv: setattr(c, "n_key_value_heads", v))
        yield
    finally:
        for step in reversed(undo):
            step()


def _restore_linear(linear: nn.Linear, old: tuple[Any, Any, int]) -> None:
    linear.weight, linear.bias, linear.out_features = old
