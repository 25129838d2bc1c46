"""Upstream write contributions projected on a firing's selected terms (section 3 of docs/METHOD.md).

With ``P_U = U_S U_S^T`` (dest terms) and ``P_V = V_S V_S^T`` (source terms) and ``y_t`` a component's
write at position ``t`` divided by ``scale_t``::

    dest   = (P_U y_d) . [Omega_d(d-s) x~_s - mean_{j != s} Omega_d(d-j) x~_j]
    source = x~_d^T Omega_s(d-s) P_V y_s - mean_{j != s} x~_d^T Omega_s(d-j) P_V y_j

Both are linear functionals of the writes: ``sum_i z_i . y_{pos_i}`` for a few residual-space vectors
``z_i`` at positions ``pos_i`` -- one vector at ``d`` for the dest side
(``z = Q_a U_c[:, S] g_S``), one per ``j in 0..d`` for the source side
(``z_j = coef_j Q_b V_c[:, S] t1[j, S]``). :func:`projection_vectors` builds them for a batch of firings;
:func:`upstream_contributions` then projects every upstream write on them without materialising any
head write: the per-prompt ``v(t') W_O`` (computed once per prompt, :func:`head_value_writes`) is
multiplied by all firings' vectors in one matrix product, and only then weighted by the attention
pattern ``A[l', h'][j, t']`` and ``1 / scale_j``.

Components are indexed ``[l', component, t']``: ``0..H-1`` heads (``t'`` = the head's own source),
``H`` = MLP, ``H+1`` = AH bias, ``H+2`` = Embedding (layer 0 only); MLP, AH bias and Embedding are
stored at ``t'`` = the anchor position (``d`` for the dest side, ``s`` for the source side). Gemma-2's
post-attention norm: a head's (and ``b_O``'s) write is multiplied by the ``ln1_post`` gain and divided
by ``ln1_post.hook_scale`` at the position written to.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attncomm.core.decompose import FiringDecomposition, LayerInputs

__all__ = [
    "PromptWrites",
    "Projection",
    "head_value_writes",
    "projection_vectors",
    "upstream_contributions",
]


@dataclass
class PromptWrites:
    """Per-prompt upstream writes, shared by every firing of the prompt (positions ``0..n-1``)."""

    vo: Float[Tensor, "layer head_index pos d_model"]  # v(t') W_O (times the post-norm gain)
    pattern: Float[Tensor, "layer head_index pos pos"]  # A[l', h'][t, t']
    mlp: Float[Tensor, "layer pos d_model"]  # hook_mlp_out
    bias: Float[Tensor, "layer d_model"]  # b_O (times the post-norm gain)
    embed: Float[Tensor, "pos d_model"]  # blocks.0.hook_resid_pre
    post_scale: Float[Tensor, "layer pos"] | None = None  # ln1_post.hook_scale (Gemma-2)


def head_value_writes(
    v: Float[Tensor, "layer pos head_index d_head"],
    W_O: Float[Tensor, "layer head_index d_head d_model"],
    post_gain: Float[Tensor, "layer d_model"] | None = None,
) -> Float[Tensor, "layer head_index pos d_model"]:
    """``v(t') W_O`` of every head and source token (times the post-norm gain): computed once per prompt."""
    vo = einops.einsum(v, W_O, "layer pos head d_head, layer head d_head d_model -> layer head pos d_model")
    if post_gain is not None:
        vo = vo * post_gain[:, None, None, :]
    return vo


@dataclass
class Projection:
    """Residual-space vectors ``z`` of a batch of firing sides: contribution = ``sum_i z_i . y_{pos_i}``."""

    z: Float[Tensor, "vec d_model"]
    pos: Int[Tensor, " vec"]
    firing: Int[Tensor, " vec"]  # which firing of the batch each vector belongs to
    anchor: Int[Tensor, " firing"]  # d (dest side) or s (source side): where MLP/bias/Embedding go
    n_firings: int


def projection_vectors(
    dec: FiringDecomposition,
    inp: LayerInputs,
    mask_dest: Bool[Tensor, "firing term"],
    mask_src: Bool[Tensor, "firing term"],
) -> tuple[Projection, Projection]:
    """The dest and source projection vectors of a batch of firings on their selected terms."""
    F = dec.heads.numel()
    dtype = dec.g_dest.dtype
    D = inp.x.shape[-1]
    n = dec.coef.shape[1]
    # dest: z = Q_a U_c (g * mask), one vector per firing
    small_d = einops.einsum(dec.svd_d.U_c, dec.g_dest * mask_dest.to(dtype), "f i k, f k -> f i")
    # source: z_j = coef_j Q_b V_c (t1[j] * mask) for j <= d
    w = dec.t1 * mask_src.to(dtype)[:, None, :] * dec.coef[:, :, None]  # [F, n, r]
    small_s = einops.einsum(dec.svd_s.V_c, w, "f i k, f n k -> f n i")
    z_d = torch.zeros((F, D), dtype=dtype)
    z_s = torch.zeros((F, n, D), dtype=dtype)
    for h in torch.unique(dec.heads).tolist():  # lift to the residual space head by head (no gathers)
        idx = torch.nonzero(dec.heads == h).flatten()
        z_d[idx] = small_d[idx] @ inp.qr_d.Q_a[h, :D].T
        z_s[idx] = small_s[idx] @ inp.qr_s.Q_b[h, :D].T
    dest = Projection(
        z=z_d, pos=dec.dests.clone(), firing=torch.arange(F), anchor=dec.dests.clone(), n_firings=F
    )
    valid = torch.arange(n)[None, :] <= dec.dests[:, None]  # [F, n]
    f_idx, j_idx = torch.nonzero(valid, as_tuple=True)
    src = Projection(z=z_s[f_idx, j_idx], pos=j_idx, firing=f_idx, anchor=dec.srcs.clone(), n_firings=F)
    return dest, src


def upstream_contributions(
    proj: Projection,
    writes: PromptWrites,
    scale: Float[Tensor, " pos"],
    n_layers: int,
    n_pos: int,
    *,
    include_embedding: bool = True,
) -> Float[Tensor, "firing layer component pos"]:
    """Contributions ``[firing, l', component, t']`` of every upstream write (layers ``< n_layers``).

    ``scale`` is the downstream norm's ``hook_scale`` per position (``ln1`` of the firing's layer, or
    ``ln_final`` for seeds). Components: heads ``0..H-1``, ``H`` MLP, ``H+1`` AH bias, ``H+2`` Embedding.
    Result positions ``t'`` run over ``0..n_pos-1``.
    """
    L = n_layers
    H = writes.vo.shape[1]
    F = proj.n_firings
    dtype = proj.z.dtype
    out = torch.zeros((F, max(L, 1), H + 3, n_pos), dtype=dtype)
    if proj.z.shape[0] == 0:
        return out
    zs = proj.z / scale[proj.pos][:, None]  # [V, D]
    pos = proj.pos
    if L > 0:
        vo = writes.vo[:L, :, :n_pos]  # [L, H, n, D]
        # one GEMM for all heads, sources and vectors: [L*H*n, D] @ [D, V]
        proj_heads = einops.rearrange(vo, "l h t d -> (l h t) d") @ zs.T
        proj_heads = einops.rearrange(proj_heads, "(l h t) v -> l h v t", l=L, h=H)
        weight = writes.pattern[:L, :, pos, :n_pos]  # [L, H, V, n]: A[l', h'][pos_v, t']
        if writes.post_scale is not None:
            weight = weight / writes.post_scale[:L, pos][:, None, :, None]
        per_vec = proj_heads * weight  # [L, H, V, n]
        heads = torch.zeros((L, H, F, n_pos), dtype=dtype)
        heads.index_add_(2, proj.firing, per_vec)
        out[:, :L, :H, :] = einops.rearrange(heads, "l h f t -> f l h t")
        # MLP and bias: one value per layer, at the anchor position
        mlp = einops.einsum(writes.mlp[:L, pos], zs, "l v d, v d -> l v")
        bias = einops.einsum(writes.bias[:L], zs, "l d, v d -> l v")
        if writes.post_scale is not None:
            bias = bias / writes.post_scale[:L, pos]
        mlp_f = torch.zeros((L, F), dtype=dtype).index_add_(1, proj.firing, mlp)
        bias_f = torch.zeros((L, F), dtype=dtype).index_add_(1, proj.firing, bias)
        fi = torch.arange(F)
        out[fi, :, H, proj.anchor] = mlp_f.T
        out[fi, :, H + 1, proj.anchor] = bias_f.T
    if include_embedding:
        emb = einops.einsum(writes.embed[pos], zs, "v d, v d -> v")
        emb_f = torch.zeros(F, dtype=dtype).index_add_(0, proj.firing, emb)
        out[torch.arange(F), 0, H + 2, proj.anchor] = emb_f
    return out
