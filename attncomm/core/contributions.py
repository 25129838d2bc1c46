"""Upstream write contributions projected on a firing's selected terms (section 3 of docs/METHOD.md).

With ``P_U = U_S U_S^T`` (dest terms) and ``P_V = V_S V_S^T`` (source terms) and ``y_t`` a component's
write at position ``t`` divided by ``scale_t``::

    dest   = (P_U y_d) . [Omega_d(d-s) x~_s - mean_{j != s} Omega_d(d-j) x~_j]
    source = x~_d^T Omega_s(d-s) P_V y_s - mean_{j != s} x~_d^T Omega_s(d-j) P_V y_j

Both are linear functionals of the writes, ``sum_j sum_k w[j, k] z_k . y_j``, where the ``K`` residual
directions ``z_k`` span (a subspace of) the selected terms and ``w`` weighs each source position:

* dest side (``kind="point"``): one direction ``z = Q_a U_c[:, S] g_S`` at the single position ``d``;
* source side of a non-rotary model (``kind="relative"``): one direction
  ``z = Q_b V_c[:, S] t1[S]`` (``t1`` does not depend on ``j``) with ``w[j] = coef_j`` (1 at ``s``,
  ``-1/d`` at the other ``j <= d``);
* source side of a rotary model (``kind="dense"``): the ``K = |S|`` directions ``Q_b V_c[:, k]`` with
  ``w[j, k] = coef_j t1[j, k]`` (``t1`` rotates with ``j``).

:func:`projection_vectors` builds these :class:`TermProjection` objects for a batch of firings and
:func:`upstream_contributions` evaluates them without materialising any per-position residual vector:
every head's per-source write ``v(t') W_O`` (computed once per prompt, :func:`head_value_writes`) is
projected on the ``K`` directions (``[firing, layer, head, t', K]``, linear in ``T``), and the attention
pattern is combined with the position weights separately -- a row gather for ``point``, the per-prompt
prefix sums of the pattern (:func:`pattern_prefix_sums`) for ``relative``, one matrix product for
``dense``. Cost per firing ``O(L H T K (d_model + T))`` at most (``O(L H T d_model)`` for the two
``K = 1`` kinds) instead of materialising ``O(L H T^2 d_model)``.

The seeds use :class:`Projection`: explicit residual vectors at given positions (a task direction).

Components are indexed ``[l', component, t']``: ``0..H-1`` heads (``t'`` = the head's own source),
``H`` = MLP, ``H+1`` = AH bias, ``H+2`` = Embedding (layer 0 only); MLP, AH bias and Embedding are
stored at ``t'`` = the anchor position (``d`` for the dest side, ``s`` for the source side). Gemma-2's
post-attention norm: a head's (and ``b_O``'s) write is multiplied by the ``ln1_post`` gain and divided
by ``ln1_post.hook_scale`` at the position written to.

Everything stays on the device of the inputs; the largest tensor a call allocates is reported to
:data:`ALLOCATION_PROBES` (used by tests to bound memory without timing anything).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attncomm.core.decompose import FiringDecomposition, LayerInputs, relative_coefficients

__all__ = [
    "ALLOCATION_PROBES",
    "Projection",
    "PromptWrites",
    "TermProjection",
    "head_value_writes",
    "pattern_prefix_sums",
    "projection_vectors",
    "upstream_contributions",
]

#: callables ``probe(name, shape)`` told the shape of every large intermediate tensor this module
#: allocates (tests register one to bound the memory of a long prompt)
ALLOCATION_PROBES: list[Callable[[str, tuple[int, ...]], None]] = []


def _probe(name: str, t: Tensor) -> Tensor:
    """Report ``t``'s shape to the registered probes and return it."""
    for probe in ALLOCATION_PROBES:
        probe(name, tuple(t.shape))
    return t


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


