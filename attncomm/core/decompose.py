"""Per-firing singular-term contributions and term selection (section 2 of docs/METHOD.md), batched.

For a firing ``(l, h, d, s)`` and the thin SVDs of :mod:`attncomm.core.omega_factors` at offset ``d - s``:

* dest side, term ``k``: ``p_d[k](j) = (x_d . u_k) u_k^T Omega_d(d-j) x~_j``;
* source side, term ``k``: ``p_s[k](j) = x~_d^T Omega_s(d-j) v_k (v_k . x_j)``;
* ``c[k] = p[k](s) - mean_{j in 0..d, j != s} p[k](j)`` (``c = 0`` when ``d = 0``).

Everything is evaluated in the ``d_head``-dimensional compact coordinates of the SVD, never in
``D x D``: with ``A = Q_a R_a``, ``B = Q_b R_b`` and ``U = Q_a U_c``, ``V = Q_b V_c``,

* ``u_k^T Omega_d(d-j) x~_j = (U_c^T R_a)_k M_d . krot_j`` where ``krot_j = (x_j W_K + b_K) M_j`` is the
  model's rotated key (``M_p`` the rotary map at position ``p``; identity without rotary), so the mean
  over ``j`` is applied to the keys first: one ``d_head`` vector per firing;
* ``x~_d^T Omega_s(d-j) v_k = qrot_d M_j^T . (V_c^T R_b)_k`` with ``qrot_d = (x_d W_Q + b_Q) M_d``;
* ``x_d . u_k = (x_d Q_a) . U_c[:, k]`` and ``v_k . x_j = (x_j Q_b) . V_c[:, k]``.

For non-rotary models this is exactly ``(x_d . u_k) sigma_k (v_k . x~_j)``; for rotary models it is
the RoPE variant where every other source ``j`` uses its own offset's Omega. All firings of a layer
(any heads, dests and sources) are decomposed in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attncomm.core.omega_factors import OmegaCache, OmegaSVD, QRFactors, apply_rotary
from attncomm.core.selection import select_terms_batch

__all__ = [
    "FiringDecomposition",
    "LayerInputs",
    "decompose_firings",
    "layer_inputs",
    "selection_mask",
]


@dataclass
class LayerInputs:
    """Per-prompt, per-layer tensors shared by every firing of the layer (all heads)."""

    x: Float[Tensor, "pos d_model"]
    xQ_d: Float[Tensor, "head_index pos d_head"]  # x @ Q_a of Omega_d (A = W_Q)
    xQ_s: Float[Tensor, "head_index pos d_head"]  # x @ Q_b of Omega_s (B = W_K)
    q_rot: Float[Tensor, "head_index pos d_head"]  # (x W_Q + b_Q) rotated at its position
    k_rot: Float[Tensor, "head_index pos d_head"]  # (x W_K + b_K) rotated at its position
    k_cum: Float[Tensor, "head_index pos d_head"]  # prefix sums of k_rot over positions
    qr_d: QRFactors
    qr_s: QRFactors
    cos: Float[Tensor, "pos rotary_dim"] | None
    sin: Float[Tensor, "pos rotary_dim"] | None
    adjacent: bool = False
    xQ_s_cum: Float[Tensor, "head_index pos d_head"] | None = None  # prefix sums of xQ_s over positions


def layer_inputs(
    x: Float[Tensor, "pos d_model"],
    W_Q: Float[Tensor, "head_index d_model d_head"],
    W_K: Float[Tensor, "head_index d_model d_head"],
    b_Q: Float[Tensor, "head_index d_head"] | None,
    b_K: Float[Tensor, "head_index d_head"] | None,
    qr_d: QRFactors,
    qr_s: QRFactors,
    cos: Float[Tensor, "pos rotary_dim"] | None = None,
    sin: Float[Tensor, "pos rotary_dim"] | None = None,
    *,
    adjacent: bool = False,
) -> LayerInputs:
    """Precompute the per-layer tensors of one prompt (queries, keys, compact projections of ``x``)."""
    q = einops.einsum(x, W_Q, "pos d_model, head d_model d_head -> head pos d_head")
    k = einops.einsum(x, W_K, "pos d_model, head d_model d_head -> head pos d_head")
    if b_Q is not None:
        q = q + b_Q[:, None, :]
    if b_K is not None:
        k = k + b_K[:, None, :]
    if cos is not None and sin is not None:
        n = x.shape[0]
        q = apply_rotary(q, cos[:n], sin[:n], adjacent=adjacent)
        k = apply_rotary(k, cos[:n], sin[:n], adjacent=adjacent)
    # the dest side's A is W_Q (first D rows of Q_a); the source side's B is W_K
    D = x.shape[-1]
    xQ_d = einops.einsum(x, qr_d.Q_a[:, :D], "pos d_model, head d_model r -> head pos r")
    xQ_s = einops.einsum(x, qr_s.Q_b[:, :D], "pos d_model, head d_model r -> head pos r")
    return LayerInputs(
        x=x,
        xQ_d=xQ_d,
        xQ_s=xQ_s,
        q_rot=q,
        k_rot=k,
        k_cum=torch.cumsum(k, dim=1),
        qr_d=qr_d,
        qr_s=qr_s,
        cos=cos,
        sin=sin,
        adjacent=adjacent,
        xQ_s_cum=torch.cumsum(xQ_s, dim=1),
    )


@dataclass
class FiringDecomposition:
    """Singular-term contributions of a batch of firings and the pieces the upstream projection reuses.

    ``c_dest = xu_dest * g_dest``: ``g_dest[f, k] = u_k^T (Omega_d(d-s) x~_s - mean_j Omega_d(d-j) x~_j)``.
    ``c_src[f, k] = sum_j coef[f, j] t1[f, j, k] t2[f, j, k]`` with ``t1 = x~_d^T Omega_s(d-j) v_k``,
    ``t2 = v_k . x_j`` and ``coef`` = 1 at ``s``, ``-1/d`` at the other ``j <= d``, 0 past ``d``.
    Without rotary ``t1`` does not depend on ``j`` and is stored once (``[firing, 1, term]``).
    """

    heads: Int[Tensor, " firing"]
    dests: Int[Tensor, " firing"]
    srcs: Int[Tensor, " firing"]
    svd_d: OmegaSVD
    svd_s: OmegaSVD
    c_dest: Float[Tensor, "firing term"]
    c_src: Float[Tensor, "firing term"]
    g_dest: Float[Tensor, "firing term"]
    t1: Float[Tensor, "firing pos term"]  # pos = 1 for non-rotary models
    coef: Float[Tensor, "firing pos"]


def relative_coefficients(
    dests: Int[Tensor, " firing"], srcs: Int[Tensor, " firing"], n_pos: int, dtype: torch.dtype
) -> Float[Tensor, "firing pos"]:
    """``coef[f, j]``: 1 at ``j = s``, ``-1/d`` at other ``j <= d``, 0 past ``d`` (all 0 when ``d = 0``)."""
    j = torch.arange(n_pos, device=dests.device)[None, :]
    d = dests[:, None]
    zero = torch.zeros((), dtype=dtype, device=dests.device)
    inv_d = torch.where(d > 0, 1.0 / d.clamp(min=1).to(dtype), zero)
    coef = torch.where(j <= d, -inv_d, zero)
    is_s = (j == srcs[:, None]) & (d > 0)
    return torch.where(is_s, torch.ones((), dtype=dtype, device=dests.device), coef)


def decompose_firings(
    inp: LayerInputs,
    cache: OmegaCache,
    layer: int,
    heads: Int[Tensor, " firing"],
    dests: Int[Tensor, " firing"],
    srcs: Int[Tensor, " firing"],
) -> FiringDecomposition:
    """Dest and source singular-term contributions ``c[k]`` of all given firings of ``layer`` (one batch)."""
    heads, dests, srcs = heads.long(), dests.long(), srcs.long()
    n_pos = int(dests.max()) + 1 if dests.numel() else 1
    dtype = inp.x.dtype
    deltas = dests - srcs
    svd_d = cache.compact(layer, heads, deltas, "d")
    svd_s = cache.compact(layer, heads, deltas, "s")
    coef = relative_coefficients(dests, srcs, n_pos, dtype)  # [F, n]

    # ---- dest side: c = (x_d . u_k) * g_k with g_k = (U_c^T R_a M_d) . krel
    k_s = inp.k_rot[heads, srcs]  # [F, dh]
    k_sum = inp.k_cum[heads, dests]
    d_f = dests.to(dtype)[:, None]
    krel = torch.where(d_f > 0, k_s - (k_sum - k_s) / d_f.clamp(min=1), torch.zeros_like(k_s))
    if inp.cos is not None and inp.sin is not None:
        krel = apply_rotary(krel, inp.cos[dests], inp.sin[dests], adjacent=inp.adjacent, inverse=True)
    R_a = inp.qr_d.R_a[heads]  # [F, dh, dh]
    w = einops.einsum(R_a, krel, "f i j, f j -> f i")
    g_dest = einops.einsum(svd_d.U_c, w, "f i k, f i -> f k")
    xu = einops.einsum(inp.xQ_d[heads, dests], svd_d.U_c, "f i, f i k -> f k")
    c_dest = xu * g_dest

    # ---- source side: p(j) = (qrot_d M_j^T . (V_c^T R_b)_k) * (x_j Q_b . V_c[:, k])
    q_d = inp.q_rot[heads, dests]  # [F, dh]
    H_s = einops.einsum(inp.qr_s.R_b[heads], svd_s.V_c, "f i j, f i k -> f j k")  # R_b^T V_c: [F, dh, r]
    if inp.cos is not None and inp.sin is not None:
        q_j = apply_rotary(
            q_d[:, None, :].expand(-1, n_pos, -1),
            inp.cos[:n_pos][None],
            inp.sin[:n_pos][None],
            adjacent=inp.adjacent,
            inverse=True,
        )  # [F, n, dh]
        t1 = einops.einsum(q_j, H_s, "f n j, f j k -> f n k")
        xQ = inp.xQ_s[heads, :n_pos] if inp.xQ_s.shape[1] >= n_pos else inp.xQ_s[heads]
        t2 = einops.einsum(xQ, svd_s.V_c, "f n i, f i k -> f n k")
        c_src = einops.einsum(coef, t1 * t2, "f n, f n k -> f k")
    else:
        # t1 does not depend on j: c = t1 * (sum_j coef_j x_j Q_b) V_c, the sum from prefix sums in O(1)
        t1 = einops.einsum(q_d, H_s, "f j, f j k -> f k")[:, None, :]  # [F, 1, r]
        cum = inp.xQ_s_cum if inp.xQ_s_cum is not None else torch.cumsum(inp.xQ_s, dim=1)
        x_s = inp.xQ_s[heads, srcs]
        x_cum = cum[heads, dests]
        x_rel = torch.where(d_f > 0, x_s - (x_cum - x_s) / d_f.clamp(min=1), torch.zeros_like(x_s))
        c_src = t1[:, 0] * einops.einsum(x_rel, svd_s.V_c, "f i, f i k -> f k")
    return FiringDecomposition(
        heads=heads,
        dests=dests,
        srcs=srcs,
        svd_d=svd_d,
        svd_s=svd_s,
        c_dest=c_dest,
        c_src=c_src,
        g_dest=g_dest,
        t1=t1,
        coef=coef,
    )


def selection_mask(
    c: Float[Tensor, "firing term"], *, dtype: torch.dtype = torch.float32
) -> tuple[Bool[Tensor, "firing term"], list[Int[Tensor, " selected"]]]:
    """Selected terms of each firing as a mask and as index lists in selection order (empty: not traced)."""
    order, n_sel = select_terms_batch(c, dtype=dtype)
    rank_ok = torch.arange(c.shape[1], device=c.device)[None, :] < n_sel[:, None]
    mask = torch.zeros(c.shape, dtype=torch.bool, device=c.device).scatter_(1, order, rank_ok)
    host = order.cpu()  # the index lists live on the host: one transfer per batch
    lists = [host[f, :n] for f, n in enumerate(n_sel.tolist())]
    return mask, lists
