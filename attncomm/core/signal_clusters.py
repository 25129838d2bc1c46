"""Control signals (section 9 of docs/METHOD.md): source signals of strong firings, clustered.

For a firing ``(l, h, d, s)`` whose source side is traceable (source-side ``sum(c) > 0``), the
**source signal** is ``P_V x_s`` normalized, with ``P_V = V_S V_S^T`` over the firing's selected
source terms (``V`` of ``Omega_s`` at offset ``d - s``) and ``x_s = blocks.{l}.ln1.hook_normalized[s]``.
``Omega_s = [W_Q ; b_Q] R W_K^T`` is ``(D+1) x D``: the bias augmentation is on the query side, so its
right singular vectors ``V = Q_b V_c`` live in ``d_model`` space (``Q_b`` from the QR of ``W_K``) and
``P_V`` applies to ``x_s`` itself, not to ``[x_s, 1]``. :func:`layer_source_signals` computes the
signals of every firing of one layer that passes the filters (``A >= min_attention``, ``d >=
min_dest``), reusing the tracer's own decomposition (:func:`~attncomm.core.decompose.layer_inputs`,
:func:`~attncomm.core.decompose.decompose_firings`, :func:`~attncomm.core.decompose.selection_mask`),
so its selected source terms are the tracer's for every firing both see.

The analysis of the signals (pure numpy/scipy):

* :func:`cluster_signals` -- average-linkage hierarchical clustering on cosine distance
  (``scipy.cluster.hierarchy.linkage(pdist(X, "cosine"), "average")``), flat clusters by
  ``fcluster(..., t=cut, criterion="distance")``;
* :func:`dominant_cluster` -- the largest cluster (ties: the smallest cluster label);
* :func:`prototype` -- the member with the least mean cosine distance to the members, its own
  (zero) distance included (ties: the first member);
* :func:`sink_mask` -- sink firings: source at position 0 or, when ``punct`` is given (rotary models),
  at a punctuation position (:func:`is_punctuation`, :data:`PUNCTUATION`);
* :func:`mean_pairwise_distance` / :func:`head_control` -- a head is *controlled* if its sink
  signals have mean pairwise cosine distance (distinct pairs) ``< max_distance``;
* :func:`analyse_signals` -- all of the above on a table of firings and their signals: the firings,
  clusters and per-head tables and the summary of the ``control_signals`` stage.

Choices where the method is silent: a head with fewer than two sink signals has no pairwise
distance (NaN) and is not controlled; a firing whose signal is exactly zero (no projection of
``x_s`` on its selected terms) has no direction and is dropped before clustering (counted).
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from torch import Tensor

from attncomm.core.decompose import decompose_firings, layer_inputs, selection_mask
from attncomm.core.omega_factors import OmegaCache
from attncomm.core.term_statistics import head_grid

logger = logging.getLogger(__name__)

__all__ = [
    "GPT2_CUT",
    "SIGNAL_COLUMNS",
    "TOKEN_COLUMNS",
    "Analysis",
    "analyse_signals",
    "PUNCTUATION",
    "ROTARY_CUT",
    "LayerSignals",
    "candidate_firings",
    "cluster_signals",
    "default_cut",
    "dominant_cluster",
    "head_control",
    "is_punctuation",
    "layer_source_signals",
    "mean_pairwise_distance",
    "normalize_rows",
    "prototype",
    "sink_mask",
]

#: published clustering cuts (section 9): GPT-2 (learned positions) and rotary models (Pythia, Gemma)
GPT2_CUT = 0.97
ROTARY_CUT = 0.99

#: a token is punctuation when its decoded text, stripped of whitespace, is one of these: the ASCII
#: punctuation characters one by one, plus the few multi-character punctuation tokens common in
#: BPE vocabularies (ellipsis, dashes, quote/punctuation pairs)
PUNCTUATION: frozenset[str] = frozenset(string.punctuation) | frozenset(
    {"...", "..", "--", "---", "\u2026", "\u2013", "\u2014", "\u2018", "\u2019", "\u201c", "\u201d",
     '."', ',"', ".'", ",'", '?"', '!"', ").", "),", ");", ":)", ";", "?!", "!!", "??"}
)  # fmt: skip


def default_cut(rotary: bool) -> float:
    """The published cut: 0.99 for rotary models (Pythia, Gemma), 0.97 otherwise (GPT-2)."""
    return ROTARY_CUT if rotary else GPT2_CUT


def is_punctuation(text: str) -> bool:
    """Whether a decoded token is punctuation: ``text.strip()`` is in :data:`PUNCTUATION`."""
    return text.strip() in PUNCTUATION


# ----------------------------------------------------------------------------- signals


def candidate_firings(
    pattern: Float[Tensor, "head_index dest src"],
    min_attention: float,
    min_dest: int,
) -> tuple[Int[Tensor, " firing"], Int[Tensor, " firing"], Int[Tensor, " firing"]]:
    """Every ``(h, d, s)`` with ``s <= d``, ``d >= min_dest`` and ``A[h, d, s] >= min_attention``.

    Sorted by head, dest, source. ``pattern`` covers positions ``0..end`` of one prompt.
    """
    n = pattern.shape[-1]
    causal = torch.tril(torch.ones((n, n), dtype=torch.bool))
    dest_ok = (torch.arange(n) >= min_dest)[:, None]
    ok = (pattern >= min_attention) & causal[None] & dest_ok[None]
    h, d, s = torch.nonzero(ok, as_tuple=True)
    return h, d, s


@dataclass
class LayerSignals:
    """Source signals of the firings of one layer (one prompt) that pass the filters.

    ``n_terms`` counts the selected source terms (0: source side not traceable); ``signal`` is the
    unnormalized ``P_V x_s`` (zero where ``n_terms == 0``).
    """

    heads: Int[Tensor, " firing"]
    dests: Int[Tensor, " firing"]
    srcs: Int[Tensor, " firing"]
    attention: Float[Tensor, " firing"]
    n_terms: Int[Tensor, " firing"]
    src_terms: list[Int[Tensor, " selected"]]
    signal: Float[Tensor, "firing d_model"]

    @property
    def traceable(self) -> Bool[Tensor, " firing"]:
        return self.n_terms > 0


def layer_source_signals(
    x: Float[Tensor, "pos d_model"],
    pattern: Float[Tensor, "head_index pos pos"],
    cache: OmegaCache,
    layer: int,
    *,
    min_attention: float = 0.4,
    min_dest: int = 2,
    cos: Float[Tensor, "pos rotary_dim"] | None = None,
    sin: Float[Tensor, "pos rotary_dim"] | None = None,
    adjacent: bool = False,
    selection_dtype: torch.dtype = torch.float32,
) -> LayerSignals:
    """Decompose every firing of ``layer`` passing the filters and compute its source signal ``P_V x_s``.

    ``x`` is ``ln1.hook_normalized`` of the layer and ``pattern`` its ``hook_pattern``, both for
    positions ``0..end`` of one prompt. Term selection is the tracer's (section 2, in
    ``selection_dtype``).
    """
    heads, dests, srcs = candidate_firings(pattern, min_attention, min_dest)
    D = x.shape[-1]
    F = int(heads.numel())
    if F == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return LayerSignals(
            empty, empty, empty, torch.zeros(0, dtype=x.dtype), empty, [], x.new_zeros((0, D))
        )
    inp = layer_inputs(
        x,
        cache.W_Q[layer].to(x.dtype),
        cache.W_K[layer].to(x.dtype),
        None if cache.b_Q is None else cache.b_Q[layer].to(x.dtype),
        None if cache.b_K is None else cache.b_K[layer].to(x.dtype),
        cache.qr(layer, "d"),
        cache.qr(layer, "s"),
        cos,
        sin,
        adjacent=adjacent,
    )
    Q_b = inp.qr_s.Q_b
    if Q_b.shape[1] != D:  # V of Omega_s must live in d_model space (the augmentation is on the query side)
        raise ValueError(f"Omega_s right factor has {Q_b.shape[1]} rows, expected d_model={D}")
    dec = decompose_firings(inp, cache, layer, heads, dests, srcs)
    mask, terms = selection_mask(dec.c_src, dtype=selection_dtype)
    V_c = dec.svd_s.V_c.to(x.dtype)  # [F, r, r]
    coords = torch.einsum("fik,fi->fk", V_c, inp.xQ_s[heads, srcs])  # v_k . x_s
    small = torch.einsum("fik,fk->fi", V_c, coords * mask.to(x.dtype))  # V_S V_S^T in compact coords
    signal = x.new_zeros((F, D))
    for h in torch.unique(heads).tolist():  # lift to d_model head by head: V = Q_b V_c
        idx = torch.nonzero(heads == h).flatten()
        signal[idx] = small[idx] @ Q_b[h].T
    return LayerSignals(
        heads=heads,
        dests=dests,
        srcs=srcs,
        attention=pattern[heads, dests, srcs],
        n_terms=mask.sum(dim=1),
        src_terms=terms,
        signal=signal,
    )


# ----------------------------------------------------------------------------- analysis


def normalize_rows(X: Float[np.ndarray, "n dim"]) -> Float[np.ndarray, "n dim"]:
    """Rows scaled to unit norm (float64); a zero row raises (it has no direction)."""
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("normalize_rows: a zero vector has no direction")
    return X / norms


def cluster_signals(signals: Float[np.ndarray, "n dim"], cut: float) -> Int[np.ndarray, " n"]:
    """Flat cluster labels (1-based) of average-linkage clustering on cosine distance, cut at ``cut``."""
    X = np.asarray(signals, dtype=np.float64)
    n = X.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.ones(1, dtype=np.int64)
    dist = np.clip(pdist(X, metric="cosine"), 0.0, 2.0)  # float noise can make a distance -1e-16
    Z = linkage(dist, method="average")
    return fcluster(Z, t=cut, criterion="distance").astype(np.int64)


def dominant_cluster(labels: Int[np.ndarray, " n"]) -> int:
    """The label of the largest cluster (ties: the smallest label)."""
    if len(labels) == 0:
        raise ValueError("dominant_cluster: no labels")
    values, counts = np.unique(labels, return_counts=True)
    return int(values[np.argmax(counts)])  # argmax takes the first maximum; values are sorted


def prototype(unit: Float[np.ndarray, "m dim"]) -> tuple[int, float]:
    """Index of the member with the least mean cosine distance to all members (self included) and that mean.

    ``unit`` rows are unit vectors, so the mean distance of member ``i`` is ``1 - u_i . mean(u)``.
    """
    unit = np.asarray(unit, dtype=np.float64)
    if unit.shape[0] == 0:
        raise ValueError("prototype: empty cluster")
    mean_dist = 1.0 - unit @ unit.mean(axis=0)
    i = int(np.argmin(mean_dist))
    return i, float(mean_dist[i])


def mean_pairwise_distance(unit: Float[np.ndarray, "m dim"]) -> float:
    """Mean cosine distance over distinct pairs of unit vectors (NaN with fewer than two)."""
    unit = np.asarray(unit, dtype=np.float64)
    m = unit.shape[0]
    if m < 2:
        return float("nan")
    total = unit.sum(axis=0)
    sum_off_diag = float(total @ total) - float(np.einsum("ij,ij->", unit, unit))
    return 1.0 - sum_off_diag / (m * (m - 1))


def sink_mask(
    srcs: Int[np.ndarray, " n"],
    punct: Bool[np.ndarray, " n"] | None = None,
) -> Bool[np.ndarray, " n"]:
    """Sink firings: source position 0, or (rotary models, ``punct`` given) a punctuation source."""
    srcs = np.asarray(srcs)
    sink = srcs == 0
    if punct is not None:
        sink = sink | np.asarray(punct, dtype=bool)
    return sink


def head_control(
    layers: Int[np.ndarray, " n"],
    heads: Int[np.ndarray, " n"],
    unit: Float[np.ndarray, "n dim"],
    sink: Bool[np.ndarray, " n"],
    max_distance: float = 0.5,
) -> dict[tuple[int, int], tuple[int, float, bool]]:
    """Per head seen: ``(n_sink, mean pairwise cosine distance of its sink signals, controlled)``.

    A head is controlled if that mean distance is ``< max_distance`` (NaN, i.e. fewer than two sink
    signals, is not controlled).
    """
    layers, heads, sink = np.asarray(layers), np.asarray(heads), np.asarray(sink, dtype=bool)
    out: dict[tuple[int, int], tuple[int, float, bool]] = {}
    for layer, head in sorted(set(zip(layers.tolist(), heads.tolist(), strict=True))):
        sel = (layers == layer) & (heads == head) & sink
        dist = mean_pairwise_distance(unit[sel])
        out[(int(layer), int(head))] = (int(sel.sum()), dist, bool(dist < max_distance))
    return out


# ----------------------------------------------------------------------------- the analysis

#: columns of a firing table (one row per firing passing the filters) that the analysis reads
SIGNAL_COLUMNS: tuple[str, ...] = ("prompt", "layer", "head", "dest", "src", "attention", "n_terms")
#: the source token's text and whether it is punctuation (carried into the firings table when present)
TOKEN_COLUMNS: tuple[str, ...] = ("src_token", "is_punct")


@dataclass
class Analysis:
    """The tables of the analysis (see the module docstring) and the prototype's row in ``firings``."""

    firings: pd.DataFrame
    clusters: pd.DataFrame
    heads: pd.DataFrame
    summary: dict[str, Any]
    prototype_row: int | None