@dataclass
class TermProjection:
    """A batch of firing sides as ``K`` directions in the span of their selected terms plus position weights.

    Firing ``f`` contributes ``sum_j sum_k w[f, j, k] (Q[h_f] vectors[f, :, k]) . y_j`` (``y_j`` the write
    at ``j`` over ``scale_j``); ``kind`` fixes ``w`` (see the module docstring): ``"point"`` = 1 at
    ``anchor``; ``"relative"`` = 1 at ``anchor``, ``-1/d`` at the other ``j <= d`` (0 when ``d = 0``);
    ``"dense"`` = ``weight``.
    """

    kind: str  # "point" | "relative" | "dense"
    heads: Int[Tensor, " firing"]
    dests: Int[Tensor, " firing"]
    anchor: Int[Tensor, " firing"]
    Q: Float[Tensor, "head_index d_model d_head"]  # orthonormal residual-space columns of each head
    vectors: Float[Tensor, "firing d_head term"]  # the K directions in compact coordinates
    weight: Float[Tensor, "firing pos term"] | None = None  # dense kind only

    @property
    def n_firings(self) -> int:
        return int(self.heads.shape[0])

    def residual_vectors(self) -> Float[Tensor, "firing d_model term"]:
        """The ``K`` directions of every firing in the residual space (lifted head by head, no gathers)."""
        F, _, K = self.vectors.shape
        z = self.vectors.new_zeros((F, self.Q.shape[1], K))
        for h in torch.unique(self.heads).tolist():
            idx = torch.nonzero(self.heads == h).flatten()
            z[idx] = torch.matmul(self.Q[h], self.vectors[idx])
        return z

    def position_weights(self, n_pos: int) -> Float[Tensor, "firing pos term"]:
        """The dense ``w[f, j, k]`` over positions ``0..n_pos-1`` (for the MLP/bias/Embedding sums)."""
        dtype, device = self.vectors.dtype, self.vectors.device
        F, K = self.n_firings, self.vectors.shape[-1]
        if self.kind == "dense":
            assert self.weight is not None
            w = self.weight[:, :n_pos]
            if w.shape[1] < n_pos:
                w = torch.nn.functional.pad(w, (0, 0, 0, n_pos - w.shape[1]))
            return w
        j = torch.arange(n_pos, device=device)[None, :]
        if self.kind == "point":
            return (j == self.anchor[:, None]).to(dtype)[:, :, None].expand(F, n_pos, K)
        return relative_coefficients(self.dests, self.anchor, n_pos, dtype)[:, :, None].expand(F, n_pos, K)


def _select_columns(
    mask: Bool[Tensor, "firing term"],
) -> tuple[Int[Tensor, "firing k"], Bool[Tensor, "firing k"]]:
    """Each firing's selected term indices, left-aligned, padded to the largest count, and their validity."""
    K = max(1, int(mask.sum(1).max())) if mask.numel() else 1
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :K]
    return order, torch.gather(mask, 1, order)


def projection_vectors(
    dec: FiringDecomposition,
    inp: LayerInputs,
    mask_dest: Bool[Tensor, "firing term"],
    mask_src: Bool[Tensor, "firing term"],
) -> tuple[TermProjection, TermProjection]:
    """The dest and source projections of a batch of firings on their selected terms."""
    dtype = dec.g_dest.dtype
    D = inp.x.shape[-1]
    # dest: z = Q_a U_c (g * mask), one direction per firing at d
    small_d = einops.einsum(dec.svd_d.U_c, dec.g_dest * mask_dest.to(dtype), "f i k, f k -> f i")
    dest = TermProjection(
        kind="point",
        heads=dec.heads,
        dests=dec.dests,
        anchor=dec.dests,
        Q=inp.qr_d.Q_a[:, :D],
        vectors=small_d[:, :, None],
    )
    Q_s = inp.qr_s.Q_b[:, :D]
    if dec.t1.shape[1] == 1:  # t1 does not depend on j: one direction, relative weights
        small_s = einops.einsum(dec.svd_s.V_c, dec.t1[:, 0] * mask_src.to(dtype), "f i k, f k -> f i")
        src = TermProjection(
            kind="relative",
            heads=dec.heads,
            dests=dec.dests,
            anchor=dec.srcs,
            Q=Q_s,
            vectors=small_s[:, :, None],
        )
        return dest, src
    # rotary: the selected columns V_c[:, S] as directions, w[j, k] = coef_j t1[j, S_k]
    cols, valid = _select_columns(mask_src)
    r = dec.svd_s.V_c.shape[1]
    vectors = torch.gather(dec.svd_s.V_c, 2, cols[:, None, :].expand(-1, r, -1)) * valid[:, None, :].to(dtype)
    n = dec.t1.shape[1]
    t1_sel = torch.gather(dec.t1, 2, cols[:, None, :].expand(-1, n, -1))
    weight = t1_sel * dec.coef[:, :, None] * valid[:, None, :].to(dtype)
    src = TermProjection(
        kind="dense",
        heads=dec.heads,
        dests=dec.dests,
        anchor=dec.srcs,
        Q=Q_s,
        vectors=vectors,
        weight=weight,
    )
    return dest, src


