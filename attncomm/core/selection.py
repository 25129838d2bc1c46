"""Greedy selection rules of ACC (sections 2, 4.1 and 4.3 of docs/METHOD.md).

Three rules, all pure functions on tensors:

* :func:`select_terms` / :func:`select_terms_batch` -- which singular terms cause a firing: sort the
  contributions ``c`` descending, ``frac = cumsum / sum(c)`` and keep the prefix up to and including the
  first index where ``round(frac, 5) >= 1.0``. ``sum(c) <= 0`` means the side is not traced (an empty
  selection). The arithmetic runs in float32 by default, as the reference does, so the number of
  selected terms matches it; pass ``dtype=torch.float64`` for the float64 option.
* :func:`select_seeds` -- seeds at the final position: sort descending, cutoff = the first value whose
  cumsum is strictly greater than the total, lowered to half the total if above that; keep every entry
  ``>= cutoff`` (ties kept). ``total <= 0`` selects nothing.
* :func:`select_upstream` -- the recursion's 70% rule: the same greedy at 70% of the total, no halving.

Choices where the spec is silent (the reference would raise ``IndexError``):

* terms: if no prefix reaches ``round(frac, 5) >= 1`` (float noise), every term is selected;
* greedy: if no cumsum is strictly above the threshold (only possible when every value is ``>= 0`` and
  the threshold equals the total), the cutoff is the smallest positive value, so every positive entry
  is kept and zero entries are not.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "greedy_mask",
    "greedy_mask_batch",
    "select_seeds",
    "select_terms",
    "select_terms_batch",
    "select_upstream",
]


def select_terms_batch(
    c: Float[Tensor, "firing term"], *, dtype: torch.dtype = torch.float32
) -> tuple[Int[Tensor, "firing term"], Int[Tensor, " firing"]]:
    """Term selection for many firings at once: the descending order of ``c`` and how many lead terms to keep.

    Returns ``(order, n_selected)``: firing ``f`` uses terms ``order[f, :n_selected[f]]`` (in selection
    order); ``n_selected`` is 0 where ``sum(c[f]) <= 0`` (that side is not traced).
    """
    c = c.to(dtype)
    if c.ndim != 2:
        raise ValueError(f"select_terms_batch expects [firing term], got shape {tuple(c.shape)}")
    n_terms = c.shape[1]
    if c.shape[0] == 0 or n_terms == 0:
        return (
            torch.zeros(c.shape, dtype=torch.long),
            torch.zeros(c.shape[0], dtype=torch.long),
        )
    sorted_c, order = torch.sort(c, dim=1, descending=True, stable=True)
    total = c.sum(dim=1)
    positive = total > 0
    safe_total = torch.where(positive, total, torch.ones_like(total))
    frac = torch.cumsum(sorted_c, dim=1) / safe_total[:, None]
    reached = torch.round(frac, decimals=5) >= 1.0
    any_reached = reached.any(dim=1)
    first = torch.argmax(reached.to(torch.int8), dim=1)
    n_selected = torch.where(any_reached, first + 1, torch.full_like(first, n_terms))
    n_selected = torch.where(positive, n_selected, torch.zeros_like(n_selected))
    return order, n_selected


def select_terms(
    c: Float[Tensor, " term"], *, dtype: torch.dtype = torch.float32
) -> Int[Tensor, " selected"]:
    """The singular terms that cause a firing, in selection order (empty when ``sum(c) <= 0``)."""
    order, n_sel = select_terms_batch(c[None, :], dtype=dtype)
    return order[0, : int(n_sel[0])]


def greedy_mask(
    values: Float[Tensor, "..."],
    fraction: float,
    *,
    halve: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Bool[Tensor, "..."]:
    """Entries kept by the greedy rule at ``fraction`` of the total (with the seeds' halving if ``halve``).

    Sort descending; the cutoff is the first value whose cumsum is strictly greater than
    ``fraction * total``; with ``halve`` a cutoff above ``total / 2`` is lowered to ``total / 2``; every
    entry ``>= cutoff`` is kept (ties included). A total ``<= 0`` keeps nothing.
    """
    flat = values.detach().to(dtype).reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    total = flat.sum()
    if not bool(total > 0):
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    sorted_v = torch.sort(flat, descending=True).values
    thresh = torch.tensor(fraction, dtype=dtype, device=flat.device) * total
    above = torch.nonzero(torch.cumsum(sorted_v, dim=0) > thresh)
    if above.numel():
        cutoff = sorted_v[int(above[0, 0])]
    else:
        cutoff = sorted_v[sorted_v > 0].min()
    if halve and bool(cutoff > total / 2):
        cutoff = total / 2
    return (flat >= cutoff).reshape(values.shape)


def greedy_mask_batch(
    values: Float[Tensor, "row entry"], fraction: float, *, dtype: torch.dtype = torch.float32
) -> Bool[Tensor, "row entry"]:
    """:func:`greedy_mask` (no halving) applied to every row at once, on the rows' device.

    Zero padding does not change a row's kept entries (zeros are never kept and add nothing).
    """
    v = values.detach().to(dtype)
    if v.numel() == 0:
        return torch.zeros(v.shape, dtype=torch.bool, device=v.device)
    total = v.sum(dim=1)
    sorted_v = torch.sort(v, dim=1, descending=True).values
    thresh = torch.tensor(fraction, dtype=dtype, device=v.device) * total
    above = torch.cumsum(sorted_v, dim=1) > thresh[:, None]
    first = torch.argmax(above.to(torch.int8), dim=1)
    cutoff = torch.gather(sorted_v, 1, first[:, None])[:, 0]
    inf = torch.full((), float("inf"), dtype=dtype, device=v.device)
    smallest_positive = torch.where(sorted_v > 0, sorted_v, inf).amin(dim=1)
    cutoff = torch.where(above.any(dim=1), cutoff, smallest_positive)
    return (v >= cutoff[:, None]) & (total > 0)[:, None]


def select_seeds(values: Float[Tensor, "..."], *, dtype: torch.dtype = torch.float32) -> Bool[Tensor, "..."]:
    """Seeds at the final position: greedy at 100% of the total with the cutoff capped at half the total."""
    return greedy_mask(values, 1.0, halve=True, dtype=dtype)


def select_upstream(
    values: Float[Tensor, "..."], fraction: float = 0.7, *, dtype: torch.dtype = torch.float32
) -> Bool[Tensor, "..."]:
    """Upstream contributors kept by the recursion: greedy at ``fraction`` (70%) of the total, no halving."""
    return greedy_mask(values, fraction, halve=False, dtype=dtype)
