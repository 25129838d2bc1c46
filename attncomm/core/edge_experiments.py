"""Intervention experiments on chosen edges: remove or boost a signal, selected or random terms (section 9).

For an edge ``u -> v`` of the combined graph (type ``d`` or ``s``) and each prompt it appeared in, the
signal is built exactly as in section 7 (:mod:`attncomm.core.edge_interventions`): ``u``'s write ``y`` at
its positions, projected on a set ``T`` of singular vectors of the downstream head's Omega (``U`` for
type ``d``, ``V`` for type ``s``), centred over ``d_model`` (LayerNorm models) and divided by the
downstream layer's ``ln1.hook_scale`` at the intervened position: ``r = (P_T y - mean) / scale``.
Four operations, in the published loop order :data:`OPERATIONS` (boosting in ``{False, True}`` x
random in ``{False, True}``):

- ``Removing (SVs)``: ``x <- x - r`` with ``T`` = the firing's selected terms (the section-7 intervention);
- ``Removing (Random)``: ``x <- x - r`` with ``T`` = a random set of the complement of the selected
  terms, of the same size (or the complement's size if that is smaller);
- ``Boosting (SVs)`` / ``Boosting (Random)``: ``x <- x + r``.

Only the downstream head's query (type ``d``) or key (type ``s``) sees the changed input; the model
runs on from there (:func:`~attncomm.core.edge_interventions.removal_hooks`).

**Random draws (exact order).** One ``numpy.random.RandomState(seed)`` serves a whole call of
:func:`run_experiments`. For each edge (in the given order; an edge id matching several keys of the
multigraph, one per type, gives one entry per key in key order), for each operation of
:data:`OPERATIONS`, for each prompt the edge appeared in (ascending id) whose selected terms are not
empty, exactly one draw is made, whether the operation is random or not::

    complement = [i for i in range(rank) if i not in selected]          # ascending
    rng.choice(complement, min(len(selected), len(complement)), replace=False)

(``rank`` = the number of singular triplets kept, ``d_head``). Only the draws of random operations
are used; the others are consumed and dropped, as the reference does, so the random sets of
``Removing (Random)`` are the second draws of each prompt of an edge, those of ``Boosting (Random)``
the fourth. Prompts where the edge does not appear draw nothing; a draw of size 0 (every term
selected) consumes nothing and gives no change.

**Table** (one row per edge x operation x prompt, all ``N`` prompts, in that nesting order; the
published column names of ``intervention_data/{model}_{task}.parquet``):

``model_name, prompt_id, edge`` (``str((repr(u), repr(v), key))``), ``logit_diff`` (task metric of the
clean run), ``logit_diff_interv`` (after the operation), ``norm_ratio`` and ``cosine_similarity`` of
the downstream head's normalized input at the intervened position (``||x +/- r|| / ||x||`` and
``cos(x +/- r, x)``), ``intervention_type`` (``"local"``), ``intervention_type_name`` (``Local (SVs)``
/ ``Local (Random)``), ``is_boosting, is_random``, ``edge_weight`` (the combined graph's weight),
``scores_dest_src_downstream_ah`` / ``..._interv`` (the downstream head's attention probability
``A[d, s]`` before / after), ``is_ablated`` (the edge appeared in the prompt), ``scores_dest_src_diff_metric``
(after - before), ``logit_diff_metric`` (``(after - before) / before``), ``operation_performed``,
``edge_labeled`` (``u -> v``), ``edge_labeled_group`` (the edge's description, or
``(u labels) -> (v labels)`` numbered `` (k)`` when several chosen edges share it, as published); then
ours: ``edge_type`` (``d``/``s``), ``n_terms`` and ``terms`` (the singular terms used). Rows of
prompts where the edge does not appear are clean (after = before, ratio 1); their attention and input
columns are measured at the edge's labels when the prompt has them (NaN otherwise, possible with
token labels only).

**Sign.** ``logit_diff`` uses the task's own metric and sign (``Task.metric``). For greater-than the
reference used the opposite sign (mean over ``<= YY`` minus mean over ``> YY``), so published gt
``logit_diff`` / ``logit_diff_interv`` are the negation of ours; ``logit_diff_metric`` (a ratio) and
the attention columns are unaffected.

Tensors in, a table out; no file I/O.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.core.edge_interventions import (
    EdgeSite,
    InterventionModel,
    LabelPositions,
    Removal,
    TaskMetric,
    TermsLookup,
    cached_runs,
    edge_sites,
    full_basis,
    head_space_delta,
    needed_hooks,
    removal_hooks,
    removal_vector,
    upstream_write,
)
from attncomm.core.node_ids import NodeId, format_node_id, is_root, parse_node_id
from attncomm.core.omega_factors import OmegaCache
from attncomm.core.user_error import AttncommError

log = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "OPERATIONS",
    "CleanRuns",
    "ExperimentEdge",
    "ExperimentEdgeError",
    "ExperimentResult",
    "ExperimentRun",
    "ExperimentUnit",
    "Operation",
    "clean_runs",
    "draw_random_terms",
    "edge_string",
    "experiment_records",
    "group_labels",
    "intervened_runs",
    "parse_experiment_edges",
    "plan_terms",
    "random_complement_terms",
    "run_experiments",
    "signed_removal",
    "summarize",
]

#: the published columns, in the published order, then ours
PUBLISHED_COLUMNS: tuple[str, ...] = (
    "model_name",
    "prompt_id",
    "edge",
    "logit_diff",
    "logit_diff_interv",
    "norm_ratio",
    "cosine_similarity",
    "intervention_type",
    "intervention_type_name",
    "is_boosting",
    "is_random",
    "edge_weight",
    "scores_dest_src_downstream_ah",
    "scores_dest_src_downstream_ah_interv",
    "is_ablated",
    "scores_dest_src_diff_metric",
    "logit_diff_metric",
    "operation_performed",
    "edge_labeled",
    "edge_labeled_group",
)
EXTRA_COLUMNS: tuple[str, ...] = ("edge_type", "n_terms", "terms")
COLUMNS: tuple[str, ...] = PUBLISHED_COLUMNS + EXTRA_COLUMNS

_FLOAT32 = (
    "logit_diff",
    "logit_diff_interv",
    "norm_ratio",
    "cosine_similarity",
    "scores_dest_src_downstream_ah",
    "scores_dest_src_downstream_ah_interv",
    "scores_dest_src_diff_metric",
    "logit_diff_metric",
)


class ExperimentEdgeError(AttncommError, ValueError):
    """A malformed ``experiments.edges`` entry (the message names it)."""


# ----------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Operation:
    """One of the four operations: remove (``boosting=False``) or boost, selected or random terms."""

    boosting: bool
    random: bool

    @property
    def sign(self) -> float:
        """``+1`` adds the signal to the head's input (boosting), ``-1`` removes it."""
        return 1.0 if self.boosting else -1.0

    @property
    def name(self) -> str:
        """The published ``operation_performed``: ``Removing (SVs)``, ``Boosting (Random)``, ..."""
        return f"{'Boosting' if self.boosting else 'Removing'} ({'Random' if self.random else 'SVs'})"

    @property
    def type_name(self) -> str:
        """The published ``intervention_type_name``: ``Local (SVs)`` or ``Local (Random)``."""
        return "Local (Random)" if self.random else "Local (SVs)"

    @property
    def slug(self) -> str:
        """A metric-key friendly name: ``remove_svs``, ``boost_random``, ..."""
        return f"{'boost' if self.boosting else 'remove'}_{'random' if self.random else 'svs'}"