def pattern_prefix_sums(
    writes: PromptWrites, scale: Float[Tensor, " pos"], n_layers: int, n_pos: int
) -> Float[Tensor, "layer head_index pos pos"]:
    """``C[l', h', d, t'] = sum_{j <= d} A[l', h'][j, t'] / scale_j`` (``/ ln1_post scale_j`` for Gemma-2).

    Computed once per prompt and firing layer, so that every ``relative`` firing reads its source-side
    weights as ``(1 + 1/d) A~[s] - C[d] / d`` in ``O(T)``.
    """
    weights = 1.0 / scale[:n_pos]
    w = weights[None, :].expand(n_layers, -1)
    if writes.post_scale is not None:
        w = w / writes.post_scale[:n_layers, :n_pos]
    out = torch.empty(
        (n_layers, writes.pattern.shape[1], n_pos, n_pos), dtype=scale.dtype, device=scale.device
    )
    for layer in range(n_layers):  # one layer at a time: no second full-size temporary
        a = writes.pattern[layer, :, :n_pos, :n_pos].to(scale.dtype) * w[layer][None, :, None]
        torch.cumsum(a, dim=1, out=out[layer])
    return _probe("prefix", out)


def upstream_contributions(
    proj: Projection | TermProjection,
    writes: PromptWrites,
    scale: Float[Tensor, " pos"],
    n_layers: int,
    n_pos: int,
    *,
    include_embedding: bool = True,
    prefix: Float[Tensor, "layer head_index pos pos"] | None = None,
) -> Float[Tensor, "firing layer component pos"]:
    """Contributions ``[firing, l', component, t']`` of every upstream write (layers ``< n_layers``).

    ``scale`` is the downstream norm's ``hook_scale`` per position (``ln1`` of the firing's layer, or
    ``ln_final`` for seeds). Components: heads ``0..H-1``, ``H`` MLP, ``H+1`` AH bias, ``H+2`` Embedding.
    Result positions ``t'`` run over ``0..n_pos-1``. ``prefix`` (:func:`pattern_prefix_sums` of the same
    writes, scale and layers, any ``n >= n_pos``) is reused by ``relative`` projections (computed here
    when not given).
    """
    if isinstance(proj, Projection):
        return _vector_contributions(
            proj, writes, scale, n_layers, n_pos, include_embedding=include_embedding
        )
    return _term_contributions(
        proj, writes, scale, n_layers, n_pos, include_embedding=include_embedding, prefix=prefix
    )


def _term_contributions(
    proj: TermProjection,
    writes: PromptWrites,
    scale: Tensor,
    n_layers: int,
    n_pos: int,
    *,
    include_embedding: bool,
    prefix: Tensor | None,
) -> Tensor:
    """:func:`upstream_contributions` of a :class:`TermProjection` (see the module docstring)."""
    L, H, F = n_layers, writes.vo.shape[1], proj.n_firings
    dtype, device = proj.vectors.dtype, proj.vectors.device
    out = _probe("out", torch.zeros((F, max(L, 1), H + 3, n_pos), dtype=dtype, device=device))
    if F == 0:
        return out
    z = proj.residual_vectors()  # [F, D, K]
    inv_scale = 1.0 / scale[:n_pos]
    w = proj.position_weights(n_pos) * inv_scale[None, :, None]  # [F, n, K]: w[j, k] / scale_j
    fi = torch.arange(F, device=device)
    if L > 0:
        # every head's write at every source t' on every direction: one GEMM [L*H*n, D] @ [D, F*K]
        vo = writes.vo[:L, :, :n_pos]
        y = einops.rearrange(vo, "l h t d -> (l h t) d") @ einops.rearrange(z, "f d k -> d (f k)")
        y = _probe("heads_proj", einops.rearrange(y, "(l h t) (f k) -> f l h t k", l=L, h=H, f=F))
        m = _probe("heads_weight", _attention_weights(proj, writes, w, scale, L, n_pos, prefix))
        out[:, :L, :H, :] = einops.einsum(y, m, "f l h t k, f l h t k -> f l h t")
        del y, m
        # MLP and bias: one value per layer, at the anchor position
        mlp_w = einops.einsum(w, writes.mlp[:L, :n_pos], "f j k, l j d -> f l d k")
        mlp = einops.einsum(mlp_w, z, "f l d k, f d k -> f l")
        bz = einops.einsum(writes.bias[:L], z, "l d, f d k -> f l k")
        if writes.post_scale is None:
            bias = einops.einsum(bz, w.sum(1), "f l k, f k -> f l")
        else:
            wb = einops.einsum(w, 1.0 / writes.post_scale[:L, :n_pos], "f j k, l j -> f l k")
            bias = (bz * wb).sum(-1)
        out[fi, :L, H, proj.anchor] = mlp
        out[fi, :L, H + 1, proj.anchor] = bias
    if include_embedding:
        emb = einops.einsum(w, writes.embed[:n_pos], z, "f j k, j d, f d k -> f")
        out[fi, 0, H + 2, proj.anchor] = emb
    return out


