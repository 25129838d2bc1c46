"""Causal effect of each edge of a combined graph: remove its signal, measure (docs/METHOD.md section 7).

For an edge ``u -> v`` of type ``"d"`` (dest side) or ``"s"`` (source side) and a prompt it appeared in,
with ``v`` the downstream firing ``(p, l, h, d, s)``:

1. ``y`` = ``u``'s write into the residual stream at its ``(dest, src)`` positions ``(t, t')``: a head
   writes ``A[t, t'] v(t') W_O`` (Gemma-2: times the ``ln1_post`` gain over ``ln1_post.hook_scale[t]``),
   an MLP ``hook_mlp_out[t]``, an ``AH bias`` ``b_O``, the ``Embedding`` ``blocks.0.hook_resid_pre[t]``
   (:func:`upstream_write`).
2. ``P y`` with ``P = U_T U_T^T`` (type ``d``, ``U`` of ``Omega_d(d - s)``) or ``P = V_T V_T^T``
   (type ``s``, ``V`` of ``Omega_s(d - s)``), ``T`` the firing's selected terms; minus its mean over
   ``d_model`` (LayerNorm models only); divided by layer ``l``'s ``ln1.hook_scale`` at the intervened
   position (``d`` for type ``d``, ``s`` for type ``s``): the removal vector ``r`` (:func:`removal_vector`).
3. ``r`` is removed from head ``(l, h)``'s normalized input at that position only. Queries and keys
   are linear in the normalized input before the rotary rotation (``q = x W_Q + b_Q``; TransformerLens's
   ``hook_q`` / ``hook_k`` are pre-rotary), so recomputing that head's query (type ``d``) or key (type
   ``s``) is exactly ``hook_q[d, h] -= r W_Q[l, h]`` (resp. ``hook_k[s, h] -= r W_K[l, h]``), and the model
   runs on from there (:func:`removal_hooks`).

**Grouped-query attention.** A GQA key is shared by the ``H / n_kv_heads`` query heads of its group, so
editing ``hook_k`` would also change the sibling heads (the reference overwrote the shared key, a bug
not reproduced here). Instead the intervened head's *attention scores* are corrected: the key at
``s`` enters head ``h`` only through the column ``s`` of its scores, ``score[d', s] = q_rot(d') .
k_rot(s) / attn_scale`` for every query ``d' >= s``, and removing ``dk = r W_K[l, h]`` changes that column
by ``-q_rot(d') . dk_rot(s) / attn_scale`` (the rotary rotation is linear). Without a softcap that is
added to ``hook_attn_scores``; with Gemma-2's softcap ``cap * tanh(./cap)`` the column is recomputed
from the captured (pre-rotary) ``hook_q`` / ``hook_k``, rotated with the model's own cos/sin tables, as
``cap * tanh(q_rot(d') . (k_rot(s) - dk_rot(s)) / attn_scale / cap)``. Head ``h``'s scores are thus
exactly those of a model in which only head ``h``'s key changed; every other head is untouched.

**Effect.** ``logit_diff`` = task metric after - task metric before, per prompt, with the task's own
metric and sign (``Task.metric``). For greater-than the reference's intervention code used the opposite
sign (mean over ``<= YY`` minus mean over ``> YY``), so published gt ``logit_diff`` values are the
negation of ours; pruning uses ``|mean|`` and is unaffected.

Pure maths and hooks: tensors in, tensors out; the model is reached only through the adapter's hook
names and ``run_with_hooks``; no file I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import einops
import networkx as nx
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.core.node_ids import NodeId, format_node_id, is_root
from attncomm.core.omega_factors import OmegaCache, apply_rotary

if TYPE_CHECKING:  # dataclasses only; keeps the model-loading stack out of core's imports
    from attncomm.core.types import ArchFacts, HeadWeights

log = logging.getLogger(__name__)

__all__ = [
    "EdgeSite",
    "EdgeWork",
    "Removal",
    "batch_ranges",
    "cached_runs",
    "edge_sites",
    "full_basis",
    "head_space_delta",
    "intervention_graph",
    "needed_hooks",
    "removal_hooks",
    "removal_vector",
    "selected_basis",
    "site_removal",
    "upstream_write",
]

#: ``terms(firing_key, side)`` -> the selected singular terms of that side of a traced firing
TermsLookup = Callable[[tuple[int, int, int, int, int], str], Sequence[int]]
#: ``metric(logits, prompt_ids)`` -> the task metric of those prompts (logits of the batch in that order)
TaskMetric = Callable[[Tensor, Sequence[int]], Float[Tensor, " batch"]]
#: ``positions[p]`` -> label -> position in prompt ``p`` (role labels or token labels)
LabelPositions = Sequence[Mapping[str, int]] | Mapping[int, Mapping[str, int]]

HookFn = Callable[[Tensor, Any], Tensor | None]


class InterventionModel(Protocol):
    """What the interventions need of a model (``attncomm.models.adapter.ModelAdapter`` provides it)."""

    arch: ArchFacts
    weights: HeadWeights

    def resid_pre(self, layer: int) -> str: ...
    def ln1_scale(self, layer: int) -> str: ...
    def pattern(self, layer: int) -> str: ...
    def v(self, layer: int) -> str: ...
    def q(self, layer: int) -> str: ...
    def k(self, layer: int) -> str: ...
    def attn_scores(self, layer: int) -> str: ...
    def mlp_out(self, layer: int) -> str: ...
    def ln1_post_scale(self, layer: int) -> str: ...
    def rotary_cos_sin(self, n_pos: int) -> tuple[Tensor, Tensor]: ...
    def run_with_cache(self, tokens: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]: ...
    def run_with_hooks(self, tokens: Tensor, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Tensor: ...


# ----------------------------------------------------------------------------- the removed vector


def needed_hooks(model: InterventionModel) -> list[str]:
    """Hooks of the clean run from which every upstream write and every ``ln1`` scale is read."""
    arch = model.arch
    names = [model.resid_pre(0)]
    for layer in range(arch.n_layers):
        names += [model.pattern(layer), model.v(layer), model.mlp_out(layer), model.ln1_scale(layer)]
        if arch.post_attn_norm:
            names.append(model.ln1_post_scale(layer))
    return names


def upstream_write(
    cache: Mapping[str, Tensor],
    model: InterventionModel,
    layer: int,
    component: int | str,
    t: int,
    t_src: int,
    row: int = 0,
) -> Float[Tensor, " d_model"]:
    """The write of component ``(layer, component)`` into the residual at position ``t`` (source ``t_src``).

    ``cache`` holds :func:`needed_hooks` of a clean run with a leading batch dimension; ``row`` picks
    the prompt. Head: ``A[t, t_src] v(t_src) W_O`` (post-norm models: times ``ln1_post`` gain over its
    scale at ``t``); ``"MLP"``: ``hook_mlp_out[t]``; ``"AH bias"``: ``b_O[layer]``; ``"Embedding"``:
    ``blocks.0.hook_resid_pre[t]``. Not divided by any ``ln1`` scale.
    """
    arch, w = model.arch, model.weights
    if component == "Embedding":
        return cache[model.resid_pre(0)][row, t]
    if component == "MLP":
        return cache[model.mlp_out(layer)][row, t]
    if component == "AH bias":
        return w.b_O[layer]
    if not isinstance(component, int) or not 0 <= component < arch.n_heads:
        raise ValueError(f"unknown component {component!r} of layer {layer}")
    kv = component // arch.kv_group_size
    attn = cache[model.pattern(layer)][row, component, t, t_src]
    value = cache[model.v(layer)][row, t_src, kv]
    write = attn * (value @ w.W_O[layer, component])
    if arch.post_attn_norm:
        if w.ln1_post_gain is None:
            raise ValueError("post-attention-norm model without HeadWeights.ln1_post_gain")
        write = write * w.ln1_post_gain[layer] / cache[model.ln1_post_scale(layer)][row, t, 0]
    return write


def selected_basis(
    omega: OmegaCache,
    layer: int,
    head: int,
    delta: int,
    side: str,
    terms: Sequence[int],
    memo: dict[tuple[int, int, int, str], Tensor] | None = None,
    device: torch.device | str | None = None,
) -> Float[Tensor, "d_model n_terms"]:
    """The singular vectors spanning the firing's selected terms: ``U[:, T]`` of ``Omega_d(delta)`` (side
    ``d``) or ``V[:, T]`` of ``Omega_s(delta)`` (side ``s``), both ``d_model`` rows.

    ``memo`` (optional) keeps the full ``U`` / ``V`` per ``(layer, head, delta, side)`` across calls,
    on ``device`` (default: the cache's).
    """
    basis = full_basis(omega, layer, head, delta, side, memo, device)
    index = torch.as_tensor(list(terms), dtype=torch.long, device=basis.device)
    return basis[:, index]


def full_basis(
    omega: OmegaCache,
    layer: int,
    head: int,
    delta: int,
    side: str,
    memo: dict[tuple[int, int, int, str], Tensor] | None = None,
    device: torch.device | str | None = None,
) -> Float[Tensor, "d_model rank"]:
    """All singular vectors ``U`` of ``Omega_d(delta)`` (side ``d``) or ``V`` of ``Omega_s(delta)`` (side
    ``s``) of head ``(layer, head)``, moved to ``device`` (default: the cache's).

    ``memo`` (optional) keeps them per ``(layer, head, delta, side)`` across calls (``delta`` 0 for
    non-rotary models, whose Omega does not depend on it); a memoized basis is returned as stored.
    """
    key = (layer, head, delta if omega.rotary else 0, side)
    basis = None if memo is None else memo.get(key)
    if basis is None:
        U, _, V = omega.get(layer, head, delta, side)
        basis = U if side == "d" else V
        if device is not None:
            basis = basis.to(device)
        if memo is not None:
            memo[key] = basis
    return basis


def removal_vector(
    write: Float[Tensor, " d_model"],
    basis: Float[Tensor, "d_model n_terms"],
    scale: float | Tensor,
    center: bool,
) -> Float[Tensor, " d_model"]:
    """``(P y - mean(P y)) / scale`` with ``P = basis basis^T`` (no centring for RMSNorm models)."""
    coords = einops.einsum(basis, write.to(basis.dtype), "d_model k, d_model -> k")
    projected = einops.einsum(basis, coords, "d_model k, k -> d_model")
    if center:
        projected = projected - projected.mean()
    return projected / scale


def head_space_delta(
    vec: Float[Tensor, " d_model"], model: InterventionModel, layer: int, head: int, side: str
) -> Float[Tensor, " d_head"]:
    """The change of head ``(layer, head)``'s query (side ``d``) or key (side ``s``) caused by adding ``vec``
    to its normalized input: ``vec W_Q`` / ``vec W_K`` (pre-rotary; the biases cancel)."""
    W = model.weights.W_Q if side == "d" else model.weights.W_K
    return vec.to(W.dtype) @ W[layer, head]


# ----------------------------------------------------------------------------- hooks


@dataclass(frozen=True)
class Removal:
    """One batch row's intervention: add ``sign * delta`` to head ``(layer, head)``'s query (side ``d``) or
    key (side ``s``) at ``position`` (``delta`` in head space, see :func:`head_space_delta`)."""

    layer: int
    head: int
    side: str
    position: int
    delta: Float[Tensor, " d_head"]


def _rows(removals: Sequence[Removal | None], layer: int, kind: str, gqa: bool) -> list[int]:
    """Batch rows whose removal acts at ``layer`` through hook ``kind`` (``q``, ``k`` or ``scores``)."""
    out = []
    for row, r in enumerate(removals):
        if r is None or r.layer != layer:
            continue
        if r.side == "d":
            hook = "q"
        elif r.side == "s":
            hook = "scores" if gqa else "k"
        else:
            raise ValueError(f"removal side must be 'd' or 's', got {r.side!r}")
        if hook == kind:
            out.append(row)
    return out


def _add_at_rows(
    removals: Sequence[Removal | None], rows: list[int], sign: float, head_dim: int
) -> Callable[[Tensor, Any], Tensor]:
    """A hook adding ``sign * delta`` at ``[row, position, head]`` of a ``[batch pos head d_head]`` tensor."""
    idx_row = torch.tensor(rows, dtype=torch.long)
    idx_pos = torch.tensor([removals[r].position for r in rows], dtype=torch.long)  # type: ignore[union-attr]
    idx_head = torch.tensor([removals[r].head for r in rows], dtype=torch.long)  # type: ignore[union-attr]
    deltas = torch.stack([removals[r].delta for r in rows])  # type: ignore[union-attr]

    def hook(tensor: Tensor, hook: Any) -> Tensor:
        if tensor.shape[2] != head_dim:
            raise RuntimeError(f"expected {head_dim} heads in {tuple(tensor.shape)}")
        dev = tensor.device
        out = tensor.clone()
        r, p, h = idx_row.to(dev), idx_pos.to(dev), idx_head.to(dev)
        out[r, p, h] = out[r, p, h] + sign * deltas.to(device=dev, dtype=tensor.dtype)
        return out

    return hook


def removal_hooks(
    model: InterventionModel, removals: Sequence[Removal | None], sign: float = -1.0
) -> list[tuple[str, HookFn]]:
    """Forward hooks applying one :class:`Removal` per batch row (``None``: row left clean).

    ``sign=-1`` removes the signal, ``+1`` boosts it. Dest side: ``hook_q``. Source side: ``hook_k``
    without GQA; with GQA the intervened head's score column is corrected (module docstring), which
    changes that head only.
    """
    arch = model.arch
    gqa = arch.kv_group_size > 1
    hooks: list[tuple[str, HookFn]] = []
    layers = sorted({r.layer for r in removals if r is not None})
    for layer in layers:
        q_rows = _rows(removals, layer, "q", gqa)
        if q_rows:
            hooks.append((model.q(layer), _add_at_rows(removals, q_rows, sign, arch.n_heads)))
        k_rows = _rows(removals, layer, "k", gqa)
        if k_rows:
            hooks.append((model.k(layer), _add_at_rows(removals, k_rows, sign, arch.n_kv_heads)))
        s_rows = _rows(removals, layer, "scores", gqa)
        if s_rows:
            items = [(r, removal) for r in s_rows if (removal := removals[r]) is not None]
            hooks += _score_correction_hooks(model, layer, items, sign)
    return hooks


def _score_correction_hooks(
    model: InterventionModel, layer: int, items: list[tuple[int, Removal]], sign: float
) -> list[tuple[str, HookFn]]:
    """Change one head's key at one position through its attention scores (GQA models, see module doc)."""
    arch = model.arch
    captured: dict[str, Tensor] = {}

    def capture(key: str) -> HookFn:
        def hook(tensor: Tensor, hook: Any) -> None:
            captured[key] = tensor.detach()

        return hook

    def correct(scores: Tensor, hook: Any) -> Tensor:
        q, k = captured["q"], captured["k"]
        n_pos = scores.shape[-1]
        out = scores.clone()
        if arch.rotary:
            cos, sin = model.rotary_cos_sin(n_pos)
            cos, sin = cos.to(device=q.device, dtype=q.dtype), sin.to(device=q.device, dtype=q.dtype)
        for row, r in items:
            s = r.position
            q_h = q[row, :, r.head]  # [pos d_head]
            k_s = k[row, s, r.head // arch.kv_group_size]  # [d_head]
            dk = sign * r.delta.to(device=q.device, dtype=q.dtype)
            if arch.rotary:
                q_h = apply_rotary(q_h, cos, sin, adjacent=arch.rotary_adjacent_pairs)
                k_s = apply_rotary(k_s, cos[s], sin[s], adjacent=arch.rotary_adjacent_pairs)
                dk = apply_rotary(dk, cos[s], sin[s], adjacent=arch.rotary_adjacent_pairs)
            column = out[row, r.head, s:, s]
            live = torch.isfinite(column)  # causal (and sliding-window) mask stays as it is
            if arch.attn_softcap is None:
                change = (q_h[s:] @ dk) / arch.attn_scale
                new = column + change.to(column.dtype)
            else:
                cap = arch.attn_softcap
                raw = (q_h[s:] @ (k_s + dk)) / arch.attn_scale
                new = (cap * torch.tanh(raw / cap)).to(column.dtype)
            out[row, r.head, s:, s] = torch.where(live, new, column)
        return out

    return [
        (model.q(layer), capture("q")),
        (model.k(layer), capture("k")),
        (model.attn_scores(layer), correct),
    ]


# ----------------------------------------------------------------------------- edges of a graph


@dataclass(frozen=True)
class EdgeSite:
    """Where one (edge, prompt) intervention acts and what it removes."""

    prompt: int
    upstream: NodeId
    downstream: NodeId
    side: str
    firing: tuple[int, int, int, int, int]  # (p, l, h, d, s) of the downstream head
    t: int  # upstream write position (its dest label)
    t_src: int  # upstream source position (its src label)


@dataclass
class EdgeWork:
    """One non-root edge of the graph and its per-prompt sites (in ``prompts_appeared`` order)."""

    u: NodeId
    v: NodeId
    key: Any
    side: str
    sites: list[EdgeSite]


def _position(positions: Mapping[str, int], label: str, prompt: int, node: NodeId) -> int:
    if label not in positions:
        raise ValueError(
            f"node {format_node_id(node)}: label {label!r} is not a position of prompt {prompt} "
            f"(labels there: {sorted(positions)[:20]}); was the graph traced with the same task, prompts "
            "and trace.with_tokens setting?"
        )
    return positions[label]


def edge_sites(G: nx.MultiDiGraph, positions: LabelPositions) -> list[EdgeWork]:
    """Every non-root edge of ``G`` with the positions of its sites in each prompt it appeared in.

    ``positions[p]`` maps a label to its position in prompt ``p`` (role labels or token labels). The
    upstream node's dest label must sit at the intervened position (``d`` for type ``d``, ``s`` for ``s``).
    """
    work: list[EdgeWork] = []
    for u, v, key, data in G.edges(keys=True, data=True):
        if is_root(v):
            continue
        if is_root(u) or not isinstance(v[1], int):
            raise ValueError(
                f"edge {format_node_id(u)} -> {format_node_id(v)}: the downstream must be a head"
            )
        side = data["type"]
        sites = []
        for p in data["prompts_appeared"]:
            pos = positions[p]
            d, s = _position(pos, v[2], p, v), _position(pos, v[3], p, v)
            t, t_src = _position(pos, u[2], p, u), _position(pos, u[3], p, u)
            where = d if side == "d" else s
            if t != where:
                raise ValueError(
                    f"edge {format_node_id(u)} -> {format_node_id(v)} (type {side}) in prompt {p}: the "
                    f"upstream writes at position {t} but the intervention is at {where}"
                )
            sites.append(EdgeSite(int(p), u, v, side, (int(p), int(v[0]), int(v[1]), d, s), t, t_src))
        work.append(EdgeWork(u, v, key, side, sites))
    return work


def site_removal(
    site: EdgeSite,
    cache: Mapping[str, Tensor],
    row: int,
    model: InterventionModel,
    omega: OmegaCache,
    terms: Sequence[int],
    memo: dict[tuple[int, int, int, str], Tensor] | None = None,
) -> tuple[Float[Tensor, " d_model"], Removal]:
    """The removal vector of one site (from the clean ``cache`` row ``row``) and its head-space removal.

    ``memo``: see :func:`selected_basis`.
    """
    _, layer, head, d, s = site.firing
    up_layer, component = site.upstream[0], site.upstream[1]
    write = upstream_write(cache, model, int(up_layer), component, site.t, site.t_src, row)
    basis = selected_basis(omega, layer, head, d - s, site.side, terms, memo, write.device)
    where = d if site.side == "d" else s
    scale = cache[model.ln1_scale(layer)][row, where, 0].to(basis.dtype)
    vec = removal_vector(write, basis, scale, center=model.arch.normalization != "RMS")
    delta = head_space_delta(vec, model, layer, head, site.side)
    return vec, Removal(layer, head, site.side, where, delta)


def batch_ranges(n: int, size: int) -> Iterator[range]:
    """``range(0, size)``, ``range(size, 2 size)``, ... covering ``0..n-1`` (the last one shorter)."""
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def cached_runs(
    model: InterventionModel,
    tokens: Int[Tensor, "batch pos"],
    prompts: Sequence[int],
    names: Sequence[str],
    batch_size: int,
    *,
    desc: str,
    progress: bool = True,
) -> Iterator[tuple[list[int], Tensor, dict[str, Tensor]]]:
    """Clean runs of ``prompts`` (rows of ``tokens``) in batches of ``batch_size``, caching ``names``.

    Yields ``(ids, logits, cache)`` per batch, ``ids`` the batch's prompts in order; nothing is kept
    between batches.
    """
    chunks = list(batch_ranges(len(prompts), batch_size))
    for chunk in tqdm(chunks, desc=desc, leave=False, disable=None if progress else True):
        ids = [prompts[c] for c in chunk]
        yield (ids, *model.run_with_cache(tokens[ids], names))


def intervention_graph(
    G: nx.MultiDiGraph,
    model: InterventionModel,
    tokens: Int[Tensor, "batch pos"],
    metric: TaskMetric,
    positions: LabelPositions,
    terms: TermsLookup,
    omega: OmegaCache,
    batch_size: int = 16,
    sign: float = -1.0,
    progress: bool = True,
) -> nx.MultiDiGraph:
    """The intervention graph: ``G`` with ``upstream_node``, ``downstream_node`` and ``logit_diff`` on
    every non-root edge (section 7).

    ``tokens[p]`` are prompt ``p``'s tokens; ``metric(logits, prompt_ids)`` the task metric of those
    prompts (logits of the batch in that order); ``positions[p]`` label -> position; ``terms(firing,
    side)`` the firing's selected terms. Sites of all edges are packed into batches of ``batch_size``
    rows (an edge's prompts run together, several small edges share a batch), one removal per row.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    work = edge_sites(G, positions)
    flat = [(i, j) for i, w in enumerate(work) for j in range(len(w.sites))]
    prompts = sorted({s.prompt for w in work for s in w.sites})
    log.info(
        "interventions: %d edges, %d (edge, prompt) sites over %d prompts", len(work), len(flat), len(prompts)
    )

    # 1. clean runs: metric before and every site's removal, prompt by prompt batch
    by_prompt: dict[int, list[tuple[int, int]]] = {}
    for i, j in flat:
        by_prompt.setdefault(work[i].sites[j].prompt, []).append((i, j))
    before: dict[int, float] = {}
    removals: dict[tuple[int, int], Removal] = {}
    names = needed_hooks(model)
    memo: dict[tuple[int, int, int, str], Tensor] = {}
    for ids, logits, cache in cached_runs(
        model, tokens, prompts, names, batch_size, desc="clean runs", progress=progress
    ):
        for row, value in enumerate(metric(logits, ids).tolist()):
            before[ids[row]] = float(value)
        for row, p in enumerate(ids):
            for i, j in by_prompt[p]:
                site = work[i].sites[j]
                selected = terms(site.firing, site.side)
                _, removals[(i, j)] = site_removal(site, cache, row, model, omega, selected, memo)

    # 2. intervened runs, batches of sites in edge order
    after: dict[tuple[int, int], float] = {}
    done_sites = [0] * len(work)
    with tqdm(total=len(work), desc="interventions", unit="edge", disable=None if progress else True) as bar:
        bar.update(sum(1 for w in work if not w.sites))
        for chunk in batch_ranges(len(flat), batch_size):
            pairs = [flat[c] for c in chunk]
            ids = [work[i].sites[j].prompt for i, j in pairs]
            hooks = removal_hooks(model, [removals[pair] for pair in pairs], sign)
            logits = model.run_with_hooks(tokens[ids], hooks)
            for pair, value in zip(pairs, metric(logits, ids).tolist(), strict=True):
                after[pair] = float(value)
                done_sites[pair[0]] += 1
                if done_sites[pair[0]] == len(work[pair[0]].sites):
                    bar.update(1)

    out = G.copy()
    for i, w in enumerate(work):
        data = out.edges[w.u, w.v, w.key]
        data["upstream_node"] = format_node_id(w.u)
        data["downstream_node"] = format_node_id(w.v)
        data["logit_diff"] = [after[(i, j)] - before[s.prompt] for j, s in enumerate(w.sites)]
    return out
