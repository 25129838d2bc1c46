"""A GPT-2-family tokenizer read straight from a saved ``tokenizer.json``, without importing transformers.

Importing transformers and building its tokenizer object costs 2-3 s of a process start on a small
CPU; the ``tokenizers`` backend that does the actual work loads in a tenth of that. The fast-start path
of tracing (:mod:`attncomm.models.plain_model`) uses :class:`LightTokenizer`, which exposes the part of
the HF tokenizer interface attncomm's tasks use (``tokenizer(text, add_special_tokens=False,
return_offsets_mapping=...)``, ``decode``, the special tokens and their ids) on the same backend file,
so ids, offsets and decoded text are the HF tokenizer's own (tests compare both on every task and on
the whole vocabulary).

Only tokenizers whose HF class is GPT-2's are served (``tokenizer_class`` ``GPT2Tokenizer`` or
``GPT2TokenizerFast``, no clean-up of tokenization spaces): :func:`load_light_tokenizer` returns None
for anything else, and the caller loads the HF tokenizer instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: HF tokenizer classes whose behaviour is the backend's own for the calls attncomm makes
LIGHT_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token as saved in ``tokenizer_config.json``: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class LightTokenizer:
    """The HF tokenizer calls attncomm makes, served by a ``tokenizers.Tokenizer`` (see the module doc)."""

    is_fast = True

    def __init__(self, backend: Any, config: dict[str, Any], name_or_path: str) -> None:
        self._backend = backend
        self.name_or_path = name_or_path
        self.padding_side = "right"
        self.model_max_length = int(config.get("model_max_length") or 1024)
        self._special: dict[str, str | None] = {k: _token_text(config.get(k)) for k in _SPECIAL}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        self._additional = [t for t in (_token_text(v) for v in extra) if t is not None]

    def __getattr__(self, name: str) -> Any:
        """``bos_token``, ``bos_token_id`` etc. of the special tokens (None when the tokenizer has none)."""
        if name in _SPECIAL:
            return self._special[name]
        if name.endswith("_id") and name[:-3] in _SPECIAL:
            text = self._special[name[:-3]]
            return None if text is None else self._backend.token_to_id(text)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every special token, each once."""
        texts = [t for t in self._special.values() if t is not None] + self._additional
        ids = [self._backend.token_to_id(t) for t in texts]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def __len__(self) -> int:
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def __call__(
        self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False
    ) -> dict[str, list[Any]]:
        """``{"input_ids": [...]}`` (and ``"offset_mapping"``) of one text, as the HF tokenizer returns."""
        if not isinstance(text, str):
            raise TypeError(f"{type(self).__name__} encodes one str per call, got {type(text).__name__}")
        enc = self._backend.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, list[Any]] = {"input_ids": list(enc.ids), "attention_mask": [1] * len(enc.ids)}
        if return_offsets_mapping:
            out["offset_mapping"] = [tuple(o) for o in enc.offsets]
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (no clean-up of tokenization spaces: GPT-2's tokenizer does none)."""
        if isinstance(ids, int):
            ids = [ids]
        return str(self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """The vocabulary strings of ``ids``."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        """The ids of vocabulary strings."""
        return [self._backend.token_to_id(t) for t in tokens]


def load_light_tokenizer(directory: str | Path) -> LightTokenizer | None:
    """The tokenizer saved in ``directory`` as a :class:`LightTokenizer`, or None when it is not one of
    :data:`LIGHT_CLASSES` (or its files are missing or cleaning up tokenization spaces is on)."""
    directory = Path(directory)
    backend_file, config_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if not (backend_file.is_file() and config_file.is_file()):
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if config.get("tokenizer_class") not in LIGHT_CLASSES or config.get("clean_up_tokenization_spaces"):
        return None
    if config.get("add_bos_token") or config.get("add_prefix_space"):
        return None  # HF rebuilds the post-processor / pre-tokenizer for these: not the saved backend
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(backend_file))
    except Exception:  # noqa: BLE001 - a damaged file: the HF tokenizer reports it properly
        return None
    backend.no_padding()
    backend.no_truncation()
    return LightTokenizer(backend, config, str(directory))