def _attention_weights(
    proj: TermProjection,
    writes: PromptWrites,
    w: Float[Tensor, "firing pos term"],
    scale: Float[Tensor, " pos"],
    L: int,
    n_pos: int,
    prefix: Tensor | None,
) -> Float[Tensor, "firing layer head_index pos term"]:
    """``M[f, l', h', t', k] = sum_j A[l', h'][j, t'] w[f, j, k] / scale_j`` (and ``/ ln1_post scale_j``)."""
    dtype = w.dtype
    inv_scale = 1.0 / scale[:n_pos]
    if proj.kind == "point":
        d = proj.anchor
        rows = writes.pattern[:L, :, d, :n_pos].to(dtype)  # [L, H, F, n]
        rw = inv_scale[d][None, :]  # [1, F]
        if writes.post_scale is not None:
            rw = rw / writes.post_scale[:L, d]
        return einops.rearrange(rows * rw[:, None, :, None], "l h f t -> f l h t")[..., None]
    if proj.kind == "relative":
        if prefix is None:
            prefix = pattern_prefix_sums(writes, scale, L, n_pos)
        d, s = proj.dests, proj.anchor
        ps = inv_scale[s][None, :]
        if writes.post_scale is not None:
            ps = ps / writes.post_scale[:L, s]
        own = writes.pattern[:L, :, s, :n_pos].to(dtype) * ps[:, None, :, None]  # A~[s]: [L, H, F, n]
        cum = prefix[:L, :, d, :n_pos]  # [L, H, F, n]
        df = d.to(dtype)
        inv_d = torch.where(d > 0, 1.0 / df.clamp(min=1), torch.zeros_like(df))
        a_s = torch.where(d > 0, 1.0 + inv_d, torch.zeros_like(df))
        m = own * a_s[None, None, :, None] - cum * inv_d[None, None, :, None]
        return einops.rearrange(m, "l h f t -> f l h t")[..., None]
    # dense: one batched GEMM over layers [L, (h t), j] @ [L, j, (f k)]
    wl = w[None].expand(L, -1, -1, -1)  # [L, F, n, K]
    if writes.post_scale is not None:
        wl = wl / writes.post_scale[:L, None, :n_pos, None]
    a = writes.pattern[:L, :, :n_pos, :n_pos].to(dtype)
    m = einops.einsum(a, wl, "l h j t, l f j k -> f l h t k")
    return m


def _vector_contributions(
    proj: Projection,
    writes: PromptWrites,
    scale: Tensor,
    n_layers: int,
    n_pos: int,
    *,
    include_embedding: bool = True,
) -> Tensor:
    """:func:`upstream_contributions` of explicit residual vectors (the seeds: a few vectors)."""
    L = n_layers
    H = writes.vo.shape[1]
    F = proj.n_firings
    dtype, device = proj.z.dtype, proj.z.device
    out = torch.zeros((F, max(L, 1), H + 3, n_pos), dtype=dtype, device=device)
    if proj.z.shape[0] == 0:
        return out
    zs = proj.z / scale[proj.pos][:, None]  # [V, D]
    pos = proj.pos
    if L > 0:
        vo = writes.vo[:L, :, :n_pos]  # [L, H, n, D]
        # one GEMM for all heads, sources and vectors: [L*H*n, D] @ [D, V]
        proj_heads = einops.rearrange(vo, "l h t d -> (l h t) d") @ zs.T
        proj_heads = einops.rearrange(proj_heads, "(l h t) v -> l h v t", l=L, h=H)
        weight = writes.pattern[:L, :, pos, :n_pos].to(dtype)  # [L, H, V, n]: A[l', h'][pos_v, t']
        if writes.post_scale is not None:
            weight = weight / writes.post_scale[:L, pos][:, None, :, None]
        per_vec = proj_heads * weight  # [L, H, V, n]
        heads = torch.zeros((L, H, F, n_pos), dtype=dtype, device=device)
        heads.index_add_(2, proj.firing, per_vec)
        out[:, :L, :H, :] = einops.rearrange(heads, "l h f t -> f l h t")
        # MLP and bias: one value per layer, at the anchor position
        mlp = einops.einsum(writes.mlp[:L, pos], zs, "l v d, v d -> l v")
        bias = einops.einsum(writes.bias[:L], zs, "l d, v d -> l v")
        if writes.post_scale is not None:
            bias = bias / writes.post_scale[:L, pos]
        mlp_f = torch.zeros((L, F), dtype=dtype, device=device).index_add_(1, proj.firing, mlp)
        bias_f = torch.zeros((L, F), dtype=dtype, device=device).index_add_(1, proj.firing, bias)
        fi = torch.arange(F, device=device)
        out[fi, :, H, proj.anchor] = mlp_f.T
        out[fi, :, H + 1, proj.anchor] = bias_f.T
    if include_embedding:
        emb = einops.einsum(writes.embed[pos], zs, "v d, v d -> v")
        emb_f = torch.zeros(F, dtype=dtype, device=device).index_add_(0, proj.firing, emb)
        out[torch.arange(F, device=device), 0, H + 2, proj.anchor] = emb_f
    return out
