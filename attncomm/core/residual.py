"""Decomposition of the residual stream into upstream component writes (docs/METHOD.md section 3).

The residual entering layer ``l`` is exactly the embedding plus, for every upstream layer ``l' < l``,
the heads' writes broken down by source token, the MLP write and the attention-output bias. Pure
functions: tensors in (a hook cache of ONE prompt batch), tensors out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import einops
import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:  # dataclasses only; keeps the model-loading stack out of core's imports
    from attncomm.core.types import ArchFacts, HeadWeights


class ResidualHookNames(Protocol):
    """The hook names :func:`component_writes` reads (``ModelAdapter`` provides them)."""

    def resid_pre(self, layer: int) -> str: ...
    def pattern(self, layer: int) -> str: ...
    def v(self, layer: int) -> str: ...
    def mlp_out(self, layer: int) -> str: ...
    def ln1_post_scale(self, layer: int) -> str: ...


@dataclass(frozen=True)
class ComponentWrites:
    """Every upstream component's write into the residual stream of one prompt (not yet divided by scale)."""

    embed: Float[Tensor, "pos d_model"]
    heads: Float[Tensor, "layer head_index pos pos d_model"]  # [l', h', dest t, source t']
    mlp: Float[Tensor, "layer pos d_model"]
    bias: Float[Tensor, "layer d_model"]

    def total(self) -> Float[Tensor, "pos d_model"]:
        """The residual these writes add up to (heads summed over source tokens, bias at every position)."""
        heads = einops.reduce(self.heads, "layer head dest src d_model -> dest d_model", "sum")
        mlp = einops.reduce(self.mlp, "layer pos d_model -> pos d_model", "sum")
        return self.embed + heads + mlp + self.bias.sum(0)


def required_hooks(names: ResidualHookNames, arch: ArchFacts, layer: int) -> list[str]:
    """The hook names :func:`component_writes` needs for the residual entering ``layer``."""
    hooks = [names.resid_pre(0)]
    for up in range(layer):
        hooks += [names.pattern(up), names.v(up), names.mlp_out(up)]
        if arch.post_attn_norm:
            hooks.append(names.ln1_post_scale(up))
    return hooks


def head_writes(
    pattern: Float[Tensor, "head_index dest src"],
    v: Float[Tensor, "src kv_head d_head"],
    W_O: Float[Tensor, "head_index d_head d_model"],
    kv_group_size: int,
    post_gain: Float[Tensor, " d_model"] | None = None,
    post_scale: Float[Tensor, "dest 1"] | None = None,
) -> Float[Tensor, "head_index dest src d_model"]:
    """One layer's head writes by source token, ``A[t,t'] v(t') W_O`` (times the post-norm gain / scale).

    Query head ``h`` reads kv head ``h // kv_group_size`` (GQA).
    """
    v = v.repeat_interleave(kv_group_size, dim=1) if kv_group_size > 1 else v
    vo = einops.einsum(v, W_O, "src head d_head, head d_head d_model -> head src d_model")
    writes = einops.einsum(pattern, vo, "head dest src, head src d_model -> head dest src d_model")
    if post_gain is not None:
        if post_scale is None:
            raise ValueError("head_writes: a post-attention norm gain needs its scale (ln1_post.hook_scale)")
        writes = writes * post_gain / einops.rearrange(post_scale, "dest 1 -> 1 dest 1 1")
    return writes


def component_writes(
    cache: Mapping[str, Tensor],
    weights: HeadWeights,
    arch: ArchFacts,
    names: ResidualHookNames,
    layer: int,
    prompt: int = 0,
) -> ComponentWrites:
    """Decompose the residual entering ``layer`` (``n_layers``: the final norm's input) for one prompt.

    ``cache`` holds the hooks of :func:`required_hooks` with a leading batch dimension; ``prompt`` picks
    the batch row. Embedding: ``blocks.0.hook_resid_pre``; heads: ``A v W_O`` by source token (Gemma-2:
    times ``ln1_post`` gain over its scale at the written position); MLP: ``hook_mlp_out``; bias: ``b_O``.
    """
    if not 0 <= layer <= arch.n_layers:
        raise ValueError(f"component_writes: layer={layer} is outside 0..{arch.n_layers} (n_layers)")
    missing = [n for n in required_hooks(names, arch, layer) if n not in cache]
    if missing:
        raise KeyError(
            f"component_writes(layer={layer}) needs hooks {missing} in the cache; "
            "run the model with names=required_hooks(adapter, arch, layer)"
        )
    embed = cache[names.resid_pre(0)][prompt]
    n_pos, d_model = embed.shape
    heads = embed.new_zeros((layer, arch.n_heads, n_pos, n_pos, d_model))
    mlp = embed.new_zeros((layer, n_pos, d_model))
    for up in range(layer):
        gain = scale = None
        if arch.post_attn_norm:
            if weights.ln1_post_gain is None:
                raise ValueError("component_writes: post-norm model but HeadWeights.ln1_post_gain is None")
            gain = weights.ln1_post_gain[up]
            scale = cache[names.ln1_post_scale(up)][prompt]
        heads[up] = head_writes(
            cache[names.pattern(up)][prompt],
            cache[names.v(up)][prompt],
            weights.W_O[up],
            arch.kv_group_size,
            gain,
            scale,
        )
        mlp[up] = cache[names.mlp_out(up)][prompt]
    bias = weights.b_O[:layer].to(embed.dtype)
    if arch.post_attn_norm and bool(torch.any(bias != 0)):
        raise NotImplementedError("component_writes: attention-output biases before a post-norm")
    return ComponentWrites(embed=embed, heads=heads, mlp=mlp, bias=bias)