#: the published loop order: boosting in (False, True), then random in (False, True)
OPERATIONS: tuple[Operation, ...] = tuple(Operation(b, r) for b in (False, True) for r in (False, True))


def random_complement_terms(selected: Sequence[int], rank: int, rng: np.random.RandomState) -> list[int]:
    """A random set of terms from the complement of ``selected`` in ``0..rank-1`` (one draw of ``rng``).

    Its size is ``len(selected)``, or the complement's size if that is smaller; drawn without
    replacement as ``rng.choice(complement, size, replace=False)`` with the complement in ascending
    order (the reference's draw, so the same generator state gives the same set).
    """
    chosen = {int(k) for k in selected}
    if any(not 0 <= k < rank for k in chosen):
        raise ValueError(f"selected terms {sorted(chosen)} out of range 0..{rank - 1}")
    complement = [i for i in range(rank) if i not in chosen]
    size = min(len(selected), len(complement))
    if size == 0:
        return []
    return [int(k) for k in rng.choice(complement, size, replace=False)]


# ----------------------------------------------------------------------------- edges


@dataclass(frozen=True)
class ExperimentEdge:
    """An edge chosen for the experiments: ``upstream -> downstream`` and an optional description."""

    upstream: NodeId
    downstream: NodeId
    description: str = ""

    @property
    def label(self) -> str:
        """The published ``edge_labeled``: ``(9, 'MLP', 'end', 'end') -> (10, 9, 'end', 'is')``."""
        return f"{format_node_id(self.upstream)} -> {format_node_id(self.downstream)}"

    @property
    def label_group(self) -> str:
        """``(dest, src) -> (dest, src)`` labels of both nodes, e.g. ``('end', 'end') -> ('end', 'is')``."""
        return f"{tuple(self.upstream[2:])!r} -> {tuple(self.downstream[2:])!r}"


