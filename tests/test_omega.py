"""Omega factors, thin SVD and rotary offsets (section 1 of ACC-METHOD.md)."""

from __future__ import annotations

import pytest
import torch

from attncomm.core.omega_factors import (
    OmegaCache,
    dense_omega,
    omega_factors,
    qr_factors,
    rotary_matrix,
    thin_svd,
)
from attncomm.methods.acc_tracing import build_omega_cache
from tests.models_fixtures import load_tiny

F64 = torch.float64


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Independent GPT-NeoX rotary (pairs (i, i + r/2) on the first r dims), written from the HF formula."""
    r = cos.shape[-1]
    x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    c1, s1 = cos[..., : r // 2], sin[..., : r // 2]
    return torch.cat([x1 * c1 - x2 * s1, x2 * c1 + x1 * s1, rest], dim=-1)


@pytest.mark.parametrize("side", ["d", "s"])
def test_thin_svd_matches_dense(side: str) -> None:
    g = torch.Generator().manual_seed(0)
    D, dh, H = 24, 6, 3
    W_Q, W_K = torch.randn(H, D, dh, generator=g, dtype=F64), torch.randn(H, D, dh, generator=g, dtype=F64)
    b_Q, b_K = torch.randn(H, dh, generator=g, dtype=F64), torch.randn(H, dh, generator=g, dtype=F64)
    A, B = omega_factors(W_Q, W_K, b_Q, b_K, side)
    assert A.shape[-2] == (D if side == "d" else D + 1) and B.shape[-2] == (D + 1 if side == "d" else D)
    rot = torch.linalg.qr(torch.randn(H, dh, dh, generator=g, dtype=F64)).Q  # any orthogonal middle factor
    for middle in (None, rot):
        dense = dense_omega(A, B, middle)
        U, S, V = thin_svd(A, B, middle)
        assert U.shape == (H, A.shape[-2], dh) and V.shape == (H, B.shape[-2], dh)
        torch.testing.assert_close(
            U @ torch.diag_embed(S) @ V.transpose(-1, -2), dense, rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(S, torch.linalg.svdvals(dense)[..., :dh], rtol=1e-10, atol=1e-10)
        eye = torch.eye(dh, dtype=F64).expand(H, dh, dh)
        torch.testing.assert_close(U.transpose(-1, -2) @ U, eye, rtol=0, atol=1e-10)
        torch.testing.assert_close(V.transpose(-1, -2) @ V, eye, rtol=0, atol=1e-10)


def test_augmented_omega_gives_the_biased_logit() -> None:
    g = torch.Generator().manual_seed(1)
    D, dh = 10, 4
    W_Q, W_K = torch.randn(D, dh, generator=g, dtype=F64), torch.randn(D, dh, generator=g, dtype=F64)
    b_Q, b_K = torch.randn(dh, generator=g, dtype=F64), torch.randn(dh, generator=g, dtype=F64)
    x_d, x_s = torch.randn(D, generator=g, dtype=F64), torch.randn(D, generator=g, dtype=F64)
    logit = (x_d @ W_Q + b_Q) @ (x_s @ W_K + b_K)
    Om_d = dense_omega(*omega_factors(W_Q, W_K, b_Q, b_K, "d"))
    Om_s = dense_omega(*omega_factors(W_Q, W_K, b_Q, b_K, "s"))
    one = torch.ones(1, dtype=F64)
    # a = x_d Omega_d x~_s + (terms without x_d) = x~_d Omega_s x_s + (terms without x_s)
    torch.testing.assert_close(x_d @ Om_d @ torch.cat([x_s, one]) + b_Q @ (x_s @ W_K + b_K), logit)
    torch.testing.assert_close(torch.cat([x_d, one]) @ Om_s @ x_s + (x_d @ W_Q + b_Q) @ b_K, logit)
    # no biases: plain Omega, no augmentation
    A, B = omega_factors(W_Q, W_K, None, None, "d")
    assert A.shape == (D, dh) and B.shape == (D, dh)


def test_omega_cache_offsets_on_demand() -> None:
    g = torch.Generator().manual_seed(2)
    L, H, D, dh, r = 2, 2, 12, 8, 4
    W_Q, W_K = (
        torch.randn(L, H, D, dh, generator=g, dtype=F64),
        torch.randn(L, H, D, dh, generator=g, dtype=F64),
    )
    b_Q, b_K = torch.randn(L, H, dh, generator=g, dtype=F64), torch.randn(L, H, dh, generator=g, dtype=F64)
    cache = OmegaCache(W_Q, W_K, b_Q, b_K, rotary=True, rotary_dim=r, rotary_base=100.0, dtype=F64)
    for delta in (0, 3, 40, 257):  # far past any fixed range (the reference cached 0..20)
        cos, sin = cache.tables(delta + 1)
        rot = rotary_matrix(cos[delta], sin[delta], dh)
        # the rotation is the model's rotary at position delta: x R = rotate(x, delta)
        x = torch.randn(5, dh, generator=g, dtype=F64)
        torch.testing.assert_close(x @ rot, _rotate_neox(x, cos[delta], sin[delta]))
        for side in ("d", "s"):
            U, S, V = cache.get(1, 1, delta, side)
            A, B = omega_factors(W_Q[1, 1], W_K[1, 1], b_Q[1, 1], b_K[1, 1], side)
            torch.testing.assert_close(U @ torch.diag(S) @ V.T, A @ rot @ B.T, rtol=1e-10, atol=1e-10)
    # R(d - s) = M_d M_s^T: the relative rotation only depends on the offset
    cos, sin = cache.tables(20)
    M = rotary_matrix(cos, sin, dh)
    torch.testing.assert_close(M[15] @ M[9].T, M[6], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("builder", ["tiny-pythia", "tiny-gemma2"])
def test_rotary_omega_reproduces_model_scores(builder: str) -> None:
    """Issue item (4): the offset Omega reproduces the rotated query-key product of the model's own hooks."""
    model = load_tiny(builder)
    a = model.arch
    assert a.rotary and not a.rotary_adjacent_pairs
    cache = build_omega_cache(model, F64)
    tokens = torch.randint(0, 5000, (1, 12), generator=torch.Generator().manual_seed(3))
    layer = a.n_layers - 1
    names = [model.ln1_normalized(layer), model.q(layer), model.k(layer), model.attn_scores(layer)]
    _, hooks = model.run_with_cache(tokens, names)
    x = hooks[names[0]][0].to(F64)
    q, k = hooks[names[1]][0].to(F64), hooks[names[2]][0].to(F64)
    k = k.repeat_interleave(a.n_heads // k.shape[1], dim=1)  # GQA: head h reads kv group h // group
    cos, sin = (t.to(F64) for t in model.rotary_cos_sin(12))
    n = 12
    q_rot = _rotate_neox(q, cos[:, None], sin[:, None])
    k_rot = _rotate_neox(k, cos[:, None], sin[:, None])
    scores_model = torch.einsum("dhi,shi->hds", q_rot, k_rot)
    if a.attn_softcap is None:  # GPT-NeoX: the hook itself (scores / attn_scale)
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
        ref = hooks[names[3]][0].to(F64) * a.attn_scale
        torch.testing.assert_close(scores_model[:, mask], ref[:, mask], rtol=1e-4, atol=1e-4)
    w = model.weights
    one = torch.ones(n, 1, dtype=F64)
    x_t = torch.cat([x, one], dim=1) if cache.augmented else x
    for h in range(a.n_heads):
        for d in (0, 5, 11):
            for s in range(d + 1):
                U, S, V = cache.get(layer, h, d - s, "d")
                b_Q = w.b_Q[layer, h].to(F64)
                bias_part = (b_Q @ cache.rotation(d - s)) @ k[s, h]  # the term without x_d
                got = x[d] @ U @ torch.diag(S) @ (V.T @ x_t[s]) + bias_part
                torch.testing.assert_close(got, scores_model[h, d, s], rtol=2e-4, atol=2e-4)


def test_factorisations_do_not_depend_on_the_thread_count() -> None:
    """The batched QR's result changes with torch's thread count; the Omega factorisations run on one
    thread (and restore the caller's count), so traces are the same whatever the machine's threads."""
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 256, 32, generator=gen), torch.randn(6, 256, 32, generator=gen)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            qr, svd = qr_factors(A, B), thin_svd(A, B)
            assert torch.get_num_threads() == threads
            results.append([qr.Q_a, qr.R_a, qr.Q_b, qr.R_b, *svd])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
