"""Hand computations of the ACC decomposition from dense Omegas: the independent reference in tests.

Kept deliberately plain (dense matrices, explicit loops over sources) so that the optimised code in
``attncomm.core`` is checked against the formulas of ACC-METHOD.md section 2, not against itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attncomm.core.omega_factors import OmegaCache
from attncomm.methods.acc_tracing import build_omega_cache


def random_tokens(batch: int, n_pos: int, seed: int = 0) -> Tensor:
    """Random GPT-2 token ids (ordinary words, no special tokens) ``[batch pos]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, 5000, (batch, n_pos), generator=gen)


def dense_omega(omega: OmegaCache, layer: int, head: int, delta: int, side: str) -> Tensor:
    """``U diag(S) V^T`` of one head's Omega at offset ``delta``."""
    U, S, V = omega.get(layer, head, delta, side)  # type: ignore[arg-type]
    return U @ torch.diag(S) @ V.T


def augment(x: Tensor, size: int) -> Tensor:
    """``[x, 1]`` when the Omega is bias-augmented to ``size`` rows, else ``x``."""
    return torch.cat([x, x.new_ones(1)]) if size == x.shape[0] + 1 else x


def dest_term_contributions(
    omega: OmegaCache, x: Tensor, layer: int, head: int, d: int, s: int
) -> tuple[Tensor, Tensor]:
    """``(U, c)`` of the dest side: ``p[k](j) = (x_d . u_k) u_k^T Omega_d(d - j) x~_j``,
    ``c[k] = p[k](s) - mean_{j <= d, j != s} p[k](j)``, with ``U`` from Omega_d at offset ``d - s``."""
    U, _, _ = omega.get(layer, head, d - s, "d")
    rows = []
    for j in range(d + 1):
        omega_dj = dense_omega(omega, layer, head, d - j, "d")
        rows.append((x[d] @ U) * (U.T @ (omega_dj @ augment(x[j], omega_dj.shape[1]))))
    p = torch.stack(rows)  # [j, k]
    others = [j for j in range(d + 1) if j != s]
    return U, p[s] - p[others].mean(0)


def relative_logit(raw: Tensor, d: int, s: int) -> Tensor:
    """``raw[d, s] - mean_{j <= d, j != s} raw[d, j]`` of an unscaled attention-logit matrix."""
    others = [j for j in range(d + 1) if j != s]
    return raw[d, s] - raw[d, others].mean()


@dataclass
class DestFiring:
    """One float64 firing ``(layer, head, d, s)`` of a model on random tokens, with the hand-computed
    dest-side decomposition: ``x`` = ``ln1.hook_normalized`` of ``layer``, ``U``/``c`` as in
    :func:`dest_term_contributions`, and the clean ``hook_attn_scores`` of the layer."""

    model: Any
    omega: OmegaCache
    tokens: Tensor
    layer: int
    head: int
    d: int
    s: int
    x: Tensor
    scores: Tensor
    U: Tensor
    c: Tensor


def dest_firing(
    model: Any, n_pos: int, *, seed: int = 3, head: int = 1, d: int = 6, s: int = 2
) -> DestFiring:
    """The last layer's firing ``(head, d, s)`` on one random prompt, decomposed by hand (float64 model)."""
    omega = build_omega_cache(model, torch.float64)
    tokens = random_tokens(1, n_pos, seed)
    layer = model.arch.n_layers - 1
    _, cache = model.run_with_cache(tokens, [model.ln1_normalized(layer), model.attn_scores(layer)])
    x = cache[model.ln1_normalized(layer)][0]
    U, c = dest_term_contributions(omega, x, layer, head, d, s)
    return DestFiring(model, omega, tokens, layer, head, d, s, x, cache[model.attn_scores(layer)][0], U, c)
