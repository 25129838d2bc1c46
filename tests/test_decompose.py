"""Exactness of the per-firing decomposition and the upstream contributions (sections 2 and 3).

(1) the sum of all singular-term contributions of a side equals that side's relative attention logit,
computed independently from the model's own queries and keys (``hook_q``/``hook_k``, rotated with the
model's own cos/sin tables by a rotary written here; GPT-2/NeoX also against ``hook_attn_scores``).
With ``rel(f)(d, s) = f(d, s) - mean_{j <= d, j != s} f(d, j)`` and ``a = q_rot . k_rot``:

* dest side: ``sum_k c_d[k] = rel(a - b_Q R k)`` (the terms of ``a`` without ``x_d`` removed);
* source side: ``sum_k c_s[k] = rel(a - q R b_K)`` (the terms without ``x_s`` removed).

(2) per side, the upstream contributions over all components add up to the selected terms' ``c``.
(3) the optimised contributions equal the plain path: ``component_writes`` (engineer 1's materialised
residual decomposition) projected by hand with dense ``Omega(delta)`` and ``P_U`` / ``P_V``.
"""

from __future__ import annotations

import pytest
import torch

from attncomm.core.contributions import projection_vectors, upstream_contributions
from attncomm.core.decompose import decompose_firings, layer_inputs, selection_mask
from attncomm.core.omega_factors import omega_factors
from attncomm.core.residual import component_writes, required_hooks
from attncomm.methods.acc_tracing import _prompt_tensors, build_omega_cache, needed_hooks
from tests.models_fixtures import LLAMA_LIKE, load_tiny

