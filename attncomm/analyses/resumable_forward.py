"""A plain forward pass of GPT-2-style models from the processed weights, resumable at any layer and position.

Activation patching of one cell ``(layer, head, pos)`` changes nothing before ``layer`` and, causal
attention, nothing at positions before ``pos``. This module runs the blocks ``start..n_layers-1`` on the
positions ``p0..`` only, reading the keys and values of the positions before ``p0`` from a cached run
of the same prompts, and unembeds only the positions a metric needs. It covers the models whose
processed forward is the textbook one (GPT-2: LayerNorm with its gain and bias folded into the next
weights, learned absolute positions, attention then MLP, one key/value head per head, no softcaps):
:func:`unsupported_reason` says why another model is not covered, and the callers fall back to the
hook-based path of the TransformerLens bridge for it.

The weights are the bridge's processed ones (``fold_ln``, ``center_writing_weights``,
``center_unembed``, ``fold_value_biases``), read once into :class:`StackWeights`; the activation is the
HF module the bridge itself calls. Callers check :func:`forward_cache`'s logits against the bridge's
before trusting it (:func:`matches_bridge`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from attncomm.core.types import ArchFacts, HeadWeights

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter


@dataclass(frozen=True)
class StackWeights:
    """The processed weights of every block, flattened over heads for one matrix product per projection."""

    W_QKV: Float[Tensor, "layer d_model three_heads_d_head"]
    b_QKV: Float[Tensor, "layer three_heads_d_head"]
    W_O: Float[Tensor, "layer heads_d_head d_model"]
    b_O: Float[Tensor, "layer d_model"]
    W_in: Float[Tensor, "layer d_model d_mlp"]
    b_in: Float[Tensor, "layer d_mlp"]
    W_out: Float[Tensor, "layer d_mlp d_model"]
    b_out: Float[Tensor, "layer d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"]
    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    n_heads: int
    d_head: int
    attn_scale: float
    eps: float
    act: Callable[[Tensor], Tensor]

    @property
    def n_layers(self) -> int:
        return int(self.W_QKV.shape[0])


@dataclass
class RunCache:
    """One run's residual stream entering every block (``resid[n_layers]``: the final one), keys,
    values and head outputs ``z`` of every layer, on all positions."""

    resid: list[Float[Tensor, "batch pos d_model"]]
    k: list[Float[Tensor, "batch head_index pos d_head"]]
    v: list[Float[Tensor, "batch head_index pos d_head"]]
    z: list[Float[Tensor, "batch pos head_index d_head"]]


def unsupported_reason(model: ModelAdapter) -> str | None:
    """Why the plain forward does not cover ``model`` (None: it does)."""
    a, c = model.arch, model.bridge.cfg
    checks = {
        "RMS normalisation": a.normalization != "LN",
        "rotary positions": a.rotary,
        "parallel attention and MLP": a.parallel_attn,
        "a post-attention norm": a.post_attn_norm,
        "softcaps": a.attn_softcap is not None or a.final_softcap is not None,
        "grouped keys/values": a.n_kv_heads != a.n_heads,
        "a scaled embedding": a.embed_scale != 1.0,
        "float32 attention upcast": bool(
            getattr(model.bridge.blocks[0].attn, "_reorder_and_upcast_attn", False)
        ),
        "no learned positions": getattr(c, "positional_embedding_type", "standard") != "standard",
        "an MLP without a plain activation": _activation(model) is None,
    }
    reasons = [what for what, bad in checks.items() if bad]
    return ", ".join(reasons) if reasons else None


#: HF activation modules whose formula is torch's fused tanh-approximate GELU (one pass instead of
#: five; equal up to rounding, and :func:`matches_bridge` checks the whole forward)
_TANH_GELU = ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh")


def _tanh_gelu(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def _activation(model: ModelAdapter) -> Callable[[Tensor], Tensor] | None:
    """The MLP's activation: the HF module the bridge calls (or torch's fused GELU of the same formula),
    None for gated or unknown MLPs."""
    mlp = getattr(model.bridge.blocks[0].mlp, "original_component", None)
    act = getattr(mlp, "act", None)
    if not callable(act) or hasattr(mlp, "gate_proj"):
        return None
    return _tanh_gelu if type(act).__name__ in _TANH_GELU else act


#: the MLP weights of a GPT-2-style block, as the bridge names them
MLP_FIELDS = ("W_in", "b_in", "W_out", "b_out")


def mlp_weights(model: ModelAdapter) -> dict[str, Tensor]:
    """Copies of the bridge's stacked MLP weights (:data:`MLP_FIELDS`)."""
    with torch.no_grad():
        return {name: getattr(model.bridge, name).detach().clone() for name in MLP_FIELDS}


