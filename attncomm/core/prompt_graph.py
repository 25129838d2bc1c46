"""Recursive tracing of one prompt into an ACC graph plus per-firing results (docs/METHOD.md section 4).

:func:`trace_prompt` takes the per-prompt tensors (:class:`PromptTensors`) and an
:class:`~attncomm.core.omega_factors.OmegaCache` and returns a :class:`TraceResult`:

1. **Seeds** (4.1): every component's write at ``end`` (heads by source token), divided by
   ``ln_final.hook_scale[end]``, dotted with the task direction; total ``<= 0`` -> skip
   ``"nonpositive_total"``; greedy at 100% with halving; no head among the seeds -> skip
   ``"no_head_seed"``. Seeds connect to the root ``(direction_name, label(end))`` with type ``"d"``.
2. **Recursion** (4.3): a firing ``(l, h, d, s)`` is reached at most once per prompt and decomposed only
   if ``l > 0``, ``d > 0``, ``s <= d`` and ``A[l,h][d,s] >= 1/(d+1)``. Each side whose contribution total
   is ``> 0`` keeps upstream contributors by the greedy 70% rule over the whole ``[l', component, t']``
   tensor (Embedding included; source-side head entries with ``t' > s`` count, then are dropped); each
   kept contributor adds an edge upstream -> downstream (weight, type ``"d"``/``"s"``) and a kept head is
   reached as ``(l', h', d, t')`` (dest) or ``(l', h', s, t')`` (source). MLP, AH bias and Embedding are
   leaves. Because a firing's upstream lies in strictly lower layers, all firings of a layer are known
   once the layers above are done: they are decomposed in batches per layer (top layer first; chunks
   that fit ``memory_budget``, the 70% rule and the contributions computed for a whole chunk); the
   resulting graph is the same as the reference's depth-first recursion.
3. **Labels** (4.4): ``labels[pos]`` (roles, or tokens with ``" (k)"`` suffixes). Exactly as the
   reference: a firing whose ``d`` or ``s`` has no label is still decomposed (its per-firing results
   are stored) but adds no edges and is not recursed from; an upstream contributor at an unlabeled
   position gets no edge and is not reached. In particular a seed head ``(l, h, end, t)`` whose ``t``
   has no label is traced -- its per-firing results are stored -- but has no edge to the root and no
   upstream edges (its node would have no name).
4. **Per-firing results** (4.5): selected dest and source terms (selection order; an untraced side is
   empty) and both contribution tensors ``[l, H+2, d+1]`` (the Embedding entry is not stored), keyed
   by ``(l, h, d, s)`` (the driver adds the prompt id).
5. **Firing budget** (optional ``max_firings``): a prompt whose trace has more than ``max_firings``
   firings is skipped with ``"firing_budget"``, no edges and no results (:class:`FiringBudgetStop` says
   how far it got). Checked per layer, before the layer is traced: once the layers above are done, the
   layer's firings are all known, so tracing stops before the first layer that would take the count
   past the budget. At most ``max_firings`` firings are ever traced, and a prompt is stopped if and
   only if its complete trace would have more than ``max_firings`` firings.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.core.contributions import (
    Projection,
    PromptWrites,
    pattern_prefix_sums,
    projection_vectors,
    upstream_contributions,
)
from attncomm.core.decompose import LayerInputs, decompose_firings, layer_inputs, selection_mask
from attncomm.core.edge_list import EdgeList
from attncomm.core.omega_factors import OmegaCache, QRFactors
from attncomm.core.selection import greedy_mask_batch, select_seeds

logger = logging.getLogger(__name__)

__all__ = [
    "FIRING_BUDGET",
    "FiringBudgetStop",
    "FiringKey",
    "FiringResult",
    "FiringSink",
    "PromptTensors",
    "TraceResult",
    "component_label",
    "seed_contributions",
    "trace_prompt",
]

#: (layer, head, dest, src)
FiringKey = tuple[int, int, int, int]
NodeId = tuple


@dataclass
class PromptTensors:
    """Everything the tracing of one prompt reads, truncated to positions ``0..end``."""

    end: int
    x: Float[Tensor, "layer pos d_model"]  # ln1.hook_normalized
    scale: Float[Tensor, "layer pos"]  # ln1.hook_scale
    final_scale: Float[Tensor, " pos"]  # ln_final.hook_scale
    writes: PromptWrites
    direction: Float[Tensor, " d_model"]
    labels: dict[int, str]
    cos: Tensor | None = None  # rotary tables [pos rotary_dim]
    sin: Tensor | None = None
    adjacent_pairs: bool = False

    @property
    def n_pos(self) -> int:
        return self.end + 1


@dataclass
class FiringResult:
    """Per-firing results kept for later stages (section 4.5)."""

    dest_terms: Tensor  # int64, selection order; empty when the dest side is not traced
    src_terms: Tensor
    contrib_dest: Float[Tensor, "layer component pos"]  # [l, H+2, d+1]
    contrib_src: Float[Tensor, "layer component pos"]


#: where each firing's result goes as soon as its chunk is done (instead of a dict kept in memory)
FiringSink = Callable[[FiringKey, FiringResult], None]

#: the skip reason of a prompt whose trace would have more than ``max_firings`` firings
FIRING_BUDGET = "firing_budget"


@dataclass(frozen=True)
class FiringBudgetStop:
    """Where :func:`trace_prompt` stopped a prompt at its firing budget.

    ``traced`` firings (layers above ``layer``) had been traced, then ``layer``'s firings took the
    known count to ``reached > budget``: the prompt's complete trace has at least ``reached`` firings.
    """

    budget: int
    layer: int
    traced: int
    reached: int


@dataclass
class TraceResult:
    """Edges (None when skipped), skip reason, seeds and per-firing results of one prompt.

    ``graph`` is built from ``edges`` on first access (and kept). ``results`` is empty when
    :func:`trace_prompt` handed each firing to a ``sink`` instead; ``n_firings`` counts them either way.
    """

    edges: EdgeList | None
    skip_reason: str | None
    results: dict[FiringKey, FiringResult] = field(default_factory=dict)
    seed_total: float = 0.0
    n_firings: int = 0
    budget_stop: FiringBudgetStop | None = None

    @functools.cached_property
    def graph(self) -> nx.MultiDiGraph | None:
        return None if self.edges is None else self.edges.to_graph()


def component_label(component: int, n_heads: int) -> int | str:
    """The node's component field: the head index, or ``"MLP"``, ``"AH bias"``, ``"Embedding"``."""
    if component < n_heads:
        return int(component)
    return ("MLP", "AH bias", "Embedding")[component - n_heads]


