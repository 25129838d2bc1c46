"""The model adapter and the test-model builders: loading paths, facts, hook names, tokens, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from attncomm.models.adapter import ModelAdapter, ModelNotAvailableError, load_model
from attncomm.models.gpt2_tokenizer import gpt2_tokenizer, save_gpt2_tokenizer
from attncomm.models.random_models import BUILDERS, build_model_dir
from attncomm.runtime.config import ModelConfig
from tests.conftest import shared_path
from tests.models_fixtures import LLAMA_LIKE, load_tiny, test_cache_dir

TINY = ["tiny-gpt2", "tiny-pythia", "tiny-gemma2", *LLAMA_LIKE]
TEXTS = ["When Mary and John went to the store, John gave a drink to", "The war lasted from 1732 to 17"]


def _hf_config(builder: str) -> dict:
    return json.loads((build_model_dir(builder, test_cache_dir()) / "config.json").read_text())


# ---- builders --------------------------------------------------------------------------------


def test_unknown_builder_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny-gpt2") as err:
        build_model_dir("tiny-nonsense", tmp_path)
    assert "tiny-nonsense" in str(err.value)


def test_build_is_deterministic_and_reused(tmp_path: Path) -> None:
    a = build_model_dir("tiny-gemma2", tmp_path / "a")
    b = build_model_dir("tiny-gemma2", tmp_path / "b")
    assert a == tmp_path / "a" / "models" / "tiny-gemma2"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_model_dir("tiny-gemma2", tmp_path / "a") == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.cli
def test_gpt2_small_random_is_bit_identical_to_shared_script(tmp_path: Path) -> None:
    script = shared_path("tools", "make_random_gpt2.py")
    ref_dir = tmp_path / "script"
    subprocess.run([sys.executable, str(script), str(ref_dir)], check=True, capture_output=True)
    ours = build_model_dir("gpt2-small-random", tmp_path / "cache")
    ref, got = load_file(ref_dir / "model.safetensors"), load_file(ours / "model.safetensors")
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"tensors differ from the shared script's: {different[:5]}"
    assert json.loads((ref_dir / "config.json").read_text()) == json.loads((ours / "config.json").read_text())
    tok_ref = transformers.AutoTokenizer.from_pretrained(ref_dir)
    tok_ours = transformers.AutoTokenizer.from_pretrained(ours)
    for text in TEXTS:
        assert tok_ref(text)["input_ids"] == tok_ours(text)["input_ids"]


# ---- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", TINY)
def test_bridge_logits_match_hf_model(builder: str) -> None:
    """Compatibility mode shifts logits by a per-position constant (center_unembed) at most."""
    adapter = load_tiny(builder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        build_model_dir(builder, test_cache_dir()), attn_implementation="eager"
    ).eval()
    tokens = adapter.to_tokens(TEXTS, prepend_bos=True)
    with torch.no_grad():
        ours = adapter.run_with_hooks(tokens, [])
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.log_softmax(-1), theirs.log_softmax(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_load_arbitrary_local_hf_dir(tmp_path: Path) -> None:
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    save_gpt2_tokenizer(str(tmp_path))
    adapter = load_model(ModelConfig(name="mine", short_name="mine", family="gpt2", path=str(tmp_path)))
    assert (adapter.arch.n_layers, adapter.arch.n_heads, adapter.arch.d_model, adapter.arch.n_ctx) == (
        2,
        2,
        32,
        64,
    )
    logits, _ = adapter.run_with_cache(adapter.to_tokens("Hello world", prepend_bos=True), [])
    assert logits.shape == (1, 3, 50257)


@pytest.mark.slow
def test_gpt2_offline_tokenizer_option(tmp_path: Path) -> None:
    cfg = ModelConfig(name="t", short_name="t", family="gpt2", builder="tiny-gpt2", tokenizer="gpt2-offline")
    adapter = load_model(cfg, cache_dir=test_cache_dir())
    assert adapter.tokenizer("Hello world")["input_ids"] == gpt2_tokenizer()("Hello world")["input_ids"]


def test_missing_hf_model_offline_raises_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cfg = ModelConfig(name="ghost", short_name="ghost", family="gpt2", hf_name="attncomm-tests/no-such-model")
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(cfg)
    message = str(err.value)
    for expected in [
        "ghost",
        "attncomm-tests/no-such-model",
        str(tmp_path / "hf" / "hub"),
        "model.path=",
        "HF_HUB_OFFLINE=1",
    ]:
        assert expected in message, f"{expected!r} missing from: {message}"


def test_bad_local_path_raises_clear_error(tmp_path: Path) -> None:
    cfg = ModelConfig(name="nowhere", short_name="nowhere", family="gpt2", path=str(tmp_path / "absent"))
    with pytest.raises(ModelNotAvailableError, match="absent"):
        load_model(cfg)


def test_config_without_weights_source_raises() -> None:
    with pytest.raises(ValueError, match="model.path"):
        load_model(ModelConfig(name="empty", short_name="empty", family="gpt2"))


# ---- facts -----------------------------------------------------------------------------------


def test_arch_facts_gpt2(tiny_gpt2: ModelAdapter) -> None:
    hf = _hf_config("tiny-gpt2")
    a = tiny_gpt2.arch
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.d_model) == (
        hf["n_layer"],
        hf["n_head"],
        hf["n_head"],
        hf["n_embd"],
    )
    assert (a.d_head, a.d_vocab, a.n_ctx) == (
        hf["n_embd"] // hf["n_head"],
        hf["vocab_size"],
        hf["n_positions"],
    )
    assert a.normalization == "LN" and not a.rotary and a.rotary_dim is None and not a.parallel_attn
    assert not a.post_attn_norm and a.attn_softcap is None and a.final_softcap is None
    assert a.embed_scale == 1.0 and a.has_attn_bias and a.attn_scale == math.sqrt(a.d_head)
    w = tiny_gpt2.weights
    assert (
        w.W_pos is not None and w.W_pos.shape == (hf["n_positions"], hf["n_embd"]) and w.ln1_post_gain is None
    )


def test_arch_facts_pythia(tiny_pythia: ModelAdapter) -> None:
    hf = _hf_config("tiny-pythia")
    a = tiny_pythia.arch
    d_head = hf["hidden_size"] // hf["num_attention_heads"]
    assert (a.n_layers, a.n_heads, a.d_model, a.d_head) == (
        hf["num_hidden_layers"],
        hf["num_attention_heads"],
        hf["hidden_size"],
        d_head,
    )
    assert a.d_vocab == hf["vocab_size"] == 50304 and a.n_ctx == hf["max_position_embeddings"]
    rope = hf["rope_parameters"]
    assert a.rotary and a.rotary_dim == int(d_head * rope["partial_rotary_factor"]) == 4
    assert a.rotary_base == rope["rope_theta"] and not a.rotary_adjacent_pairs
    assert a.parallel_attn and a.normalization == "LN" and not a.post_attn_norm and a.has_attn_bias
    assert a.attn_scale == math.sqrt(d_head) and a.embed_scale == 1.0 and tiny_pythia.weights.W_pos is None


def test_arch_facts_gemma2(tiny_gemma2: ModelAdapter) -> None:
    hf = _hf_config("tiny-gemma2")
    a = tiny_gemma2.arch
    assert (a.n_heads, a.n_kv_heads, a.d_head) == (
        hf["num_attention_heads"],
        hf["num_key_value_heads"],
        hf["head_dim"],
    )
    assert a.n_kv_heads < a.n_heads and a.kv_group_size == a.n_heads // a.n_kv_heads
    assert a.normalization == "RMS" and a.rotary and a.rotary_dim == hf["head_dim"] and a.post_attn_norm
    assert a.attn_softcap == hf["attn_logit_softcapping"] and a.final_softcap == hf["final_logit_softcapping"]
    assert a.attn_scale == pytest.approx(hf["query_pre_attn_scalar"] ** 0.5)
    assert a.embed_scale == pytest.approx(hf["hidden_size"] ** 0.5) and not a.has_attn_bias
    w = tiny_gemma2.weights
    assert w.W_K.shape == w.W_Q.shape  # GQA expanded to query heads
    g = a.kv_group_size
    for h in range(a.n_heads):
        assert torch.equal(w.W_K[:, h], w.W_K[:, (h // g) * g]) and torch.equal(
            w.W_V[:, h], w.W_V[:, (h // g) * g]
        )
    assert not torch.equal(w.W_K[:, 0], w.W_K[:, g])
    assert all(float(t.abs().max()) == 0.0 for t in (w.b_Q, w.b_K, w.b_V, w.b_O))
    # the post-attention gain is the HF checkpoint's (1 + w), untouched by processing
    raw = load_file(build_model_dir("tiny-gemma2", test_cache_dir()) / "model.safetensors")
    expected = torch.stack(
        [1 + raw[f"model.layers.{i}.post_attention_layernorm.weight"] for i in range(a.n_layers)]
    )
    torch.testing.assert_close(w.ln1_post_gain, expected)
    # hook_embed is W_E scaled at run time
    tokens = tiny_gemma2.to_tokens(TEXTS[:1], prepend_bos=True)
    _, cache = tiny_gemma2.run_with_cache(tokens, [tiny_gemma2.resid_pre(0)])
    torch.testing.assert_close(cache[tiny_gemma2.resid_pre(0)][0], w.W_E[tokens[0]] * a.embed_scale)


@pytest.mark.parametrize("builder", TINY)
def test_describe(builder: str) -> None:
    adapter = load_tiny(builder)
    info = adapter.describe()
    assert info["n_layers"] == adapter.arch.n_layers and info["short_name"] == builder
    hf = transformers.AutoModelForCausalLM.from_pretrained(build_model_dir(builder, test_cache_dir()))
    assert info["n_params"] == sum(p.numel() for p in hf.parameters())
    json.dumps(info)  # plain values only


# ---- hooks, tokens, running ------------------------------------------------------------------


@pytest.mark.parametrize("builder", TINY)
def test_hook_names_exist(builder: str) -> None:
    adapter = load_tiny(builder)
    names = [adapter.ln_final_scale()]
    for layer in range(adapter.arch.n_layers):
        for helper in [
            "resid_pre",
            "ln1_normalized",
            "ln1_scale",
            "attn_scores",
            "pattern",
            "q",
            "k",
            "v",
            "z",
        ]:
            names.append(getattr(adapter, helper)(layer))
        names += [adapter.attn_out(layer), adapter.mlp_out(layer)]
        if adapter.arch.post_attn_norm:
            names.append(adapter.ln1_post_scale(layer))
        names += [f"blocks.{layer}.hook_q_input", f"blocks.{layer}.hook_k_input"]
    missing = [n for n in names if n not in adapter.bridge.hook_dict]
    assert not missing
    if not adapter.arch.post_attn_norm:
        with pytest.raises(ValueError, match="post-attention"):
            adapter.ln1_post_scale(0)
    tokens = adapter.to_tokens(TEXTS, prepend_bos=True)
    non_split = [n for n in names if "_input" not in n]
    _, cache = adapter.run_with_cache(tokens, non_split)
    assert set(cache) == set(non_split)
    a, (batch, n_pos) = adapter.arch, tokens.shape
    assert cache[adapter.pattern(0)].shape == (batch, a.n_heads, n_pos, n_pos)
    assert cache[adapter.q(0)].shape == (batch, n_pos, a.n_heads, a.d_head)
    assert cache[adapter.k(0)].shape == (batch, n_pos, a.n_kv_heads, a.d_head)
    assert cache[adapter.ln1_scale(0)].shape == (batch, n_pos, 1)


def test_unknown_hook_is_a_clear_error(tiny_gpt2: ModelAdapter) -> None:
    tokens = tiny_gpt2.to_tokens("Hi", prepend_bos=True)
    with pytest.raises(KeyError, match="blocks.0.no_such_hook"):
        tiny_gpt2.run_with_cache(tokens, ["blocks.0.no_such_hook"])


def test_to_tokens_right_pads_and_prepends_bos(tiny_pythia: ModelAdapter) -> None:
    tok = gpt2_tokenizer()
    ids = [tok(t)["input_ids"] for t in TEXTS]
    with_bos = tiny_pythia.to_tokens(TEXTS, prepend_bos=True)
    without = tiny_pythia.to_tokens(TEXTS, prepend_bos=False)
    width = max(len(i) for i in ids)
    assert with_bos.shape == (2, width + 1) and without.shape == (2, width)
    for row, i in enumerate(ids):
        assert with_bos[row].tolist() == [50256] + i + [50256] * (width - len(i))
        assert without[row, : len(i)].tolist() == i


@pytest.mark.parametrize("builder", TINY)
def test_right_padding_does_not_change_real_tokens(builder: str) -> None:
    adapter = load_tiny(builder)
    batch = adapter.to_tokens(TEXTS, prepend_bos=True)
    short = int(torch.argmin(torch.tensor([len(t) for t in TEXTS])))
    alone = adapter.to_tokens(TEXTS[short], prepend_bos=True)
    n = alone.shape[1]
    assert torch.equal(batch[short, :n], alone[0])
    torch.testing.assert_close(
        adapter.run_with_hooks(batch, [])[short, :n],
        adapter.run_with_hooks(alone, [])[0],
        atol=1e-5,
        rtol=1e-5,
    )


def test_run_with_hooks_can_patch(tiny_gpt2: ModelAdapter) -> None:
    tokens = tiny_gpt2.to_tokens(TEXTS[:1], prepend_bos=True)
    clean = tiny_gpt2.run_with_hooks(tokens, [])
    zeroed = tiny_gpt2.run_with_hooks(tokens, [(tiny_gpt2.mlp_out(0), lambda t, hook: torch.zeros_like(t))])
    assert not torch.allclose(clean, zeroed)
    torch.testing.assert_close(tiny_gpt2.run_with_hooks(tokens, []), clean)  # hooks removed afterwards


@pytest.mark.parametrize("builder", ["tiny-pythia", "tiny-gemma2", *LLAMA_LIKE])
def test_rotary_cos_sin_are_the_models_tables(builder: str) -> None:
    adapter = load_tiny(builder)
    a = adapter.arch
    tokens = adapter.to_tokens(TEXTS, prepend_bos=True)
    n = tokens.shape[1]
    cos, sin = adapter.rotary_cos_sin(n)
    assert cos.shape == sin.shape == (n, a.rotary_dim)
    _, cache = adapter.run_with_cache(tokens, ["blocks.0.attn.hook_cos", "blocks.0.attn.hook_sin"])
    assert torch.equal(cache["blocks.0.attn.hook_cos"][0], cos) and torch.equal(
        cache["blocks.0.attn.hook_sin"][0], sin
    )
    # and the textbook NeoX tables: frequencies base^(-2i/rotary_dim), halves duplicated
    freqs = a.rotary_base ** (-torch.arange(0, a.rotary_dim, 2, dtype=torch.float64) / a.rotary_dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]
    torch.testing.assert_close(cos.double(), torch.cat([angles.cos(), angles.cos()], -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(sin.double(), torch.cat([angles.sin(), angles.sin()], -1), atol=1e-5, rtol=0)


def test_rotary_cos_sin_refuses_absolute_positions(tiny_gpt2: ModelAdapter) -> None:
    with pytest.raises(ValueError, match="no rotary"):
        tiny_gpt2.rotary_cos_sin(4)


@pytest.mark.parametrize("builder", ["tiny-gpt2", "tiny-gemma2", "tiny-qwen2"])
def test_split_qkv_inputs(builder: str) -> None:
    """q_input/k_input turn on per-head inputs; logits are unchanged (fresh model: state changes)."""
    adapter = load_model(
        ModelConfig(name=builder, short_name=builder, family="x", builder=builder), cache_dir=test_cache_dir()
    )
    tokens = adapter.to_tokens(TEXTS, prepend_bos=True)
    before = adapter.run_with_hooks(tokens, [])
    names = [adapter.q_input(1), adapter.k_input(1)]
    after, cache = adapter.run_with_cache(tokens, names)
    a = adapter.arch
    assert cache[names[0]].shape == (*tokens.shape, a.n_heads, a.d_model)
    assert cache[names[1]].shape == (*tokens.shape, a.n_kv_heads, a.d_model)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    # per-head copies of the residual entering the layer
    _, resid = adapter.run_with_cache(tokens, [adapter.resid_pre(1)])
    torch.testing.assert_close(cache[names[0]][:, :, 0], resid[adapter.resid_pre(1)])


def test_builders_registry_matches_docs() -> None:
    assert set(BUILDERS) == {
        "tiny-gpt2", "tiny-pythia", "tiny-gemma2", "tiny-llama", "tiny-qwen2", "tiny-mistral",
        "gpt2-small-random",
    }  # fmt: skip