BUILDERS = ["tiny-gpt2", "tiny-pythia", "tiny-gemma2", *LLAMA_LIKE]
CASES = [(b, dt) for b in BUILDERS for dt in (torch.float32, torch.float64)]
RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}
N_POS = 12


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary written independently of attncomm (pairs (i, i + r/2), first r dims rotate)."""
    r = cos.shape[-1]
    x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    c, s = cos[..., : r // 2], sin[..., : r // 2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def _close(got: torch.Tensor, exp: torch.Tensor, rtol: float) -> None:
    """Relative closeness on the scale of the expected values."""
    scale = max(1.0, float(exp.abs().max()))
    err = float((got - exp).abs().max())
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def _rel(f: torch.Tensor) -> torch.Tensor:
    """``rel(f)[h, d, s] = f[h, d, s] - mean_{j <= d, j != s} f[h, d, j]`` (0 where d = 0)."""
    n = f.shape[-1]
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
    f = f * mask
    row = f.sum(-1, keepdim=True)
    d = torch.arange(n, dtype=f.dtype)[:, None]
    out = f - (row - f) / d.clamp(min=1)
    out[..., 0, :] = 0
    return out * mask


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}")
def setup(request: pytest.FixtureRequest) -> dict:
    builder, dtype = request.param
    model = load_tiny(builder, dtype)
    a = model.arch
    tokens = torch.randint(0, 5000, (1, N_POS), generator=torch.Generator().manual_seed(7))
    layer = a.n_layers - 1
    names = sorted(
        set(needed_hooks(model))
        | set(required_hooks(model, a, layer))
        | {model.q(layer), model.k(layer), model.attn_scores(layer)}
    )
    _, hooks = model.run_with_cache(tokens, names)
    omega = build_omega_cache(model, dtype)
    direction = torch.zeros(a.d_model, dtype=dtype)
    pt = _prompt_tensors(model, hooks, 0, N_POS - 1, direction, {}, omega, dtype)
    heads, dests, srcs = [], [], []
    for h in range(a.n_heads):
        for d in range(1, N_POS):
            for s in range(d + 1):
                heads.append(h), dests.append(d), srcs.append(s)
    w = model.weights
    inp = layer_inputs(
        pt.x[layer],
        w.W_Q[layer].to(dtype),
        w.W_K[layer].to(dtype),
        w.b_Q[layer].to(dtype) if omega.augmented else None,
        w.b_K[layer].to(dtype) if omega.augmented else None,
        omega.qr(layer, "d"),
        omega.qr(layer, "s"),
        pt.cos,
        pt.sin,
    )
    dec = decompose_firings(inp, omega, layer, torch.tensor(heads), torch.tensor(dests), torch.tensor(srcs))
    return dict(model=model, hooks=hooks, omega=omega, pt=pt, inp=inp, dec=dec, layer=layer, dtype=dtype)


def test_sum_of_terms_is_relative_logit(setup: dict) -> None:
    model, hooks, dec, layer, dtype = (setup[k] for k in ("model", "hooks", "dec", "layer", "dtype"))
    a, w = model.arch, model.weights
    q = hooks[model.q(layer)][0].to(dtype)  # [pos, head, d_head], before rotary, with b_Q
    k = hooks[model.k(layer)][0].to(dtype)
    k = k.repeat_interleave(a.n_heads // k.shape[1], dim=1)  # GQA
    b_Q = w.b_Q[layer].to(dtype)[None].expand_as(q)
    b_K = w.b_K[layer].to(dtype)[None].expand_as(k)
    if a.rotary:
        cos, sin = (t.to(dtype)[:, None, :] for t in model.rotary_cos_sin(N_POS))
        q, k, b_Q, b_K = (_rotate(t, cos, sin) for t in (q, k, b_Q, b_K))
    logits = torch.einsum("dhi,shi->hds", q, k)
    if a.attn_softcap is None:  # GPT-2 / NeoX: also the model's own scores
        mask = torch.tril(torch.ones(N_POS, N_POS, dtype=torch.bool))
        scores = hooks[model.attn_scores(layer)][0].to(dtype) * a.attn_scale
        _close(logits[:, mask], scores[:, mask], 1e-4)
    exp_dest = _rel(logits - torch.einsum("dhi,shi->hds", b_Q, k))
    exp_src = _rel(logits - torch.einsum("dhi,shi->hds", q, b_K))
    got_dest = dec.c_dest.sum(-1)
    got_src = dec.c_src.sum(-1)
    _close(got_dest, exp_dest[dec.heads, dec.dests, dec.srcs], RTOL[dtype])
    _close(got_src, exp_src[dec.heads, dec.dests, dec.srcs], RTOL[dtype])


def _contributions(setup: dict) -> tuple:
    dec, inp, pt, layer = setup["dec"], setup["inp"], setup["pt"], setup["layer"]
    mask_d, terms_d = selection_mask(dec.c_dest)
    mask_s, terms_s = selection_mask(dec.c_src)
    proj_d, proj_s = projection_vectors(dec, inp, mask_d, mask_s)
    cd = upstream_contributions(proj_d, pt.writes, pt.scale[layer], layer, N_POS)
    cs = upstream_contributions(proj_s, pt.writes, pt.scale[layer], layer, N_POS)
    return mask_d, mask_s, terms_d, terms_s, cd, cs


def test_contributions_add_up_to_selected_terms(setup: dict) -> None:
    dec, dtype = setup["dec"], setup["dtype"]
    mask_d, mask_s, _, _, cd, cs = _contributions(setup)
    sel_d = (dec.c_dest * mask_d).sum(-1)
    sel_s = (dec.c_src * mask_s).sum(-1)
    assert (mask_d.sum(-1) > 0).any() and (mask_s.sum(-1) > 0).any()
    _close(cd.sum((1, 2, 3)), sel_d, RTOL[dtype])
    _close(cs.sum((1, 2, 3)), sel_s, RTOL[dtype])
    # entries the method cannot produce are zero: dest heads at t' > d
    n = cd.shape[-1]
    later = torch.arange(n)[None, :] > dec.dests[:, None]
    assert float(cd[:, :, : cd.shape[2] - 3].abs().amax((1, 2))[later].max()) == 0.0


def test_contributions_match_plain_component_writes(setup: dict) -> None:
    model, hooks, omega, dec, pt, layer, dtype = (
        setup[k] for k in ("model", "hooks", "omega", "dec", "pt", "layer", "dtype")
    )
    a = model.arch
    H = a.n_heads
    _, _, terms_d, terms_s, cd, cs = _contributions(setup)
    cw = component_writes(hooks, model.weights, a, model, layer)
    scale = pt.scale[layer]  # [pos]
    heads_w = cw.heads.to(dtype) / scale[None, None, :, None, None]  # [l', h', t, t', D]
    mlp_w = cw.mlp.to(dtype) / scale[None, :, None]
    bias_w = cw.bias.to(dtype)[:, None, :] / scale[None, :, None]  # [l', t, D]
    emb_w = cw.embed.to(dtype) / scale[:, None]
    x = pt.x[layer]
    x_t = torch.cat([x, torch.ones(N_POS, 1, dtype=dtype)], 1) if omega.augmented else x
    if a.rotary:
        cos, sin = (t.to(dtype) for t in model.rotary_cos_sin(N_POS))
        # M_p: x M_p = rotary of x at position p; R(d - j) = M_d M_j^T exactly as the model composes them
        M = _rotate(torch.eye(a.d_head, dtype=dtype).expand(N_POS, -1, -1), cos[:, None], sin[:, None])
    else:
        M = torch.eye(a.d_head, dtype=dtype)[None].expand(N_POS, -1, -1)
    picks = torch.linspace(0, dec.heads.numel() - 1, 12).long().tolist()
    for f in picks:
        h, d, s = int(dec.heads[f]), int(dec.dests[f]), int(dec.srcs[f])
        A_d, B_d = omega.factors(layer, "d")
        A_s, B_s = omega.factors(layer, "s")
        om_d = [A_d[h] @ M[d] @ M[j].T @ B_d[h].T for j in range(d + 1)]
        om_s = [A_s[h] @ M[d] @ M[j].T @ B_s[h].T for j in range(d + 1)]
        coef = torch.full((d + 1,), -1.0 / d, dtype=dtype)
        coef[s] = 1.0
        # dest: (P_U y_d) . [Omega_d(d-s) x~_s - mean_{j != s} Omega_d(d-j) x~_j]
        U, _, _ = omega.get(layer, h, d - s, "d")
        U_S = U[:, terms_d[f]]
        target = sum(coef[j] * (om_d[j] @ x_t[j]) for j in range(d + 1))
        zd = U_S @ (U_S.T @ target)
        exp_d = torch.zeros(layer, H + 3, d + 1, dtype=dtype)
        exp_d[:, :H] = heads_w[:, :, d, : d + 1] @ zd
        exp_d[:, H, d] = mlp_w[:, d] @ zd
        exp_d[:, H + 1, d] = bias_w[:, d] @ zd
        exp_d[0, H + 2, d] = emb_w[d] @ zd
        _close(cd[f, :, :, : d + 1], exp_d, RTOL[dtype])
        # source: sum_j coef_j x~_d^T Omega_s(d-j) P_V y_j
        _, _, V = omega.get(layer, h, d - s, "s")
        V_S = V[:, terms_s[f]]
        exp_s = torch.zeros(layer, H + 3, d + 1, dtype=dtype)
        for j in range(d + 1):
            zj = coef[j] * (V_S @ (V_S.T @ (x_t[d] @ om_s[j])))
            exp_s[:, :H] += heads_w[:, :, j, : d + 1] @ zj
            exp_s[:, H, s] += mlp_w[:, j] @ zj
            exp_s[:, H + 1, s] += bias_w[:, j] @ zj
            exp_s[0, H + 2, s] += emb_w[j] @ zj
        _close(cs[f, :, :, : d + 1], exp_s, RTOL[dtype])


def test_factors_shapes_follow_bias(setup: dict) -> None:
    model, omega = setup["model"], setup["omega"]
    A, B = omega.factors(0, "d")
    D = model.arch.d_model
    assert A.shape[-2] == D
    assert B.shape[-2] == (D + 1 if model.arch.has_attn_bias else D)
    assert omega.augmented == model.arch.has_attn_bias
    ref = omega_factors(model.weights.W_Q[0], model.weights.W_K[0], None, None, "s")
    assert ref[0].shape[-2] == D