def seed_contributions(pt: PromptTensors, n_layers: int) -> Float[Tensor, "layer component pos"]:
    """Every component's write at ``end`` over ``ln_final.hook_scale[end]``, dotted with the direction."""
    end = pt.end
    device = pt.x.device
    proj = Projection(
        z=pt.direction[None, :].to(pt.x.dtype),
        pos=torch.tensor([end], device=device),
        firing=torch.tensor([0], device=device),
        anchor=torch.tensor([end], device=device),
        n_firings=1,
    )
    return upstream_contributions(proj, pt.writes, pt.final_scale, n_layers, pt.n_pos)[0]


def firing_bytes(layer: int, n_heads: int, n_pos: int, d_head: int, rotary: bool, itemsize: int) -> int:
    """Bytes one firing of ``layer`` needs while its contributions are computed (an upper estimate).

    Both sides' output ``[layer, H+3, n]`` (and its stored copy), the head projections and attention
    weights ``[layer, H, n, K]`` with their product (``K = 1`` without rotary; at most ``d_head``
    selected terms with rotary, plus the decomposition's ``[n, d_head]`` tensors).
    """
    k = d_head if rotary else 1
    out = 16 * layer * (n_heads + 3) * n_pos  # both sides, stacked, masked, sorted (values and indices)
    inner = 3 * layer * n_heads * n_pos * k
    dec = (8 if rotary else 1) * n_pos * d_head
    return itemsize * (out + inner + dec + 4 * d_head * d_head)


def _to(qr: QRFactors, like: Tensor) -> QRFactors:
    """QR factors on ``like``'s device and dtype."""
    return QRFactors(*(t.to(like) for t in (qr.Q_a, qr.R_a, qr.Q_b, qr.R_b)))


