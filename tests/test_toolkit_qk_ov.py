"""QK/OV circuits: factored top-k equals the dense computation; nothing of vocab x vocab is allocated."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attncomm.analyses.qk_ov_circuits import (
    composition_table,
    ov_circuit,
    positional_pattern,
    qk_circuit,
    qk_ov_tables,
    row_top_k,
    token_inputs,
)
from attncomm.models.adapter import HeadWeights
from tests.toolkit_helpers import load_toy


def test_factored_top_k_equals_dense() -> None:
    model = load_toy("toy-induction")  # vocabulary of 300: the dense matrices are small
    w = model.weights
    X = torch.nn.functional.layer_norm(w.W_E, (model.arch.d_model,), eps=model.bridge.cfg.eps)
    for layer, head in [(0, 0), (1, 1)]:
        dense_ov = (X @ w.W_V[layer, head] + w.b_V[layer, head]) @ w.W_O[layer, head] @ w.W_U
        q = X @ w.W_Q[layer, head] + w.b_Q[layer, head]
        k = X @ w.W_K[layer, head] + w.b_K[layer, head]
        dense_qk = q @ k.T / model.arch.attn_scale
        for t in (3, 50, 299):
            for fm, dense in (
                (ov_circuit(model, layer, head), dense_ov),
                (qk_circuit(model, layer, head), dense_qk),
            ):
                values, idx = row_top_k(fm, t, 5)
                ref = torch.topk(dense[t], 5)
                assert idx.tolist() == ref.indices.tolist()
                torch.testing.assert_close(values, ref.values, rtol=0, atol=1e-9)
    # the induction head copies
    tables = qk_ov_tables(model, [[1, 1]], [5], top_k=3)
    assert tables["copying"]["copying_score"].iloc[0] > 0.9
    pattern = positional_pattern(model, 0, 0, 8)
    assert pattern is not None
    torch.testing.assert_close(pattern.sum(-1), torch.ones(8, dtype=pattern.dtype))
    assert pattern.triu(1).abs().max() == 0  # causal
    P = torch.nn.functional.layer_norm(
        model.weights.W_pos[:8], (model.arch.d_model,), eps=model.bridge.cfg.eps
    )
    dense = (P @ model.weights.W_Q[0, 0] + model.weights.b_Q[0, 0]) @ (
        P @ model.weights.W_K[0, 0] + model.weights.b_K[0, 0]
    ).T
    ref = (
        (dense / model.arch.attn_scale)
        .masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
        .softmax(-1)
    )
    torch.testing.assert_close(pattern, ref, rtol=0, atol=1e-12)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any torch operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _big_vocab_model(d_vocab: int = 20000, d_model: int = 16, L: int = 2, H: int = 2, dh: int = 4):
    """A random model of vocabulary 20000: vocab x vocab float32 would take 1.6 GB."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    weights = HeadWeights(
        W_Q=r(L, H, d_model, dh),
        W_K=r(L, H, d_model, dh),
        W_V=r(L, H, d_model, dh),
        W_O=r(L, H, dh, d_model),
        b_Q=r(L, H, dh),
        b_K=r(L, H, dh),
        b_V=r(L, H, dh),
        b_O=r(L, d_model),
        W_U=r(d_model, d_vocab),
        b_U=r(d_vocab),
        W_E=r(d_vocab, d_model),
        W_pos=r(64, d_model),
    )
    arch = SimpleNamespace(
        n_layers=L,
        n_heads=H,
        d_model=d_model,
        d_vocab=d_vocab,
        n_ctx=64,
        embed_scale=1.0,
        normalization="LN",
        attn_scale=dh**0.5,
    )
    tokenizer = SimpleNamespace(decode=lambda ids: f"t{ids[0]}")
    return SimpleNamespace(
        weights=weights, arch=arch, tokenizer=tokenizer, bridge=SimpleNamespace(cfg=SimpleNamespace(eps=1e-5))
    )


def test_no_vocab_by_vocab_tensor() -> None:
    model = _big_vocab_model()
    assert model.arch.d_vocab**2 * 4 > 1e9
    with MaxNumel() as probe:
        tables = qk_ov_tables(model, [[0, 0], [1, 1]], [0, 123, 19999], top_k=5, n_pos=16)
        composition_table(model)
        token_inputs(model)
    assert probe.largest < model.arch.d_vocab * 1000, probe.largest
    assert len(tables["top_k"]) == 2 * 2 * 3 * 5