def parse_experiment_edges(edges: Sequence[Sequence[Any]]) -> list[ExperimentEdge]:
    """``[[upstream_id, downstream_id(, description)], ...]`` to :class:`ExperimentEdge` s.

    Ids are published node-id strings (``"(7, 9, 'end', 'S2')"``), parsed without ``eval``; the
    downstream must be a head and neither end the root. A malformed entry raises
    :class:`ExperimentEdgeError` naming it.
    """
    out: list[ExperimentEdge] = []
    for i, entry in enumerate(edges):
        where = f"experiments.edges[{i}]"
        if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) not in (2, 3):
            raise ExperimentEdgeError(
                f"{where} = {entry!r}: expected [upstream_id, downstream_id] or "
                "[upstream_id, downstream_id, description], e.g. "
                "[\"(7, 9, 'end', 'S2')\", \"(9, 9, 'end', 'IO')\", 'S-Inhibition -> Name Mover']"
            )
        ids = []
        for part, text in zip(("upstream", "downstream"), entry[:2], strict=True):
            try:
                node = parse_node_id(text, where=f"{where} {part}")
            except AttncommError as exc:
                raise ExperimentEdgeError(f"{where} = {list(entry)!r}: {exc}") from None
            if is_root(node):
                raise ExperimentEdgeError(
                    f"{where} = {list(entry)!r}: the {part} node {text!r} is the root; experiments act on "
                    "edges between components"
                )
            ids.append(node)
        if not isinstance(ids[1][1], int):
            raise ExperimentEdgeError(
                f"{where} = {list(entry)!r}: the downstream node {entry[1]!r} must be an attention head"
            )
        description = "" if len(entry) < 3 or entry[2] is None else str(entry[2])
        out.append(ExperimentEdge(ids[0], ids[1], description))
    return out


def group_labels(edges: Sequence[ExperimentEdge]) -> list[str]:
    """The published ``edge_labeled_group`` of each edge.

    The description when there is one (IOI: ``S-Inhibition Head -> Name Mover Head``); otherwise the
    labels of both nodes, with `` (k)`` appended (k = 1, 2, ... in order) when several chosen edges
    share the same labels (gp: ``('end', 'end') -> ('end', 'is') (1)``).
    """
    plain = [e.label_group if not e.description else None for e in edges]
    counts = Counter(p for p in plain if p is not None)
    seen: Counter[str] = Counter()
    out = []
    for e, p in zip(edges, plain, strict=True):
        if p is None:
            out.append(e.description)
        elif counts[p] > 1:
            seen[p] += 1
            out.append(f"{p} ({seen[p]})")
        else:
            out.append(p)
    return out