def stack_weights(model: ModelAdapter) -> StackWeights:
    """Read the processed weights of a model :func:`unsupported_reason` accepts."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"model {model.cfg.name!r} is not covered by the plain forward: {reason}")
    act = _activation(model)
    assert act is not None
    eps = float(getattr(model.bridge.cfg, "eps", 1e-5))
    return stack_from(model.arch, model.weights, mlp_weights(model), eps, act)


def stack_from(
    arch: ArchFacts, w: HeadWeights, mlp: Mapping[str, Tensor], eps: float, act: Callable[[Tensor], Tensor]
) -> StackWeights:
    """The weights flattened over heads, as the bridge multiplies them (one q/k/v product per layer)."""

    def heads_flat(W: Tensor) -> Tensor:
        return einops.rearrange(W, "layer head d_model d_head -> layer d_model (head d_head)")

    def bias_flat(bias: Tensor) -> Tensor:
        return einops.rearrange(bias, "layer head d_head -> layer (head d_head)")

    if w.W_pos is None:
        raise ValueError("the plain forward needs learned positions (W_pos)")
    with torch.no_grad():
        return StackWeights(
            W_QKV=torch.cat([heads_flat(w.W_Q), heads_flat(w.W_K), heads_flat(w.W_V)], dim=-1).contiguous(),
            b_QKV=torch.cat([bias_flat(w.b_Q), bias_flat(w.b_K), bias_flat(w.b_V)], dim=-1).contiguous(),
            W_O=einops.rearrange(
                w.W_O, "layer head d_head d_model -> layer (head d_head) d_model"
            ).contiguous(),
            b_O=w.b_O,
            W_in=mlp["W_in"],
            b_in=mlp["b_in"],
            W_out=mlp["W_out"],
            b_out=mlp["b_out"],
            W_U=w.W_U,
            b_U=w.b_U,
            W_E=w.W_E,
            W_pos=w.W_pos,
            n_heads=arch.n_heads,
            d_head=arch.d_head,
            attn_scale=arch.attn_scale,
            eps=eps,
            act=act,
        )


def norm_and_scale(
    x: Float[Tensor, "... d_model"], eps: float
) -> tuple[Float[Tensor, "... d_model"], Float[Tensor, "... 1"]]:
    """LayerNorm without gain and bias (folded into the next weights), as the bridge computes it:
    ``(normalized, scale)``, its ``hook_normalized`` and ``hook_scale``."""
    centred = x - x.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return centred / scale, scale


def layer_norm(x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "... d_model"]:
    """The normalized part of :func:`norm_and_scale`."""
    return norm_and_scale(x, eps)[0]


def mlp(w: StackWeights, layer: int, resid_mid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The MLP's write at every position given (position-wise)."""
    hidden = w.act(affine(layer_norm(resid_mid, w.eps), w.W_in[layer], w.b_in[layer]))
    return affine(hidden, w.W_out[layer], w.b_out[layer])


def affine(x: Float[Tensor, "... d_in"], W: Tensor, b: Tensor) -> Float[Tensor, "... d_out"]:
    """``x @ W + b`` in one fused product (``addmm``) over the flattened leading dimensions."""
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), W).reshape(*x.shape[:-1], W.shape[-1])


def attn_out(w: StackWeights, layer: int, z: Float[Tensor, "batch pos head_index d_head"]) -> Tensor:
    """The attention block's write ``sum_h z_h W_O[h] + b_O`` ``[batch pos d_model]``."""
    return affine(z.flatten(-2), w.W_O[layer], w.b_O[layer])