def _trace_chunk(
    pt: PromptTensors,
    cache: OmegaCache,
    inp: LayerInputs,
    layer: int,
    firing_keys: list[FiringKey],
    prefix: Tensor | None,
    store: FiringSink,
    edges: EdgeList,
    seen: set[FiringKey],
    pending: dict[int, list[FiringKey]],
    *,
    upstream_fraction: float,
    selection_dtype: torch.dtype,
) -> None:
    """Decompose a chunk of one layer's firings, store their results, add their edges, queue upstream keys."""
    H = cache.n_heads
    labels = pt.labels
    device = pt.x.device
    kt = torch.tensor(firing_keys, dtype=torch.long).to(device)
    heads, dests, srcs = kt[:, 1], kt[:, 2], kt[:, 3]
    dec = decompose_firings(inp, cache, layer, heads, dests, srcs)
    mask_d, terms_d = selection_mask(dec.c_dest, dtype=selection_dtype)
    mask_s, terms_s = selection_mask(dec.c_src, dtype=selection_dtype)
    proj_d, proj_s = projection_vectors(dec, inp, mask_d, mask_s)
    del dec
    n_f = max(k[2] for k in firing_keys) + 1
    contrib_d = upstream_contributions(proj_d, pt.writes, pt.scale[layer], layer, n_f)
    contrib_s = upstream_contributions(proj_s, pt.writes, pt.scale[layer], layer, n_f, prefix=prefix)
    # per-firing results: one host transfer per chunk
    host_d, host_s = contrib_d[:, :, : H + 2].cpu(), contrib_s[:, :, : H + 2].cpu()
    for i, key in enumerate(firing_keys):
        d = key[2]
        store(
            key,
            FiringResult(
                dest_terms=terms_d[i],
                src_terms=terms_s[i],
                contrib_dest=host_d[i, :, :, : d + 1].clone(),
                contrib_src=host_s[i, :, :, : d + 1].clone(),
            ),
        )
    del host_d, host_s
    # the 70% rule on every firing and side at once, over [l', component, t' <= d] (Embedding included)
    both = torch.stack([contrib_d, contrib_s], dim=1)  # [F, 2, l, H+3, n]
    del contrib_d, contrib_s
    both = both * (torch.arange(n_f, device=device)[None, :] <= dests[:, None])[:, None, None, None, :]
    flat = both.reshape(len(firing_keys) * 2, -1)
    keep = greedy_mask_batch(flat, upstream_fraction, dtype=selection_dtype)
    keep &= (flat.to(selection_dtype).sum(dim=1) > 0)[:, None]
    keep = keep.reshape(both.shape)
    idx = torch.nonzero(keep)  # rows (f, side, l', component, t') in the per-firing order
    weights = both[keep]
    for (f, side, lu, comp, t), weight in zip(idx.tolist(), weights.tolist(), strict=True):
        _, h, d, s = firing_keys[f]
        anchor = d if side == 0 else s
        if d not in labels or s not in labels or t > anchor or anchor not in labels or t not in labels:
            continue
        down = (int(layer), int(h), labels[d], labels[s])
        up = (int(lu), component_label(comp, H), labels[anchor], labels[t])
        edges.add(up, down, weight, "ds"[side])
        if comp < H:
            up_key = (int(lu), int(comp), anchor, int(t))
            if up_key not in seen:
                seen.add(up_key)
                pending[int(lu)].append(up_key)


