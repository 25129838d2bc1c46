"""Sparse attention decomposition statistics (docs/METHOD.md section 9), pure computations.

Input: per-firing selected singular terms (``FiringRecord.dest_terms`` / ``src_terms``, keyed by
``(prompt, layer, head, dest, src)``). A side whose selection is empty was not traced (its relative
logit had a non-positive total) and is excluded from every statistic; it is counted separately.

- :func:`term_counts`: one row per traced side of a firing, with ``n_terms`` and, given ``d_head``,
  ``frac_d_head`` = ``n_terms / d_head``.
- :func:`summary`: per side (``dest``, ``src``, ``both``): number of traced sides, untraced sides,
  mean / median / std / min / max of ``n_terms`` and the mean fraction of ``d_head``.
- :func:`histogram`: number of traced sides per ``n_terms`` value (the distribution).
- :func:`head_density`: mean ``n_terms`` per ``(layer, head)``, a ``[n_layers, n_heads]`` matrix
  (NaN where a head never fired).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from attncomm.core.types import FiringKey, FiringRecord

SIDES: tuple[str, ...] = ("dest", "src")
COLUMNS: tuple[str, ...] = ("prompt", "layer", "head", "dest", "src", "side", "n_terms")


def term_counts_from_lengths(
    rows: Iterable[tuple[FiringKey, int, int]], d_head: int | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Term-count table from ``(key, n_dest_terms, n_src_terms)`` triples.

    Returns the table (columns :data:`COLUMNS`, plus ``frac_d_head`` when ``d_head`` is given) and
    the number of untraced (empty) sides per side name.
    """
    records: list[tuple[int, int, int, int, int, str, int]] = []
    untraced = dict.fromkeys(SIDES, 0)
    for key, n_dest, n_src in rows:
        for side, n in zip(SIDES, (n_dest, n_src), strict=True):
            if n <= 0:
                untraced[side] += 1
            else:
                records.append((*(int(k) for k in key), side, int(n)))  # type: ignore[arg-type]
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    df = df.astype({c: "int64" for c in COLUMNS if c != "side"}).astype({"side": "string"})
    if d_head is not None:
        df = with_fraction(df, d_head)
    return df, untraced


def term_counts(
    firings: Mapping[FiringKey, FiringRecord], d_head: int | None = None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Term-count table of ``firings`` (see :func:`term_counts_from_lengths`)."""
    rows = ((key, len(rec.dest_terms), len(rec.src_terms)) for key, rec in sorted(firings.items()))
    return term_counts_from_lengths(rows, d_head)


def with_fraction(df: pd.DataFrame, d_head: int) -> pd.DataFrame:
    """``df`` with ``frac_d_head = n_terms / d_head``; a count above ``d_head`` is an error."""
    if d_head <= 0:
        raise ValueError(f"d_head must be positive, got {d_head}")
    if len(df) and int(df["n_terms"].max()) > d_head:
        raise ValueError(f"a firing selects {int(df['n_terms'].max())} terms, more than d_head={d_head}")
    out = df.copy()
    out["frac_d_head"] = out["n_terms"] / float(d_head)
    return out


def d_head_lower_bound(firings: Mapping[FiringKey, FiringRecord]) -> int:
    """Largest selected term index + 1: the least ``d_head`` consistent with the tracing results.

    Tracing results do not store ``d_head`` itself (contribution tensors have shape
    ``(layer, H+2, d+1)``), so this is only a lower bound, used when no model config is available.
    """
    top = -1
    for rec in firings.values():
        for terms in (rec.dest_terms, rec.src_terms):
            if len(terms):
                top = max(top, int(np.max(terms)))
    return top + 1


def summary(df: pd.DataFrame, untraced: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Per side (``dest``, ``src``) and over both (``both``): counts and ``n_terms`` statistics."""
    untraced = dict(untraced or {})
    rows = []
    for side in (*SIDES, "both"):
        part = df if side == "both" else df[df["side"] == side]
        n = part["n_terms"].to_numpy(dtype=float)
        row: dict[str, object] = {
            "side": side,
            "n_traced": len(part),
            "n_untraced": sum(untraced.values()) if side == "both" else untraced.get(side, 0),
            "mean_terms": float(n.mean()) if len(n) else float("nan"),
            "median_terms": float(np.median(n)) if len(n) else float("nan"),
            "std_terms": float(n.std(ddof=0)) if len(n) else float("nan"),
            "min_terms": int(n.min()) if len(n) else 0,
            "max_terms": int(n.max()) if len(n) else 0,
        }
        if "frac_d_head" in part:
            row["mean_frac_d_head"] = float(part["frac_d_head"].mean()) if len(part) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def histogram(df: pd.DataFrame, max_terms: int | None = None) -> pd.DataFrame:
    """Number of traced sides per ``(side, n_terms)``, every count from 1 to ``max_terms`` listed."""
    top = max_terms if max_terms is not None else (int(df["n_terms"].max()) if len(df) else 0)
    index = pd.MultiIndex.from_product([list(SIDES), range(1, top + 1)], names=["side", "n_terms"])
    counts = df.astype({"side": object}).groupby(["side", "n_terms"]).size()
    return counts.reindex(index, fill_value=0).rename("count").reset_index()


def head_grid(df: pd.DataFrame, n_layers: int | None = None, n_heads: int | None = None) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of a per-head table: the given values, else one more than the largest
    ``layer`` / ``head`` of ``df`` (0 for an empty table)."""
    L = n_layers if n_layers is not None else (int(df["layer"].max()) + 1 if len(df) else 0)
    H = n_heads if n_heads is not None else (int(df["head"].max()) + 1 if len(df) else 0)
    return L, H


def head_density(
    df: pd.DataFrame, side: str | None = None, n_layers: int | None = None, n_heads: int | None = None
) -> np.ndarray:
    """Mean ``n_terms`` per ``(layer, head)`` over the traced sides (``side=None``: both sides).

    Shape ``[n_layers, n_heads]`` (defaults: one more than the largest layer/head seen); NaN where
    the head has no traced side.
    """
    part = df if side is None else df[df["side"] == side]
    L, H = head_grid(df, n_layers, n_heads)
    out = np.full((L, H), np.nan)
    if len(part):
        means = part.groupby(["layer", "head"])["n_terms"].mean()
        for (layer, head), value in means.items():
            out[int(layer), int(head)] = float(value)
    return out


def head_density_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long table of per-head densities: ``side, layer, head, mean_terms, n_sides`` (heads that fired)."""
    frames = []
    for side, part in [*((s, df[df["side"] == s]) for s in SIDES), ("both", df)]:
        if not len(part):
            continue
        g = part.groupby(["layer", "head"])["n_terms"].agg(["mean", "size"]).reset_index()
        g.insert(0, "side", side)
        frames.append(g.rename(columns={"mean": "mean_terms", "size": "n_sides"}))
    if not frames:
        return pd.DataFrame(columns=["side", "layer", "head", "mean_terms", "n_sides"])
    return pd.concat(frames, ignore_index=True)
