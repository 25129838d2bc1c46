"""The residual decomposition (ACC-METHOD.md section 3) and the adapter's Q/K weights against the model.

Both are checked against the model's own hooks: the component writes must rebuild
``ln1.hook_normalized`` of every layer, and ``W_Q``/``W_K``/``b_Q``/``b_K`` (with ``rotary_cos_sin``)
must rebuild ``hook_attn_scores``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attncomm.core.residual import ComponentWrites, component_writes, head_writes, required_hooks
from attncomm.models.adapter import ModelAdapter
from tests.models_fixtures import LLAMA_LIKE, load_tiny

TINY = ["tiny-gpt2", "tiny-pythia", "tiny-gemma2", *LLAMA_LIKE]
TEXTS = ["When Mary and John went to the store, John gave a drink to", "The war lasted from 1732 to 17"]
DTYPES = {torch.float32: 1e-4, torch.float64: 1e-9}


def _rel_err(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _center(x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True)


def _all_hooks(adapter: ModelAdapter) -> list[str]:
    a = adapter.arch
    names = set(required_hooks(adapter, a, a.n_layers))
    for layer in range(a.n_layers):
        names |= {adapter.ln1_normalized(layer), adapter.ln1_scale(layer)}
    names |= {adapter.ln_final_scale(), "ln_final.hook_normalized"}
    return sorted(names)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["float32", "float64"])
@pytest.mark.parametrize("builder", TINY)
def test_component_writes_rebuild_normalized_attention_input(builder: str, dtype: torch.dtype) -> None:
    adapter = load_tiny(builder, dtype)
    a = adapter.arch
    tokens = adapter.to_tokens(TEXTS, prepend_bos=True)
    _, cache = adapter.run_with_cache(tokens, _all_hooks(adapter))
    for prompt in range(tokens.shape[0]):
        for layer in range(a.n_layers + 1):
            writes = component_writes(cache, adapter.weights, a, adapter, layer, prompt)
            n_pos = tokens.shape[1]
            assert writes.heads.shape == (layer, a.n_heads, n_pos, n_pos, a.d_model)
            assert writes.mlp.shape == (layer, n_pos, a.d_model) and writes.bias.shape == (layer, a.d_model)
            assert writes.embed.shape == (n_pos, a.d_model)
            # heads write nothing from source tokens after the destination (causal)
            assert _no_future(writes)
            if layer < a.n_layers:
                scale, want = (
                    cache[adapter.ln1_scale(layer)][prompt],
                    cache[adapter.ln1_normalized(layer)][prompt],
                )
            else:
                scale, want = (
                    cache[adapter.ln_final_scale()][prompt],
                    cache["ln_final.hook_normalized"][prompt],
                )
            got = writes.total() / scale
            if a.normalization == "LN":  # LayerNorm removes the mean: compare centred
                got, want = _center(got), _center(want)
            err = _rel_err(got, want)
            assert err < DTYPES[dtype], f"{builder} {dtype} layer {layer} prompt {prompt}: rel err {err:.2e}"


def _no_future(writes: ComponentWrites) -> bool:
    n_pos = writes.heads.shape[2]
    future = torch.ones(n_pos, n_pos, dtype=torch.bool).triu(1)
    return bool((writes.heads[:, :, future] == 0).all())


@pytest.mark.parametrize("builder", TINY)
def test_heads_sum_to_attention_output(builder: str) -> None:
    """Summed over heads and sources, plus b_O, the head writes are hook_attn_out (float64)."""
    adapter = load_tiny(builder, torch.float64)
    a = adapter.arch
    tokens = adapter.to_tokens(TEXTS[:1], prepend_bos=True)
    _, cache = adapter.run_with_cache(tokens, _all_hooks(adapter) + [adapter.attn_out(1)])
    writes = component_writes(cache, adapter.weights, a, adapter, 2, 0)
    got = writes.heads[1].sum((0, 2)) + writes.bias[1]
    assert _rel_err(got, cache[adapter.attn_out(1)][0]) < 1e-9
    assert torch.equal(writes.mlp[1], cache[adapter.mlp_out(1)][0])
    assert torch.equal(writes.embed, cache[adapter.resid_pre(0)][0])


def test_component_writes_errors() -> None:
    adapter = load_tiny("tiny-gpt2")
    a = adapter.arch
    with pytest.raises(KeyError, match="hook_pattern"):
        component_writes({adapter.resid_pre(0): torch.zeros(1, 3, a.d_model)}, adapter.weights, a, adapter, 1)
    with pytest.raises(ValueError, match="outside"):
        component_writes({}, adapter.weights, a, adapter, a.n_layers + 1)
    with pytest.raises(ValueError, match="scale"):
        head_writes(torch.ones(1, 2, 2), torch.ones(2, 1, 3), torch.ones(1, 3, 4), 1, post_gain=torch.ones(4))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int) -> Tensor:
    """GPT-NeoX rotary on the first rotary_dim dims: pairs (i, i + rotary_dim/2); x is [pos head d_head]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    rot = rot * cos[:, None] + rotated_half * sin[:, None]
    return torch.cat([rot, rest], dim=-1)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["float32", "float64"])
@pytest.mark.parametrize("builder", TINY)
def test_weights_reproduce_attention_scores(builder: str, dtype: torch.dtype) -> None:
    adapter = load_tiny(builder, dtype)
    a, w = adapter.arch, adapter.weights
    tokens = adapter.to_tokens(TEXTS, prepend_bos=True)
    n_pos = tokens.shape[1]
    names = [
        n for layer in range(a.n_layers) for n in (adapter.ln1_normalized(layer), adapter.attn_scores(layer))
    ]
    _, cache = adapter.run_with_cache(tokens, names)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for layer in range(a.n_layers):
        for prompt in range(tokens.shape[0]):
            x = cache[adapter.ln1_normalized(layer)][prompt]
            q = torch.einsum("pd,hde->phe", x, w.W_Q[layer]) + w.b_Q[layer]
            k = torch.einsum("pd,hde->phe", x, w.W_K[layer]) + w.b_K[layer]
            if a.rotary:
                cos, sin = adapter.rotary_cos_sin(n_pos)
                q, k = _rotate(q, cos, sin, a.rotary_dim), _rotate(k, cos, sin, a.rotary_dim)
            product = torch.einsum("qhe,khe->hqk", q, k)
            scores = cache[adapter.attn_scores(layer)][prompt]
            if a.attn_softcap is None:
                got, want = product, scores * a.attn_scale
            else:  # Gemma-2: hook_attn_scores is cap * tanh(q.k / attn_scale / cap)
                got, want = a.attn_softcap * torch.tanh(product / a.attn_scale / a.attn_softcap), scores
            err = _rel_err(got[:, causal], want[:, causal])
            assert err < tol, f"{builder} {dtype} layer {layer}: rel err {err:.2e}"
            assert torch.isinf(scores[:, ~causal]).all()  # causal mask applied in the hook