#: receives ``(hook name without "blocks.{layer}.", tensor)`` for each activation a block computes
Recorder = Callable[[str, Tensor], None]


def block(
    w: StackWeights,
    layer: int,
    resid: Float[Tensor, "batch pos d_model"],
    p0: int = 0,
    k_prefix: Float[Tensor, "batch head_index p0 d_head"] | None = None,
    v_prefix: Float[Tensor, "batch head_index p0 d_head"] | None = None,
    record: Recorder | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block ``layer`` on the positions ``p0 .. p0+pos-1`` of ``resid``; the positions before ``p0`` enter
    only through their cached keys and values. Returns the residual after the block and the keys,
    values (all positions, ``[batch head_index pos d_head]``) and head outputs ``z`` of the positions run.

    ``record`` (``p0 = 0`` runs) receives the activations under the bridge's hook names and shapes
    (``ln1.hook_normalized``, ``attn.hook_pattern``, ``hook_mlp_out``, ...).
    """
    B, S, _ = resid.shape
    H, dh = w.n_heads, w.d_head
    normalized, scale = norm_and_scale(resid, w.eps)
    qkv = affine(normalized, w.W_QKV[layer], w.b_QKV[layer])
    q, k, v = einops.rearrange(qkv, "b s (three h e) -> three b h s e", three=3, h=H, e=dh)
    if p0 > 0:
        assert k_prefix is not None and v_prefix is not None
        k = torch.cat([k_prefix, k], dim=2)
        v = torch.cat([v_prefix, v], dim=2)
    scores = (q @ k.transpose(-1, -2)) / w.attn_scale
    query_pos = torch.arange(p0, p0 + S, device=resid.device)[:, None]
    key_pos = torch.arange(p0 + S, device=resid.device)[None, :]
    pattern = scores.masked_fill(key_pos > query_pos, float("-inf")).softmax(-1)
    z = einops.rearrange(pattern @ v, "b h s e -> b s h e")
    written = attn_out(w, layer, z)
    resid_mid = resid + written
    mlp_out = mlp(w, layer, resid_mid)
    if record is not None:
        record("ln1.hook_normalized", normalized)
        record("ln1.hook_scale", scale)
        for name, value in (("q", q), ("k", k), ("v", v)):
            record(f"attn.hook_{name}", einops.rearrange(value, "b h s e -> b s h e"))
        record("attn.hook_pattern", pattern)
        record("attn.hook_z", z)
        record("hook_attn_out", written)
        record("hook_resid_mid", resid_mid)
        record("hook_mlp_out", mlp_out)
    return resid_mid + mlp_out, k, v, z


def embed(w: StackWeights, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    """Token plus learned position embedding."""
    return w.W_E[tokens] + w.W_pos[: tokens.shape[1]][None]


def forward_cache(w: StackWeights, tokens: Int[Tensor, "batch pos"]) -> RunCache:
    """Run every block on every position, keeping what a resumed run reads."""
    resid = embed(w, tokens)
    cache = RunCache(resid=[resid], k=[], v=[], z=[])
    for layer in range(w.n_layers):
        resid, k, v, z = block(w, layer, resid)
        cache.resid.append(resid)
        cache.k.append(k)
        cache.v.append(v)
        cache.z.append(z)
    return cache


def final_block_at(
    w: StackWeights,
    resid: Float[Tensor, "batch pos d_model"],
    at: Int[Tensor, " batch"],
    p0: int = 0,
    k_prefix: Float[Tensor, "batch head_index p0 d_head"] | None = None,
    v_prefix: Float[Tensor, "batch head_index p0 d_head"] | None = None,
) -> Float[Tensor, "batch d_model"]:
    """The last block's output at one position per row (``at``, relative to ``p0``): keys and values on
    every position, the query, attention and MLP only at ``at`` (nothing later reads the others)."""
    layer = w.n_layers - 1
    B, S, _ = resid.shape
    H, dh = w.n_heads, w.d_head
    rows = torch.arange(B, device=resid.device)
    x = layer_norm(resid, w.eps)
    kv = affine(x, w.W_QKV[layer][:, H * dh :], w.b_QKV[layer][H * dh :])
    k, v = einops.rearrange(kv, "b s (two h e) -> two b h s e", two=2, h=H, e=dh)
    q = einops.rearrange(
        affine(x[rows, at], w.W_QKV[layer][:, : H * dh], w.b_QKV[layer][: H * dh]), "b (h e) -> b h 1 e", h=H
    )
    if p0 > 0:
        assert k_prefix is not None and v_prefix is not None
        k = torch.cat([k_prefix, k], dim=2)
        v = torch.cat([v_prefix, v], dim=2)
    scores = (q @ k.transpose(-1, -2)) / w.attn_scale
    key_pos = torch.arange(p0 + S, device=resid.device)[None, None, None, :]
    scores = scores.masked_fill(key_pos > (p0 + at)[:, None, None, None], float("-inf"))
    z = einops.rearrange(scores.softmax(-1) @ v, "b h 1 e -> b 1 h e")
    resid_mid = resid[rows, at] + attn_out(w, layer, z)[:, 0]
    return resid_mid + mlp(w, layer, resid_mid)


def resume(
    w: StackWeights,
    base: RunCache,
    p0: int,
    entries: Sequence[tuple[int, Tensor, Tensor, Tensor]],
) -> Float[Tensor, "batch d_model"]:
    """Finish runs that enter the stack at different layers, on the positions ``p0..`` only.

    Each entry is ``(start, resid, rows, at)``: the residual ``[b pos d_model]`` entering block ``start``
    (``n_layers``: the final residual) at positions ``p0..``, the row of the cached ``base`` run each
    row continues (its keys/values before ``p0``), and the position (relative to ``p0``) whose final
    residual is wanted. Entries must be sorted by ``start``; a block runs once for every entry
    started by then (one batch), so late starters share the later blocks. Returns the final residuals
    ``[sum b d_model]`` in entry order.
    """
    L = w.n_layers
    resid = rows = at = None
    finals: list[Tensor] = []
    k = 0
    for layer in range(entries[0][0] if entries else L, L):
        while k < len(entries) and entries[k][0] == layer:
            _, r, i, a = entries[k]
            resid, rows, at = (
                (r, i, a)
                if resid is None
                else (
                    torch.cat([resid, r]),
                    torch.cat([rows, i]),
                    torch.cat([at, a]),  # type: ignore[list-item]
                )
            )
            k += 1
        if resid is None:
            continue
        assert rows is not None and at is not None
        k_prefix = base.k[layer][rows, :, :p0] if p0 > 0 else None
        v_prefix = base.v[layer][rows, :, :p0] if p0 > 0 else None
        if layer == L - 1:
            finals.append(final_block_at(w, resid, at, p0, k_prefix, v_prefix))
        else:
            resid = block(w, layer, resid, p0, k_prefix, v_prefix)[0]
    for _, r, _, a in entries[k:]:  # entered after the last block
        finals.append(r[torch.arange(r.shape[0], device=r.device), a])
    return torch.cat(finals) if finals else torch.zeros(0, w.W_E.shape[1], dtype=w.W_E.dtype)


def unembed(w: StackWeights, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits of final residuals (the final norm's gain is folded into ``W_U``)."""
    return affine(layer_norm(resid, w.eps), w.W_U, w.b_U)


def matches_bridge(
    model: ModelAdapter, w: StackWeights, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, " batch"]
) -> bool:
    """Whether this forward's logits at ``positions`` equal the bridge's (float64: 1e-9, else 1e-4,
    relative to the largest logit)."""
    with torch.no_grad():
        theirs = model.run_with_hooks(tokens, [])
        rows = torch.arange(tokens.shape[0], device=theirs.device)
        theirs = theirs[rows, positions.to(theirs.device)]
        dev = w.W_E.device
        final = forward_cache(w, tokens.to(dev)).resid[-1]
        ours = unembed(w, final[rows.to(dev), positions.to(dev)])
    tol = 1e-9 if w.W_E.dtype == torch.float64 else 1e-4
    scale = 1.0 + float(theirs.abs().max())
    return bool((ours - theirs.to(ours.dtype)).abs().max() <= tol * scale)