def edge_string(u: NodeId, v: NodeId, key: Any) -> str:
    """The published ``edge`` column: ``str((repr(u), repr(v), key))``."""
    return str((format_node_id(u), format_node_id(v), int(key)))


# ----------------------------------------------------------------------------- one site


def signed_removal(
    write: Float[Tensor, " d_model"],
    basis: Float[Tensor, "d_model n_terms"],
    scale: float | Tensor,
    *,
    center: bool,
    model: InterventionModel,
    layer: int,
    head: int,
    side: str,
    position: int,
    sign: float,
) -> tuple[Float[Tensor, " d_model"], Removal]:
    """The change ``sign * r`` of head ``(layer, head)``'s normalized input at ``position`` and its
    :class:`Removal` (head-space change already signed: apply with ``removal_hooks(..., sign=1.0)``).

    ``r = (P y - mean(P y)) / scale`` with ``P = basis basis^T`` (:func:`removal_vector`); ``sign=-1``
    removes, ``+1`` boosts. An empty ``basis`` gives a zero change.
    """
    vec = removal_vector(write, basis, scale, center=center) * sign
    return vec, Removal(layer, head, side, position, head_space_delta(vec, model, layer, head, side))


# ----------------------------------------------------------------------------- the experiment


@dataclass
class ExperimentUnit:
    """One (edge, key) of the graph chosen for the experiments, with its per-prompt sites."""

    index: int  # position in the chosen-edge list
    edge: ExperimentEdge
    group: str
    key: int
    side: str
    weight: float
    sites: dict[int, EdgeSite]  # prompt -> site
    selected: dict[int, list[int]] = field(default_factory=dict)  # prompt -> selected terms
    ranks: dict[int, int] = field(default_factory=dict)  # prompt -> singular triplets kept
    # (op index, prompt) -> terms used (selected or random)
    used: dict[tuple[int, int], list[int]] = field(default_factory=dict)


@dataclass
class ExperimentResult:
    """The experiment table and which chosen edges were found in the graph."""

    table: pd.DataFrame
    edges: list[ExperimentEdge]
    groups: list[str]
    #: per chosen edge: the multigraph keys it matched (empty: not in the graph)
    keys: list[list[int]]

    @property
    def missing(self) -> list[ExperimentEdge]:
        return [e for e, k in zip(self.edges, self.keys, strict=True) if not k]


def draw_random_terms(
    selected: Sequence[Mapping[int, Sequence[int]]],
    ranks: Sequence[Mapping[int, int]],
    rng: np.random.RandomState,
) -> list[dict[tuple[int, int], list[int]]]:
    """The random sets of every (edge, operation, prompt), drawn in the documented order.

    ``selected[e][p]`` are the selected terms of edge ``e`` in prompt ``p`` (only prompts where the
    edge appeared), ``ranks[e][p]`` the number of singular triplets of its downstream Omega. For each
    edge, each operation of :data:`OPERATIONS`, each prompt (ascending) with non-empty selected terms,
    one :func:`random_complement_terms` draw. Returns ``out[e][(op_index, p)]`` for the random
    operations only (the other draws are consumed and dropped).
    """
    out: list[dict[tuple[int, int], list[int]]] = []
    for sel, rank in zip(selected, ranks, strict=True):
        draws: dict[tuple[int, int], list[int]] = {}
        for i, op in enumerate(OPERATIONS):
            for p in sorted(sel):
                if not len(sel[p]):
                    continue
                terms = random_complement_terms(sel[p], rank[p], rng)
                if op.random:
                    draws[(i, p)] = terms
        out.append(draws)
    return out