def analyse_signals(
    table: pd.DataFrame,
    signals: np.ndarray,
    *,
    rotary: bool,
    cut: float,
    controlled_max_distance: float = 0.5,
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> Analysis:
    """Cluster the signals of the traceable firings of ``table`` and build the output tables.

    ``table`` needs :data:`SIGNAL_COLUMNS` (and ``is_punct`` when ``rotary``; :data:`TOKEN_COLUMNS`
    are carried when present);
    ``signals[i]`` belongs to row ``i``. Rows with ``n_terms == 0`` (untraceable source side) or a zero
    signal are left out.
    """
    signals = np.asarray(signals, dtype=np.float64)
    if len(table) != len(signals):
        raise ValueError(f"{len(table)} firings but {len(signals)} signals")
    norms = np.linalg.norm(signals, axis=1) if len(signals) else np.zeros(0)
    traceable = table["n_terms"].to_numpy() > 0
    keep = traceable & (norms > 0)
    n_zero = int((traceable & ~keep).sum())
    if n_zero:
        logger.warning("control signals: %d traceable firings have a zero source signal; left out", n_zero)
    df = table[keep].reset_index(drop=True).copy()
    unit = normalize_rows(signals[keep]) if keep.any() else np.zeros((0, signals.shape[1]))
    punct = df["is_punct"].to_numpy(dtype=bool) if rotary else None
    sink = sink_mask(df["src"].to_numpy(), punct)
    labels = cluster_signals(unit, cut)
    df["cluster"] = labels
    df["is_sink"] = sink
    summary: dict[str, Any] = {
        "n_firings_filtered": len(table),
        "n_untraceable": int((~traceable).sum()),
        "n_zero_signal": n_zero,
        "n_firings": len(df),
        "n_sink": int(sink.sum()),
        "cut": float(cut),
        "n_clusters": int(len(np.unique(labels))),
    }
    proto_row: int | None = None
    if len(df):
        dom = dominant_cluster(labels)
        members = np.flatnonzero(labels == dom)
        j, mean_dist = prototype(unit[members])
        proto_row = int(members[j])
        ip = unit @ unit[proto_row]
        df["in_dominant"] = labels == dom
        df["ip_with_prototype"] = ip
        p = df.iloc[proto_row]
        summary |= {
            "dominant_cluster": dom,
            "dominant_size": len(members),
            "dominant_fraction": len(members) / len(df),
            "dominant_sink_share": float(sink[members].mean()),
            "sink_in_dominant_share": float((labels[sink] == dom).mean()) if sink.any() else float("nan"),
            "prototype_prompt": int(p["prompt"]),
            "prototype_layer": int(p["layer"]),
            "prototype_head": int(p["head"]),
            "prototype_dest": int(p["dest"]),
            "prototype_src": int(p["src"]),
            "prototype_mean_distance": mean_dist,
            "ip_sink_mean": float(ip[sink].mean()) if sink.any() else float("nan"),
            "ip_other_mean": float(ip[~sink].mean()) if (~sink).any() else float("nan"),
        }
    else:
        df["in_dominant"] = pd.Series(dtype=bool)
        df["ip_with_prototype"] = pd.Series(dtype=float)

    values, counts = np.unique(labels, return_counts=True)
    n_sink = [int(sink[labels == v].sum()) for v in values]
    clusters = pd.DataFrame({"cluster": values.astype(int), "size": counts.astype(int), "n_sink": n_sink})
    clusters["sink_share"] = clusters["n_sink"] / clusters["size"]
    clusters["dominant"] = clusters["cluster"] == summary.get("dominant_cluster", -1)
    clusters = clusters.sort_values(["size", "cluster"], ascending=[False, True]).reset_index(drop=True)

    control = head_control(
        df["layer"].to_numpy(), df["head"].to_numpy(), unit, sink, max_distance=controlled_max_distance
    )
    L, H = head_grid(df, n_layers, n_heads)
    grouped = df.groupby(["layer", "head"])
    n_fire = grouped.size().to_dict()
    n_dom = grouped["in_dominant"].sum().to_dict() if len(df) else {}
    head_rows = []
    for layer in range(L):
        for head in range(H):
            n_s, dist, controlled = control.get((layer, head), (0, float("nan"), False))
            head_rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "n_firings": int(n_fire.get((layer, head), 0)),
                    "n_sink": n_s,
                    "n_in_dominant": int(n_dom.get((layer, head), 0)),
                    "mean_sink_distance": dist,
                    "controlled": controlled,
                }
            )
    heads = pd.DataFrame(head_rows)
    summary["n_controlled_heads"] = int(heads["controlled"].sum()) if len(heads) else 0
    summary["n_heads_with_sink"] = int((heads["n_sink"] > 0).sum()) if len(heads) else 0
    firings = df[
        [
            *SIGNAL_COLUMNS,
            *(c for c in TOKEN_COLUMNS if c in df.columns),
            "cluster",
            "in_dominant",
            "is_sink",
            "ip_with_prototype",
        ]
    ]
    return Analysis(firings=firings, clusters=clusters, heads=heads, summary=summary, prototype_row=proto_row)