def trace_prompt(
    pt: PromptTensors,
    cache: OmegaCache,
    *,
    direction_name: str,
    upstream_fraction: float = 0.7,
    seed_fraction: float = 1.0,
    selection_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    memory_budget: int | None = None,
    sink: FiringSink | None = None,
    max_firings: int | None = None,
) -> TraceResult:
    """Trace one prompt: seeds, recursion over firings layer by layer, graph and per-firing results.

    Each layer's firings are processed in chunks of at most ``memory_budget`` bytes of intermediate
    tensors (:func:`firing_bytes`; ``None``: one chunk per layer), so the peak memory does not grow with
    the number of firings in a layer. With a ``sink``, each firing's result is handed to it as soon as
    its chunk is done and nothing of it is kept (``TraceResult.results`` stays empty): what grows with
    the number of firings is then only the compact :class:`~attncomm.core.edge_list.EdgeList`.

    ``max_firings`` (``None``: no limit): stop before tracing a layer whose firings would take the
    prompt past that many firings and return a ``"firing_budget"`` skip (no edges, no results,
    ``n_firings`` 0, :attr:`TraceResult.budget_stop` set). Results already handed to ``sink`` belong to
    a skipped prompt: the caller discards them.
    """
    if max_firings is not None and max_firings < 1:
        raise ValueError(f"max_firings={max_firings}: must be at least 1 (None: no limit)")
    L, H = cache.n_layers, cache.n_heads
    labels = pt.labels
    seeds = seed_contributions(pt, L)  # [L, H+3, n]
    total = float(seeds.to(selection_dtype).sum())
    if not total > 0:
        return TraceResult(edges=None, skip_reason="nonpositive_total", seed_total=total)
    if seed_fraction == 1.0:
        seed_mask = select_seeds(seeds, dtype=selection_dtype)
    else:
        from attncomm.core.selection import greedy_mask

        seed_mask = greedy_mask(seeds, seed_fraction, halve=True, dtype=selection_dtype)
    seed_idx = torch.nonzero(seed_mask).tolist()
    seed_values = seeds[seed_mask].tolist()  # same (row-major) order as seed_idx
    if not any(c < H for _, c, _ in seed_idx):
        return TraceResult(edges=None, skip_reason="no_head_seed", seed_total=total)

    edges = EdgeList()
    end = pt.end
    root = (direction_name, labels[end]) if end in labels else (direction_name, str(end))
    seen: set[FiringKey] = set()
    pending: dict[int, list[FiringKey]] = defaultdict(list)
    for (layer, comp, t), value in zip(seed_idx, seed_values, strict=True):
        if end in labels and t in labels:
            up = (int(layer), component_label(comp, H), labels[end], labels[t])
            edges.add(up, root, value, "d")
        if comp < H:
            key = (int(layer), int(comp), end, int(t))
            if key not in seen:
                seen.add(key)
                pending[int(layer)].append(key)

    results: dict[FiringKey, FiringResult] = {}
    n_firings = 0

    def store(key: FiringKey, value: FiringResult) -> None:
        nonlocal n_firings
        n_firings += 1
        if sink is None:
            results[key] = value
        else:
            sink(key, value)

    bar = tqdm(total=0, desc="firings", disable=None if progress else True, leave=False)
    device = pt.x.device
    for layer in range(L - 1, -1, -1):
        keys = pending.pop(layer, [])
        if not keys or layer == 0:
            continue
        # the firing condition of every reached key at once (one gather, one host transfer)
        kt = torch.tensor(keys, dtype=torch.long).to(device)
        attn = pt.writes.pattern[layer][kt[:, 1], kt[:, 2], kt[:, 3].clamp(max=pt.end)]
        fires = (kt[:, 2] > 0) & (kt[:, 3] <= kt[:, 2]) & (attn.double() >= 1.0 / (kt[:, 2] + 1).double())
        firing_keys = [k for k, ok in zip(keys, fires.tolist(), strict=True) if ok]
        if not firing_keys:
            continue
        if max_firings is not None and n_firings + len(firing_keys) > max_firings:
            bar.close()
            stop = FiringBudgetStop(max_firings, layer, n_firings, n_firings + len(firing_keys))
            logger.debug("firing budget %d passed at layer %d (%d known)", max_firings, layer, stop.reached)
            return TraceResult(edges=None, skip_reason=FIRING_BUDGET, seed_total=total, budget_stop=stop)
        bar.total += len(firing_keys)
        inp = layer_inputs(
            pt.x[layer],
            cache.W_Q[layer].to(pt.x),
            cache.W_K[layer].to(pt.x),
            None if cache.b_Q is None else cache.b_Q[layer].to(pt.x),
            None if cache.b_K is None else cache.b_K[layer].to(pt.x),
            _to(cache.qr(layer, "d"), pt.x),
            _to(cache.qr(layer, "s"), pt.x),
            pt.cos,
            pt.sin,
            adjacent=pt.adjacent_pairs,
        )
        n_layer = max(k[2] for k in firing_keys) + 1
        rotary = pt.cos is not None
        # the source side of non-rotary models reads prefix sums of the pattern (once per layer)
        prefix = None if rotary else pattern_prefix_sums(pt.writes, pt.scale[layer], layer, n_layer)
        per_firing = firing_bytes(layer, H, n_layer, cache.d_head, rotary, pt.x.element_size())
        chunk = max(1, int(memory_budget // per_firing)) if memory_budget else len(firing_keys)
        logger.debug(
            "layer %d: %d firings (n=%d) in chunks of %d (%.1f MiB per firing)",
            layer,
            len(firing_keys),
            n_layer,
            chunk,
            per_firing / 2**20,
        )
        for start in range(0, len(firing_keys), chunk):
            part = firing_keys[start : start + chunk]
            _trace_chunk(
                pt,
                cache,
                inp,
                layer,
                part,
                prefix,
                store,
                edges,
                seen,
                pending,
                upstream_fraction=upstream_fraction,
                selection_dtype=selection_dtype,
            )
            bar.update(len(part))
        del prefix, inp
    bar.close()

    return TraceResult(edges=edges, skip_reason=None, results=results, seed_total=total, n_firings=n_firings)