def _resolve_units(
    G: nx.MultiDiGraph,
    edges: Sequence[ExperimentEdge],
    groups: Sequence[str],
    positions: LabelPositions,
    graph_name: str,
) -> tuple[list[ExperimentUnit], list[list[int]]]:
    units: list[ExperimentUnit] = []
    keys_found: list[list[int]] = []
    for i, e in enumerate(edges):
        u, v = e.upstream, e.downstream
        keys = sorted(G[u][v]) if G.has_node(u) and G.has_node(v) and G.has_edge(u, v) else []
        keys_found.append([int(k) for k in keys])
        if not keys:
            why = (
                "neither node is in it"
                if not G.has_node(u) and not G.has_node(v)
                else f"node {format_node_id(u if not G.has_node(u) else v)} is not in it"
                if not (G.has_node(u) and G.has_node(v))
                else "both nodes are in it, but not this edge"
            )
            log.warning(
                "experiments: edge %s is not in %s (%s): 0 rows; choose an edge of that graph (or lower "
                "the combined-graph threshold)",
                e.label,
                graph_name or "the graph",
                why,
            )
            continue
        for key in keys:
            data = G.edges[u, v, key]
            sub = nx.MultiDiGraph()
            sub.add_edge(u, v, key=key, **data)
            (work,) = edge_sites(sub, positions)
            units.append(
                ExperimentUnit(
                    index=i,
                    edge=e,
                    group=groups[i],
                    key=int(key),
                    side=work.side,
                    weight=float(data.get("weight", float("nan"))),
                    sites={s.prompt: s for s in work.sites},
                )
            )
    return units, keys_found


def _capture(store: dict[int, Tensor], layer: int) -> Callable[[Tensor, Any], None]:
    """A hook keeping its tensor (the attention pattern of ``layer``) in ``store[layer]``."""

    def keep(tensor: Tensor, hook: Any) -> None:
        store[layer] = tensor.detach()

    return keep


def _downstream_positions(unit: ExperimentUnit, positions: Mapping[str, int]) -> tuple[int, int, int] | None:
    """``(d, s, intervened position)`` of the unit's downstream head in one prompt (None: labels absent)."""
    v = unit.edge.downstream
    if v[2] not in positions or v[3] not in positions:
        return None
    d, s = int(positions[v[2]]), int(positions[v[3]])
    return d, s, d if unit.side == "d" else s


