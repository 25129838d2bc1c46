"""Deterministic random test models, written as local HF-format directories.

Every builder seeds torch, instantiates an HF model class from a small config, perturbs the weights
that a default init leaves trivial (norm gains and biases, so that LayerNorm folding is exercised),
and saves the model with the offline GPT-2 tokenizer next to it. ``gpt2-small-random`` reproduces
``shared/tools/make_random_gpt2.py`` draw for draw, so its weights are bit-identical to that script's.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from attncomm.runtime.cache_root import built_model_dir

logger = logging.getLogger(__name__)

#: GPT-2's vocabulary size; every test model must accept every GPT-2 token id
GPT2_VOCAB = 50257
#: GPT-2's ``<|endoftext|>`` id, used as BOS/EOS/PAD for all test models
GPT2_EOT = 50256


def _perturb_norms(model: nn.Module, generator: torch.Generator, *, offset: float) -> None:
    """Replace the trivial init of every norm gain/bias with random values (seeded by ``generator``).

    ``offset`` is the gain's neutral value: 1 for LayerNorm, 0 for Gemma's ``(1 + w)`` RMSNorm.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            kind = type(module).__name__
            if "LayerNorm" not in kind and "RMSNorm" not in kind:
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                noise = torch.empty(weight.shape).uniform_(-0.3, 0.3, generator=generator)
                weight.copy_(offset + noise)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.empty(bias.shape).normal_(0.0, 0.1, generator=generator))
            logger.debug("perturbed norm %s", name)


def _scale_attention(model: nn.Module, q_scale: float) -> None:
    """Sharpen attention by scaling query projections (random heads otherwise attend near-uniformly)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.mul_(q_scale)


def build_tiny_gpt2() -> nn.Module:
    """A 3-layer GPT-2 (d_model 64, 4 heads, 128 positions, GPT-2 vocabulary) with random norms."""
    import transformers

    torch.manual_seed(1)
    cfg = transformers.GPT2Config(
        n_layer=3,
        n_embd=64,
        n_head=4,
        n_positions=128,
        vocab_size=GPT2_VOCAB,
        initializer_range=0.8 / 64**0.5,
        bos_token_id=GPT2_EOT,
        eos_token_id=GPT2_EOT,
        pad_token_id=GPT2_EOT,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :64].mul_(3.0)  # Conv1D [in, out]; out = [q | k | v]
    _perturb_norms(model, torch.Generator().manual_seed(11), offset=1.0)
    return model


def build_tiny_pythia() -> nn.Module:
    """A 3-layer GPT-NeoX (Pythia layout: rotary on 25% of d_head, parallel attention, padded vocab)."""
    import transformers

    torch.manual_seed(2)
    cfg = transformers.GPTNeoXConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        use_parallel_residual=True,
        vocab_size=50304,
        max_position_embeddings=128,
        initializer_range=0.8 / 64**0.5,
        bos_token_id=GPT2_EOT,
        eos_token_id=GPT2_EOT,
        pad_token_id=GPT2_EOT,
        tie_word_embeddings=False,
    )
    model = transformers.GPTNeoXForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            # fused qkv rows are per-head interleaved [q_h | k_h | v_h]; scaling all of it is simplest
            layer.attention.query_key_value.weight.mul_(2.0)
            layer.attention.query_key_value.bias.normal_(0.0, 0.1)
    _perturb_norms(model, torch.Generator().manual_seed(12), offset=1.0)
    return model


def build_tiny_gemma2() -> nn.Module:
    """A 2-layer Gemma-2 (GQA 4 query / 2 kv heads, head_dim 16, softcaps, post-norms, GPT-2 vocab)."""
    import transformers

    torch.manual_seed(3)
    cfg = transformers.Gemma2Config(
        vocab_size=GPT2_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=4096,
        max_position_embeddings=128,
        initializer_range=0.8 / 64**0.5,
        bos_token_id=GPT2_EOT,
        eos_token_id=GPT2_EOT,
        pad_token_id=GPT2_EOT,
        tie_word_embeddings=True,
    )
    model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        # nn.Embedding zeroes the padding_idx row; GPT-2's EOT is also our BOS, so give it a real vector
        model.model.embed_tokens.weight[GPT2_EOT].normal_(0.0, cfg.initializer_range)
    _scale_attention(model, 2.0)
    _perturb_norms(model, torch.Generator().manual_seed(13), offset=0.0)
    return model


def _perturb_attention_biases(model: nn.Module, generator: torch.Generator) -> None:
    """Give the q/k/v projection biases (zero at init) random values, so that bias handling is exercised."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.copy_(torch.empty(param.shape).normal_(0.0, 0.1, generator=generator))


