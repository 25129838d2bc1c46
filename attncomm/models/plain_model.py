"""Tracing's fast start: GPT-2-family models run by a plain forward from cached processed weights.

Loading a model through the TransformerLens bridge costs several seconds before any work: importing
transformers and TransformerLens, booting the bridge and scanning its hooks. Tracing reads only a
handful of activations of one plain forward pass (the embedding, each layer's normalised attention
input and its scale, the attention patterns and values, the MLP writes and the final norm's scale), so
for models whose processed forward is the textbook one (GPT-2: LayerNorm folded into the next weights,
learned positions, attention then MLP; :func:`~attncomm.analyses.resumable_forward.unsupported_reason`)
:class:`PlainModel` computes them itself, with the same tensor operations as the bridge.

Exactness is checked, not assumed. The first load (cold) goes through the bridge as always, builds the
plain model from the bridge's processed weights and compares every activation tracing reads, and the
logits, with the bridge's on probe prompts: only when all are bit for bit equal are the weights written
to ``{cache_dir}/weights/{model}-{key16}.plain.safetensors`` (same key as the processed-weight cache:
checkpoint content hash, TransformerLens/transformers/torch/attncomm versions, dtype; see
:mod:`attncomm.models.weight_cache`) and the plain model used. Later loads (warm) read that file and a
:class:`~attncomm.models.light_tokenizer.LightTokenizer`, importing neither transformers nor
TransformerLens. Cold and warm runs therefore trace with the same forward on the same tensors, and
that forward equals the bridge's on the probes. Any other model, a model with ``model.weight_cache=false``
or one whose plain forward does not match goes through the bridge (the log says why). A cache file that
cannot be read is deleted with one warning and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attncomm.analyses.resumable_forward import (
    MLP_FIELDS,
    block,
    embed,
    mlp_weights,
    norm_and_scale,
    stack_from,
    unembed,
)
from attncomm.core.types import ArchFacts, HeadWeights
from attncomm.models.hook_names import HookNames
from attncomm.runtime.config import ModelConfig

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter

logger = logging.getLogger(__name__)

__all__ = ["PLAIN_FORMAT", "PlainModel", "load_tracing_model", "plain_from_adapter", "plain_mismatch"]

#: bump when the plain cache file's layout changes
PLAIN_FORMAT = 1
#: the HeadWeights fields stored in the plain cache (the absent ``W_pos`` / ``ln1_post_gain`` never are)
_HEAD_FIELDS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_U", "b_U", "W_E", "W_pos")


def new_gelu(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU, written exactly as HF's ``NewGELUActivation`` (same operations, same rounding)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


#: HF ``activation_function`` names and the formula each HF module computes
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": new_gelu,
    "gelu": torch.nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
}

#: the hooks the plain forward computes in every block (the bridge's names and shapes) ...
LAYER_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "ln1.hook_scale",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)
#: ... and after the last one
FINAL_HOOKS = ("ln_final.hook_scale", "ln_final.hook_normalized")
_LAYER_ALTERNATIVES = "|".join(map(re.escape, LAYER_HOOKS))
_FINAL_ALTERNATIVES = "|".join(map(re.escape, FINAL_HOOKS))
_HOOK = re.compile(rf"^(?:blocks\.(?P<layer>\d+)\.(?:{_LAYER_ALTERNATIVES})|(?:{_FINAL_ALTERNATIVES}))$")


class PlainModel(HookNames):
    """A GPT-2-family model run without the bridge: architecture facts, processed weights, a tokenizer
    and :meth:`run_with_cache` for the hooks tracing reads (see the module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        arch: ArchFacts,
        weights: HeadWeights,
        mlp: dict[str, Tensor],
        eps: float,
        activation: str,
        tokenizer: Any,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.cfg = cfg
        self.short_name: str = cfg.short_name
        self.arch = arch
        self.weights = weights
        self.mlp = mlp
        self.eps = eps
        self.activation = activation
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.stack = stack_from(arch, weights, mlp, eps, ACTIVATIONS[activation])

    def tensors(self) -> dict[str, Tensor]:
        """The weights as stored in the plain cache file."""
        out = {f: getattr(self.weights, f) for f in _HEAD_FIELDS if getattr(self.weights, f) is not None}
        return out | dict(self.mlp)

    def run_with_cache(
        self, tokens: Int[Tensor, "batch pos"], names: Sequence[str]
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
        """Run without gradients, keeping only the requested hooks (``[batch pos ...]`` as the bridge's)."""
        wanted = set(names)
        bad = sorted(n for n in wanted if not _HOOK.match(n) or _layer_of(n) >= self.arch.n_layers)
        if bad:
            raise KeyError(
                f"the plain forward of model {self.cfg.name!r} does not compute hook(s) {bad}; it computes "
                "the residual stream, ln1/ln_final scale and normalized input, q/k/v/z/pattern, attn_out "
                "and mlp_out"
            )
        w = self.stack
        cache: dict[str, Tensor] = {}

        def keep(name: str, value: Tensor) -> None:
            if name in wanted:
                cache[name] = value

        with torch.no_grad():
            resid = embed(w, tokens.to(self.device))
            for layer in range(w.n_layers):
                prefix = f"blocks.{layer}."
                keep(prefix + "hook_resid_pre", resid)
                resid = block(w, layer, resid, record=functools.partial(_keep_as, keep, prefix))[0]
                keep(prefix + "hook_resid_post", resid)
            normalized, scale = norm_and_scale(resid, w.eps)
            keep("ln_final.hook_normalized", normalized)
            keep("ln_final.hook_scale", scale)
            logits = unembed(w, resid)
        return logits, cache


def _keep_as(keep: Callable[[str, Tensor], None], prefix: str, name: str, value: Tensor) -> None:
    keep(prefix + name, value)


def _layer_of(name: str) -> int:
    match = _HOOK.match(name)
    return int(match["layer"]) if match and match["layer"] is not None else -1


# ---- building from the bridge, and checking it ----------------------------------------------------


def _activation_name(source: Path) -> str | None:
    """The checkpoint's HF ``activation_function`` (GPT-2 configs name it), None when absent."""
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("activation_function")
    return name if isinstance(name, str) else None


def plain_from_adapter(model: ModelAdapter, source: Path) -> tuple[PlainModel | None, str | None]:
    """A :class:`PlainModel` over ``model``'s processed weights and tokenizer, or ``(None, why not)``.

    The plain model is returned only when :func:`plain_mismatch` finds it bit for bit equal to the bridge.
    """
    from attncomm.analyses.resumable_forward import unsupported_reason

    reason = unsupported_reason(model)
    if reason is not None:
        return None, f"the plain forward does not cover {reason}"
    activation = _activation_name(source)
    if activation not in ACTIVATIONS:
        return None, f"activation_function {activation!r} is not one the plain forward computes"
    plain = PlainModel(
        cfg=model.cfg,
        arch=model.arch,
        weights=model.weights,
        mlp=mlp_weights(model),
        eps=float(getattr(model.bridge.cfg, "eps", 1e-5)),
        activation=activation,
        tokenizer=model.tokenizer,
        device=model.device,
        dtype=model.dtype,
    )
    differs = plain_mismatch(model, plain)
    if differs:
        return None, f"its activations differ from the bridge's ({differs})"
    return plain, None


def probe_tokens(d_vocab: int, n_ctx: int) -> list[Int[Tensor, "batch pos"]]:
    """Deterministic probe prompts: a batch of 3 x 19 and one of 1 x 64 tokens (capped by ``n_ctx``)."""
    gen = torch.Generator().manual_seed(20261130)
    return [torch.randint(0, d_vocab, (b, min(n, n_ctx)), generator=gen) for b, n in ((3, 19), (1, 64))]


def plain_mismatch(model: ModelAdapter, plain: PlainModel) -> str | None:
    """The first hook (or ``logits``) where ``plain`` and the bridge differ on the probes, None when every
    hook tracing reads, every other hook both compute, and the logits are bit for bit equal."""
    L = model.arch.n_layers
    names = [f"blocks.{layer}.{hook}" for layer in range(L) for hook in LAYER_HOOKS] + list(FINAL_HOOKS)
    names = [n for n in names if n in model.bridge.hook_dict]
    for tokens in probe_tokens(model.arch.d_vocab, model.arch.n_ctx):
        theirs_logits, theirs = model.run_with_cache(tokens, names)
        ours_logits, ours = plain.run_with_cache(tokens, names)
        for name in names:
            if not torch.equal(ours[name], theirs[name].to(ours[name].device)):
                diff = float((ours[name] - theirs[name].to(ours[name].device)).abs().max())
                return f"{name} differs by up to {diff:.3g}"
        if not torch.equal(ours_logits, theirs_logits.to(ours_logits.device)):
            return "logits differ"
    return None


# ---- the plain cache file -------------------------------------------------------------------------


def plain_cache_file(cache_dir: Path, short_name: str, key: dict[str, Any]) -> Path:
    """``{cache_dir}/weights/{model}-{key16}.plain.safetensors`` (beside the processed-weight cache)."""
    from attncomm.models.weight_cache import cache_file

    path = cache_file(cache_dir, short_name, key)
    return path.with_name(path.name.removesuffix(".safetensors") + ".plain.safetensors")


def plain_key(source: Path, dtype: torch.dtype, cache_dir: Path) -> dict[str, Any]:
    """The processed-weight cache key plus the plain file's format."""
    from attncomm.models.weight_cache import cache_key

    return {**cache_key(source, dtype, Path(cache_dir) / "weights"), "plain_format": PLAIN_FORMAT}


def save_plain(path: Path, plain: PlainModel, key: dict[str, Any]) -> None:
    """Write ``plain``'s weights and facts atomically (a failure is logged, never raised)."""
    from attncomm.models.weight_cache import save_tensors

    meta = {
        "key": json.dumps(key, sort_keys=True),
        "arch": json.dumps(dataclasses.asdict(plain.arch), sort_keys=True),
        "eps": repr(plain.eps),
        "activation": plain.activation,
    }
    try:
        save_tensors(path, plain.tensors(), meta)
        logger.info("plain forward of %s cached in %s", plain.short_name, path)
    except (OSError, RuntimeError, ValueError) as err:
        logger.warning("could not write the plain-forward cache %s (%s); continuing without it", path, err)


def read_plain(
    path: Path, key: dict[str, Any], cfg: ModelConfig, tokenizer: Any, device: str, dtype: torch.dtype
) -> PlainModel:
    """Read a plain cache file; raise ``ValueError`` for anything that is not exactly what was written."""
    from attncomm.models.weight_cache import read_tensors

    tensors, meta = read_tensors(path, key, device)
    try:
        arch = ArchFacts(**json.loads(meta["arch"]))
        eps = float(meta["eps"])
        activation = meta["activation"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"its metadata is incomplete ({err})") from err
    missing = [f for f in (*_HEAD_FIELDS, *MLP_FIELDS) if f not in tensors]
    if missing:
        raise ValueError(f"it lacks {missing}")
    if any(t.dtype != dtype for t in tensors.values()):
        raise ValueError(f"its tensors are not {dtype}")
    weights = HeadWeights(**{f: tensors[f] for f in _HEAD_FIELDS}, ln1_post_gain=None)
    mlp = {f: tensors[f] for f in MLP_FIELDS}
    return PlainModel(cfg, arch, weights, mlp, eps, activation, tokenizer, device, dtype)


# ---- loading for tracing --------------------------------------------------------------------------


def _local_source(cfg: ModelConfig, root: Path) -> Path | None:
    """The checkpoint directory when it is already on disk (nothing built or downloaded), else None."""
    from attncomm.runtime.cache_root import built_model_dir

    if cfg.path:
        path = Path(cfg.path).expanduser()
        return path if (path / "config.json").is_file() else None
    if cfg.builder:
        path = built_model_dir(cfg.builder, root)
        return path if (path / "config.json").is_file() else None
    if cfg.hf_name:
        from attncomm.models.adapter import resolve_model_dir

        with contextlib.suppress(Exception):  # not cached: the bridge path reports it properly
            source = resolve_model_dir(cfg, root)
            return source if isinstance(source, Path) else None
    return None


def _light_tokenizer(cfg: ModelConfig, source: Path, root: Path) -> Any | None:
    """The model's tokenizer without transformers when it is saved and GPT-2's (None otherwise)."""
    from attncomm.models.adapter import tokenizer_location
    from attncomm.models.light_tokenizer import load_light_tokenizer

    where = tokenizer_location(cfg, source, root)
    return load_light_tokenizer(where) if Path(where).is_dir() else None


def _hf_tokenizer(cfg: ModelConfig, source: Path, root: Path) -> Any:
    from attncomm.models.adapter import _load_tokenizer

    return _load_tokenizer(cfg, source, root)


#: texts the light tokenizer is checked on at a cold start (the tests check whole task prompt sets)
PROBE_TEXTS = (
    "When Mary and John went to the store, John gave a drink to Mary",
    " The war lasted from the year 1732 to the year 17",
    "So, Dr. O'Neil -- who'd said \"no\" twice -- tried   again\n\tat 3:45pm? <|endoftext|> é ü 漢字 🙂",
)


def tokenizer_mismatch(hf: Any, light: Any) -> str | None:
    """Where the light tokenizer disagrees with the HF one on :data:`PROBE_TEXTS` and the special
    tokens, None when it does not."""
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids"):
        if getattr(hf, attr, None) != getattr(light, attr):
            return f"the light tokenizer's {attr} differs from the HF tokenizer's"
    for text in PROBE_TEXTS:
        theirs = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ours = light(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in theirs["offset_mapping"]]
        if list(theirs["input_ids"]) != ours["input_ids"] or offsets != ours["offset_mapping"]:
            return f"the light tokenizer encodes {text!r} differently"
        if hf.decode(ours["input_ids"]) != light.decode(ours["input_ids"]):
            return f"the light tokenizer decodes {text!r} differently"
    return None


def load_tracing_model(
    cfg: ModelConfig, device: str = "cpu", dtype: torch.dtype = torch.float32, cache_dir: Path | None = None
) -> PlainModel | ModelAdapter:
    """The model as tracing runs it: a :class:`PlainModel` when the family allows and its forward equals
    the bridge's (from the plain cache when warm), else the bridge's :class:`ModelAdapter`."""
    from attncomm.models.adapter import load_model
    from attncomm.models.architectures import read_family, resolve_model_config
    from attncomm.runtime.cache_root import default_cache_dir

    cfg = resolve_model_config(cfg)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not cfg.weight_cache:
        logger.info("tracing through the bridge: model.weight_cache=false")
        return load_model(cfg, device=device, dtype=dtype, cache_dir=root)
    source = _local_source(cfg, root)
    path = key = None
    if source is not None and read_family(source) == "gpt2":
        cfg = dataclasses.replace(cfg, family="gpt2")
        key = plain_key(source, dtype, root)
        path = plain_cache_file(root, cfg.short_name, key)
        if path.is_file():
            tokenizer = _light_tokenizer(cfg, source, root) or _hf_tokenizer(cfg, source, root)
            try:
                plain = read_plain(path, key, cfg, tokenizer, device, dtype)
                logger.debug("plain forward of %s read from %s", cfg.short_name, path)
                return plain
            except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt, never used
                logger.warning("plain-forward cache file %s is unusable (%s); rebuilding it", path, err)
                with contextlib.suppress(OSError):
                    path.unlink()
    model = load_model(cfg, device=device, dtype=dtype, cache_dir=root)
    if model.cfg.family != "gpt2":
        return model
    source = _local_source(model.cfg, root)  # now built or downloaded
    if source is None:
        return model
    plain, why = plain_from_adapter(model, source)
    if plain is None:
        logger.info("tracing %s through the bridge: %s", cfg.short_name, why)
        return model
    light = _light_tokenizer(model.cfg, source, root)
    if light is not None:  # what a warm start reads: use it from the first run on
        differs = tokenizer_mismatch(model.tokenizer, light)
        if differs:
            logger.info("tracing %s through the bridge: %s", cfg.short_name, differs)
            return model
        plain.tokenizer = light
    key = key or plain_key(source, dtype, root)
    save_plain(path or plain_cache_file(root, model.cfg.short_name, key), plain, key)
    return plain