@dataclass
class ExperimentRun:
    """The model side of one experiment call, shared by its phases.

    ``tokens[p]`` prompt ``p``'s tokens (all ``N = len(tokens)`` prompts get rows); ``metric(logits,
    prompt_ids)`` the task metric; ``positions[p]`` label -> position; ``batch_size`` rows per forward
    pass; ``memo`` the full singular bases per ``(layer, head, delta, side)`` (see
    :func:`~attncomm.core.edge_interventions.full_basis`).
    """

    model: InterventionModel
    tokens: Int[Tensor, "batch pos"]
    metric: TaskMetric
    positions: LabelPositions
    omega: OmegaCache
    batch_size: int = 16
    progress: bool = True
    memo: dict[tuple[int, int, int, str], Tensor] = field(default_factory=dict)

    @property
    def n_prompts(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def center(self) -> bool:
        """Whether removal vectors are centred over ``d_model`` (LayerNorm models, not RMSNorm)."""
        return self.model.arch.normalization != "RMS"


@dataclass
class CleanRuns:
    """Phase 2's measurements: per prompt the clean metric, per (unit, prompt) the downstream attention
    ``A[d, s]`` and head input ``x`` at the intervened position, per (unit, op, prompt) the signed removal."""

    before: np.ndarray  # [prompt]
    attn_before: np.ndarray  # [unit, prompt]
    x_clean: dict[tuple[int, int], Tensor]
    removals: dict[tuple[int, int, int], tuple[Tensor, Removal]]


def plan_terms(units: Sequence[ExperimentUnit], terms: TermsLookup, run: ExperimentRun, seed: int) -> None:
    """Phase 1: each unit's selected terms and ranks per prompt (no activations needed), then every
    random draw in the documented order, and the terms each (operation, prompt) uses (``unit.used``)."""
    for unit in units:
        for p, site in sorted(unit.sites.items()):
            _, layer, head, d, s = site.firing
            unit.selected[p] = [int(k) for k in terms(site.firing, site.side)]
            unit.ranks[p] = int(full_basis(run.omega, layer, head, d - s, site.side, run.memo).shape[1])
    rng = np.random.RandomState(seed)
    draws = draw_random_terms([u.selected for u in units], [u.ranks for u in units], rng)
    for unit, drawn in zip(units, draws, strict=True):
        for i, op in enumerate(OPERATIONS):
            for p, sel in unit.selected.items():
                if sel:
                    unit.used[(i, p)] = drawn[(i, p)] if op.random else sel


def clean_runs(units: Sequence[ExperimentUnit], run: ExperimentRun) -> CleanRuns:
    """Phase 2: clean runs over all prompts: metric, ``A[d, s]``, head input ``x``, every signed removal."""
    model, n_prompts, batch_size = run.model, run.n_prompts, run.batch_size
    names = needed_hooks(model) + sorted({model.ln1_normalized(u.edge.downstream[0]) for u in units})
    before = np.full(n_prompts, np.nan)
    attn_before = np.full((len(units), n_prompts), np.nan)
    x_clean: dict[tuple[int, int], Tensor] = {}  # (unit, prompt) -> x at the intervened position
    removals: dict[tuple[int, int, int], tuple[Tensor, Removal]] = {}  # (unit, op, prompt)
    for ids, logits, cache in cached_runs(
        model,
        run.tokens,
        range(n_prompts),
        names,
        batch_size,
        desc="experiments: clean runs",
        progress=run.progress,
    ):
        before[ids] = run.metric(logits, ids).detach().to("cpu", torch.float64).numpy()
        for j, unit in enumerate(units):
            layer, head = int(unit.edge.downstream[0]), int(unit.edge.downstream[1])
            for row, p in enumerate(ids):
                where = _downstream_positions(unit, run.positions[p])
                if where is None:
                    continue
                d, s, pos = where
                attn_before[j, p] = float(cache[model.pattern(layer)][row, head, d, s])
                x_clean[(j, p)] = cache[model.ln1_normalized(layer)][row, pos].detach().clone()
                site = unit.sites.get(p)
                if site is None or not unit.selected.get(p):
                    continue
                up_layer, component = int(site.upstream[0]), site.upstream[1]
                write = upstream_write(cache, model, up_layer, component, site.t, site.t_src, row)
                full = full_basis(run.omega, layer, head, d - s, unit.side, run.memo).to(write.device)
                scale = cache[model.ln1_scale(layer)][row, pos, 0].to(full.dtype)
                for i, op in enumerate(OPERATIONS):
                    used = unit.used[(i, p)]
                    basis = full[:, torch.as_tensor(used, dtype=torch.long, device=full.device)]
                    removals[(j, i, p)] = signed_removal(
                        write,
                        basis,
                        scale,
                        center=run.center,
                        model=model,
                        layer=layer,
                        head=head,
                        side=unit.side,
                        position=pos,
                        sign=op.sign,
                    )
        del cache
    return CleanRuns(before, attn_before, x_clean, removals)


def intervened_runs(
    units: Sequence[ExperimentUnit], run: ExperimentRun, clean: CleanRuns
) -> tuple[dict[tuple[int, int, int], float], dict[tuple[int, int, int], float]]:
    """Phase 3: intervened runs, one (unit, operation, prompt) per batch row; the metric and the
    downstream ``A[d, s]`` after, keyed by ``(unit, op, prompt)``."""
    model, batch_size = run.model, run.batch_size
    flat = sorted(clean.removals)
    after: dict[tuple[int, int, int], float] = {}
    attn_after: dict[tuple[int, int, int], float] = {}
    with tqdm(
        total=len(units) * len(OPERATIONS),
        desc="experiments",
        unit="edge x op",
        disable=None if run.progress else True,
    ) as bar:
        left = Counter((j, i) for j, i, _ in flat)
        bar.update(len(units) * len(OPERATIONS) - len(left))
        for start in range(0, len(flat), batch_size):
            rows = flat[start : start + batch_size]
            ids = [p for _, _, p in rows]
            hooks = removal_hooks(model, [clean.removals[r][1] for r in rows], sign=1.0)
            captured: dict[int, Tensor] = {}
            for layer in sorted({int(units[j].edge.downstream[0]) for j, _, _ in rows}):
                hooks.append((model.pattern(layer), _capture(captured, layer)))
            logits = model.run_with_hooks(run.tokens[ids], hooks)
            values = run.metric(logits, ids).detach().to("cpu", torch.float64).tolist()
            for b, (r, value) in enumerate(zip(rows, values, strict=True)):
                j, _, p = r
                unit = units[j]
                d, s, _ = _downstream_positions(unit, run.positions[p])  # type: ignore[misc]
                after[r] = float(value)
                attn_after[r] = float(
                    captured[int(unit.edge.downstream[0])][b, int(unit.edge.downstream[1]), d, s]
                )
                left[(j, r[1])] -= 1
                if left[(j, r[1])] == 0:
                    bar.update(1)
    return after, attn_after


def experiment_records(
    units: Sequence[ExperimentUnit],
    n_prompts: int,
    clean: CleanRuns,
    after: Mapping[tuple[int, int, int], float],
    attn_after: Mapping[tuple[int, int, int], float],
    model_name: str,
) -> list[dict[str, Any]]:
    """Phase 4: the table's rows, edge x operation x prompt, all prompts (module docstring)."""
    records: list[dict[str, Any]] = []
    for j, unit in enumerate(units):
        u, v = unit.edge.upstream, unit.edge.downstream
        estr = edge_string(u, v, unit.key)
        for i, op in enumerate(OPERATIONS):
            for p in range(n_prompts):
                r = (j, i, p)
                ablated = r in clean.removals
                x = clean.x_clean.get((j, p))
                if x is not None:
                    xa = x + clean.removals[r][0].to(x.dtype) if ablated else x.clone()
                    norm_ratio = float(torch.linalg.vector_norm(xa) / torch.linalg.vector_norm(x))
                    cos = float(F.cosine_similarity(xa, x, dim=0))
                else:
                    norm_ratio = cos = float("nan")
                ld0 = float(clean.before[p])
                ld1 = after[r] if ablated else ld0
                a0 = float(clean.attn_before[j, p])
                a1 = attn_after[r] if ablated else a0
                used = unit.used.get((i, p), []) if ablated else []
                records.append(
                    {
                        "model_name": model_name,
                        "prompt_id": p,
                        "edge": estr,
                        "logit_diff": ld0,
                        "logit_diff_interv": ld1,
                        "norm_ratio": norm_ratio,
                        "cosine_similarity": cos,
                        "intervention_type": "local",
                        "intervention_type_name": op.type_name,
                        "is_boosting": op.boosting,
                        "is_random": op.random,
                        "edge_weight": unit.weight,
                        "scores_dest_src_downstream_ah": a0,
                        "scores_dest_src_downstream_ah_interv": a1,
                        "is_ablated": ablated,
                        "scores_dest_src_diff_metric": a1 - a0,
                        "logit_diff_metric": (ld1 - ld0) / ld0 + 0.0 if ld0 != 0 else float("nan"),
                        "operation_performed": op.name,
                        "edge_labeled": unit.edge.label,
                        "edge_labeled_group": unit.group,
                        "edge_type": unit.side,
                        "n_terms": len(used),
                        "terms": list(used),
                    }
                )
    return records


def run_experiments(
    G: nx.MultiDiGraph,
    edges: Sequence[ExperimentEdge],
    model: InterventionModel,
    tokens: Int[Tensor, "batch pos"],
    metric: TaskMetric,
    positions: LabelPositions,
    terms: TermsLookup,
    omega: OmegaCache,
    *,
    seed: int = 0,
    model_name: str = "",
    batch_size: int = 16,
    graph_name: str = "",
    progress: bool = True,
) -> ExperimentResult:
    """The four operations on each chosen edge in every prompt it appeared in; the table of all prompts.

    ``G`` is the combined graph (published: threshold 0.7); ``tokens[p]`` prompt ``p``'s tokens (all
    ``N = len(tokens)`` prompts get rows); ``metric(logits, prompt_ids)`` the task metric;
    ``positions[p]`` label -> position; ``terms(firing, side)`` the firing's selected terms; ``seed``
    the one random generator's seed (draw order in the module docstring). An edge not in ``G`` is
    logged as a warning and gets no rows. The four phases: :func:`plan_terms`, :func:`clean_runs`,
    :func:`intervened_runs`, :func:`experiment_records`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    run = ExperimentRun(model, tokens, metric, positions, omega, batch_size=batch_size, progress=progress)
    groups = group_labels(edges)
    units, keys_found = _resolve_units(G, edges, groups, positions, graph_name)
    plan_terms(units, terms, run, seed)
    log.info(
        "experiments: %d chosen edges (%d found as %d graph edges), %d (edge, operation, prompt) "
        "interventions over %d prompts, seed %d",
        len(edges),
        sum(1 for k in keys_found if k),
        len(units),
        sum(len(u.used) for u in units),
        run.n_prompts,
        seed,
    )
    clean = clean_runs(units, run)
    after, attn_after = intervened_runs(units, run, clean)
    records = experiment_records(units, run.n_prompts, clean, after, attn_after, model_name)
    return ExperimentResult(_frame(records), list(edges), groups, keys_found)


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The table with the published dtypes (float32 measurements, float64 weight, int64 prompt ids)."""
    df = pd.DataFrame(records, columns=list(COLUMNS))
    types: dict[str, Any] = dict.fromkeys(_FLOAT32, np.float32)
    types |= {
        "prompt_id": np.int64,
        "edge_weight": np.float64,
        "is_boosting": bool,
        "is_random": bool,
        "is_ablated": bool,
        "n_terms": np.int64,
    }
    for name in (
        "model_name",
        "edge",
        "intervention_type",
        "intervention_type_name",
        "operation_performed",
        "edge_labeled",
        "edge_labeled_group",
        "edge_type",
    ):
        types[name] = str
    df = df.astype(types)
    if not len(df):
        df["terms"] = pd.Series([], dtype=object)
    return df


def summarize(result: ExperimentResult) -> pd.DataFrame:
    """One row per chosen edge and operation: rows, ablated prompts, means over the ablated prompts of
    ``logit_diff_metric``, the absolute logit-diff change, ``A[d, s]`` before/after and its change,
    ``norm_ratio`` and ``cosine_similarity``. A chosen edge that is not in the graph gets rows 0."""
    df = result.table
    out: list[dict[str, Any]] = []
    for i, (e, group, keys) in enumerate(zip(result.edges, result.groups, result.keys, strict=True)):
        for op in OPERATIONS:
            rows = df[
                (df["edge_labeled"] == e.label)
                & (df["is_boosting"] == op.boosting)
                & (df["is_random"] == op.random)
            ]
            abl = rows[rows["is_ablated"]]
            change = pd.DataFrame(
                {"logit_diff_change": abl["logit_diff_interv"].astype(np.float64) - abl["logit_diff"]}
            )

            def mean(col: str, frame: pd.DataFrame = abl) -> float:
                return float(frame[col].astype(np.float64).mean()) if len(frame) else float("nan")

            out.append(
                {
                    "edge_index": i,
                    "edge_labeled": e.label,
                    "edge_labeled_group": group,
                    "in_graph": bool(keys),
                    "operation_performed": op.name,
                    "operation": op.slug,
                    "rows": len(rows),
                    "ablated": len(abl),
                    "mean_logit_diff_metric": mean("logit_diff_metric"),
                    "mean_logit_diff_change": mean("logit_diff_change", change),
                    "mean_attention_before": mean("scores_dest_src_downstream_ah"),
                    "mean_attention_after": mean("scores_dest_src_downstream_ah_interv"),
                    "mean_attention_change": mean("scores_dest_src_diff_metric"),
                    "mean_norm_ratio": mean("norm_ratio"),
                    "mean_cosine_similarity": mean("cosine_similarity"),
                }
            )
    return pd.DataFrame(out)