def _llama_like(config_cls: type, model_cls: type, seed: int, **overrides: object) -> nn.Module:
    """A 2-layer model of the Llama family (RMSNorm, rotary, GQA, SwiGLU) with the GPT-2 vocabulary."""
    torch.manual_seed(seed)
    kwargs: dict[str, object] = {
        "vocab_size": GPT2_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "initializer_range": 0.8 / 64**0.5,
        "bos_token_id": GPT2_EOT,
        "eos_token_id": GPT2_EOT,
        "pad_token_id": GPT2_EOT,
    }
    kwargs.update(overrides)
    cfg = config_cls(**kwargs)
    model = model_cls(cfg)
    with torch.no_grad():
        # nn.Embedding zeroes the padding_idx row; GPT-2's EOT is also our BOS, so give it a real vector
        model.model.embed_tokens.weight[GPT2_EOT].normal_(0.0, cfg.initializer_range)
    _scale_attention(model, 2.0)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 10), offset=1.0)
    _perturb_attention_biases(model, torch.Generator().manual_seed(seed + 20))
    return model


def build_tiny_llama() -> nn.Module:
    """A 2-layer Llama (Llama-3 layout: GQA 4 query / 2 kv heads, no biases, tied embeddings)."""
    import transformers

    return _llama_like(
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        4,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        attention_bias=False,
    )


def build_tiny_qwen2() -> nn.Module:
    """A 2-layer Qwen2 (GQA 4 query / 2 kv heads, q/k/v biases, tied embeddings)."""
    import transformers

    return _llama_like(
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        5,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )


def build_tiny_mistral() -> nn.Module:
    """A 2-layer Mistral (GQA 4 query heads sharing 1 kv head, no biases, untied unembedding)."""
    import transformers

    return _llama_like(
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        6,
        num_key_value_heads=1,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        sliding_window=4096,
    )


def build_gpt2_small_random() -> nn.Module:
    """GPT-2 small shapes, built exactly as ``shared/tools/make_random_gpt2.py`` (same seed and draws)."""
    import transformers

    torch.manual_seed(0)
    std = 0.8 / 768**0.5
    cfg = transformers.GPT2Config(
        n_layer=12,
        n_embd=768,
        n_head=12,
        n_positions=1024,
        n_ctx=1024,
        vocab_size=GPT2_VOCAB,
        initializer_range=std,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, :768].mul_(4.0)
            block.attn.c_attn.bias[:768].mul_(4.0)
            block.attn.c_proj.weight.normal_(0.0, std).mul_(5.0)
            block.mlp.c_proj.weight.normal_(0.0, std).mul_(0.2)
    return model


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "tiny-gpt2": build_tiny_gpt2,
    "tiny-pythia": build_tiny_pythia,
    "tiny-gemma2": build_tiny_gemma2,
    "tiny-llama": build_tiny_llama,
    "tiny-qwen2": build_tiny_qwen2,
    "tiny-mistral": build_tiny_mistral,
    "gpt2-small-random": build_gpt2_small_random,
}


def write_model_dir(builder: str, directory: Path) -> Path:
    """Build ``builder``'s model and save it, with the offline GPT-2 tokenizer, into ``directory``."""
    from attncomm.models.gpt2_tokenizer import save_gpt2_tokenizer

    if builder not in BUILDERS:
        raise ValueError(
            f"unknown test-model builder {builder!r}; valid builders: {', '.join(sorted(BUILDERS))} "
            "(set model.builder to one of them, or use model.path=/local/hf/dir)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    model = BUILDERS[builder]()
    model.save_pretrained(directory)
    save_gpt2_tokenizer(str(directory))
    return directory


def build_model_dir(builder: str, cache_dir: Path) -> Path:
    """Return ``{cache_dir}/models/{builder}``, building it once (atomically: temp dir, then rename)."""
    if builder not in BUILDERS:
        raise ValueError(
            f"unknown test-model builder {builder!r}; valid builders: {', '.join(sorted(BUILDERS))} "
            "(set model.builder to one of them, or use model.path=/local/hf/dir)"
        )
    target = built_model_dir(builder, cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{builder}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        logger.info("building test model %s into %s", builder, target)
        write_model_dir(builder, tmp)
        try:
            tmp.rename(target)
        except OSError:
            # another process won the race: its directory is complete, keep it
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
