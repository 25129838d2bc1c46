"""Load a transformer through TransformerLens 4.3 and present one uniform view of it (the ONE place
that touches TransformerLens).

A model is booted with ``TransformerBridge.boot_transformers(local_dir, tokenizer=...)`` and then
``enable_compatibility_mode()``, which applies HookedTransformer's processing (``fold_ln``,
``center_writing_weights``, ``center_unembed``, ``fold_value_biases``). Everything is booted from a
local HF-format directory: ``model.path``, a directory built by
:mod:`attncomm.models.random_models`, or the HF cache snapshot of ``model.hf_name``.

Supported families (:mod:`attncomm.models.architectures`, read from the checkpoint's ``config.json``):
GPT-2, GPT-NeoX (Pythia), Gemma-2, and the Llama family (Llama-2/3.x, Qwen2/2.5, Mistral): any local
HF checkpoint of them loads with ``model=hf model.path=DIR``.

Facts verified on random GPT-2 / GPT-NeoX (Pythia) / Gemma-2 / Llama / Qwen2 / Mistral checkpoints with
transformer_lens 4.3.0 and transformers 5.23.0 (the tests in ``tests/test_models.py``,
``tests/test_residual.py`` and the exactness tests check them):

- Hook names are the same for every family: ``blocks.{l}.hook_resid_pre``,
  ``blocks.{l}.ln1.hook_normalized`` / ``hook_scale``, ``blocks.{l}.attn.hook_{q,k,v,z}``,
  ``hook_attn_scores``, ``hook_pattern``, ``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_mlp_out``,
  ``ln_final.hook_scale``. Gemma-2 adds ``blocks.{l}.ln1_post.*`` / ``ln2_post.*``; rotary models add
  ``blocks.{l}.attn.hook_cos`` / ``hook_sin``; Gemma-2 and the Llama family
  (PositionEmbeddingsAttentionBridge) have ``hook_rot_q`` / ``hook_rot_k``. GPT-NeoX has no
  ``hook_resid_mid`` (parallel attention).
- The Llama family: RMSNorm with the gain stored as is (folded into ``W_Q`` / ``W_K`` / ``W_V``), rotary
  on the whole head in the NeoX layout (HF's ``rotate_half``), GQA, ``attn_scale = sqrt(d_head)``, no
  biases except Qwen2's q/k/v biases (``b_V`` is folded into ``b_O`` as for every family).
- ``hook_q`` / ``hook_k`` are taken BEFORE the rotary rotation. For GQA models ``hook_k`` / ``hook_v``
  hold ``n_kv_heads`` heads; query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``
  (``repeat_interleave`` layout). The bridge's stacked ``W_K`` / ``W_V`` are grouped; the adapter's
  :class:`HeadWeights` expands them to query heads.
- ``ln1.hook_normalized`` is ``(x - mean) / scale`` (LayerNorm) or ``x / scale`` (RMSNorm), WITHOUT the
  norm gain: after ``fold_ln`` the LayerNorm gain is 1 and bias 0; Gemma's RMSNorm weights are stored
  as offsets (gain ``1 + w``) and folding sets ``w = 0``, so ``hook_normalized`` equals ``hook_out``
  up to rounding and the gain lives in ``W_Q`` / ``W_K`` / ``W_V``.
- Gemma-2's post-attention norm ``ln1_post`` cannot be folded: its gain ``1 + w`` stays in the norm
  (exposed as ``HeadWeights.ln1_post_gain``). ``hook_attn_out`` / ``hook_mlp_out`` are the outputs of
  ``ln1_post`` / ``ln2_post``, i.e. the true writes into the residual stream, so a head writes
  ``A[t,t'] v(t') W_O * gain / ln1_post.hook_scale[t]``.
- HF's Gemma2RMSNorm computes in float32 even for a float64 model; for ``dtype=float64`` the adapter
  switches the RMS norm bridges to TransformerLens's own (dtype-preserving) implementation so that
  float64 runs are float64 throughout. Attention softmax is done in float32 by the bridge in every
  dtype (``hook_pattern`` carries that rounding; the ACC maths uses ``hook_pattern`` itself).
- ``hook_attn_scores`` are pre-softmax, already divided by ``attn_scale``: ``sqrt(d_head)`` for GPT-2 and
  NeoX, ``sqrt(query_pre_attn_scalar)`` for Gemma-2 (the HF module's ``scaling``), and for Gemma-2
  AFTER the tanh softcap (``cap * tanh(s / cap)``), with the causal mask applied.
- ``W_E`` is unscaled for Gemma-2: HF's scaled embedding multiplies by ``sqrt(d_model)`` at run time,
  so ``hook_embed`` / ``blocks.0.hook_resid_pre`` are scaled (``ArchFacts.embed_scale``).
- Rotary layout: GPT-NeoX pairing ``(i, i + rotary_dim / 2)`` on the first ``rotary_dim`` dims of each
  head (NeoX: ``rotary_pct * d_head``), cos/sin tables ``cat(freqs, freqs)`` from the HF rotary module,
  computed in float32 from a float32 ``inv_freq`` then cast to the model dtype.
- ``center_unembed`` is disabled by TransformerLens for models with a final logit softcap (Gemma-2).
- Bias-free models (Gemma-2) expose no ``b_Q`` / ``b_K`` / ``b_V`` / ``b_O``; :class:`HeadWeights` uses
  zeros. ``fold_value_biases`` leaves ``b_V = 0`` and moves it into ``b_O``.
- With right padding and a tensor input the bridge passes no attention mask, so real tokens are
  unaffected by padding (causal attention) even though GPT-2's pad id equals its BOS id.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attncomm.core.types import ArchFacts, HeadWeights
from attncomm.errors import AttncommError
from attncomm.models.architectures import family_of_config, read_family, resolve_model_config
from attncomm.models.hook_names import HookNames
from attncomm.runtime.cache_root import default_cache_dir
from attncomm.runtime.config import ModelConfig

if TYPE_CHECKING:  # transformers is imported where a tokenizer is loaded (not on tracing's fast start)
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

HookFn = Callable[[Tensor, Any], Tensor | None]


class ModelNotAvailableError(AttncommError, RuntimeError):
    """The weights of a model cannot be found (offline, not in the HF cache, or a bad local path)."""


def _hf_hub_cache() -> Path:
    """The HF hub cache directory as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or str(
        Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def _hf_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network access."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _not_available(cfg: ModelConfig, where: str, cause: str) -> ModelNotAvailableError:
    """Build the error that says which model is missing, where we looked, and the two ways to fix it."""
    return ModelNotAvailableError(
        f"weights of model {cfg.name!r} are not available: {cause}. Looked in: {where}. "
        f"Fix it in one of two ways: (1) point to a local HF-format directory with "
        f"model.path=/local/hf/dir, or (2) on a machine with network access populate the HF cache "
        f"(e.g. `huggingface-cli download {cfg.hf_name or '<repo id>'}`), copy it to this machine's "
        f"HF cache ({_hf_hub_cache()}) and set HF_HUB_OFFLINE=1."
    )


def resolve_model_dir(cfg: ModelConfig, cache_dir: Path | None = None) -> Path | str:
    """Where the weights come from: ``cfg.path`` > ``cfg.builder`` (built into cache_dir) > ``cfg.hf_name``.

    Returns a local directory, or the hub id itself when online and not yet cached.
    """
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise _not_available(
                cfg, f"model.path={path}", "the directory does not exist or has no config.json"
            )
        return path
    if cfg.builder:
        from attncomm.models.random_models import BUILDERS, build_model_dir

        if cfg.builder not in BUILDERS:
            raise ValueError(
                f"model {cfg.name!r}: unknown model.builder={cfg.builder!r}; valid builders: "
                f"{', '.join(sorted(BUILDERS))}"
            )
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return build_model_dir(cfg.builder, root)
    if cfg.hf_name:
        return _resolve_hub(cfg)
    from attncomm.models.random_models import BUILDERS

    raise ValueError(
        f"model {cfg.name!r} names no weights: set model.path (local HF dir), model.builder "
        f"({', '.join(sorted(BUILDERS))}) or model.hf_name"
    )


def _resolve_hub(cfg: ModelConfig) -> Path | str:
    """Return the cached snapshot of ``cfg.hf_name`` (offline), or the hub id (online: HF downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    assert cfg.hf_name is not None
    cache = _hf_hub_cache()
    where = f"hub id {cfg.hf_name!r} (revision {cfg.revision or 'main'}), HF cache {cache}"
    try:
        return Path(
            snapshot_download(
                cfg.hf_name,
                revision=cfg.revision,
                cache_dir=str(cache),
                local_files_only=True,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken"],
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError, OSError) as err:
        if _hf_offline():
            raise _not_available(cfg, where, "not in the HF cache and HF_HUB_OFFLINE=1") from err
        if not _hub_reachable():
            raise _not_available(cfg, where, "not in the HF cache and the HF hub is not reachable") from err
    return cfg.hf_name


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF hub (``HF_ENDPOINT``) accepts a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_gpt2_tokenizer_dir(root: Path) -> Path:
    """``{root}/tokenizers/gpt2-offline``: the offline GPT-2 tokenizer saved once (atomically).

    TransformerLens only accepts a tokenizer loaded from disk, and remembers its directory, so the
    directory must outlive the model.
    """
    target = root / "tokenizers" / "gpt2-offline"
    if not (target / "tokenizer_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".gpt2-offline-", dir=target.parent))
        from attncomm.models.gpt2_tokenizer import save_gpt2_tokenizer

        save_gpt2_tokenizer(str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def tokenizer_location(cfg: ModelConfig, source: Path | str, cache_root: Path) -> Path | str:
    """Where ``cfg``'s tokenizer is read from: the saved offline GPT-2 tokenizer, ``model.tokenizer`` (a
    directory or hub id) or the model's own directory."""
    if cfg.tokenizer == "gpt2-offline":
        return _offline_gpt2_tokenizer_dir(cache_root)
    return cfg.tokenizer or source


def _load_tokenizer(cfg: ModelConfig, source: Path | str, cache_root: Path) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``cfg.tokenizer`` (``gpt2-offline``, a dir or hub id), else the model's own."""
    from transformers import AutoTokenizer

    where = tokenizer_location(cfg, source, cache_root)
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as err:
        raise ModelNotAvailableError(
            f"tokenizer of model {cfg.name!r} could not be loaded from {where!s}: {err}. "
            "Set model.tokenizer=gpt2-offline for GPT-2's BPE, or point model.tokenizer to a local "
            "tokenizer directory."
        ) from err
    tok.padding_side = "right"
    return tok


def _with_bos(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A twin of ``tokenizer`` that prepends BOS, for the bridge (which needs one) without a reload.

    TransformerLens keeps a tokenizer whose ``init_kwargs`` say ``add_bos_token=True`` as it is and
    otherwise loads the tokenizer again from disk with that option (1-2 s for GPT-2's BPE). The twin is
    a deep copy that shares the large read-only vocabulary tables (only used to build the backend) and
    has ``add_bos_token`` set the way ``from_pretrained(..., add_bos_token=True)`` sets it: the same
    backend, encodings and ``init_kwargs``. attncomm's own tokenizer is left unchanged (it adds no
    BOS). Tokenizers without a BOS token or without a tokenizers backend are passed on unchanged.
    """
    if tokenizer.bos_token is None or getattr(tokenizer, "add_bos_token", False):
        return tokenizer
    if not hasattr(type(tokenizer), "update_post_processor"):
        return tokenizer
    shared = {id(v): v for v in vars(tokenizer).values() if isinstance(v, dict | list) and len(v) > 1000}
    try:
        twin = copy.deepcopy(tokenizer, shared)
        twin.init_kwargs["add_bos_token"] = True
        twin._should_update_post_processor = True  # as from_pretrained with an explicit add_bos_token
        twin.add_bos_token = True  # rebuilds the post-processor
    except (ValueError, TypeError, AttributeError):  # e.g. a BOS token TemplateProcessing cannot express
        return tokenizer
    return twin


def _use_float64_norms(bridge: Any) -> None:
    """Make RMS norms compute in float64 (HF's Gemma2RMSNorm upcasts to float32 only)."""
    for module in bridge.modules():
        if type(module).__name__ == "RMSNormalizationBridge" and hasattr(
            module, "use_native_layernorm_autograd"
        ):
            module.use_native_layernorm_autograd = False


def load_model(
    cfg: ModelConfig,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> ModelAdapter:
    """Load ``cfg``'s model through the TransformerLens bridge with the paper's weight processing."""
    from transformer_lens.model_bridge import TransformerBridge

    cfg = resolve_model_config(cfg)
    source = resolve_model_dir(cfg, cache_dir)
    if isinstance(source, Path):  # the family the checkpoint says, whatever the YAML claims
        cfg = replace(cfg, family=read_family(source))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tokenizer = _load_tokenizer(cfg, source, root)
    try:
        revision = cfg.revision if isinstance(source, str) else None  # a local dir has no revisions
        bridge = TransformerBridge.boot_transformers(
            str(source), tokenizer=_with_bos(tokenizer), dtype=dtype, device=device, revision=revision
        )
    except OSError as err:
        raise _not_available(cfg, f"{source} (HF cache {_hf_hub_cache()})", str(err)) from err
    except Exception as err:  # noqa: BLE001 - safetensors/torch raise many types for a damaged checkpoint
        if isinstance(err, AttncommError) or not isinstance(source, Path):
            raise
        raise ModelNotAvailableError(
            f"the weights of model {cfg.name!r} in {source} cannot be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): the checkpoint is damaged or incomplete; "
            "replace it (e.g. save_pretrained again) or point model.path at an intact copy"
        ) from err
    if not isinstance(source, Path):  # downloaded by id: the family from the booted model's config
        cfg = replace(cfg, family=family_of_config(bridge.original_model.config.to_dict(), str(source)))
    with _weight_cache(cfg, source, root, dtype):
        bridge.enable_compatibility_mode(disable_warnings=True)
    if dtype == torch.float64:
        _use_float64_norms(bridge)
    bridge.eval()
    return ModelAdapter(cfg=cfg, bridge=bridge, tokenizer=tokenizer, device=device, dtype=dtype)


def _weight_cache(
    cfg: ModelConfig, source: Path | str, root: Path, dtype: torch.dtype
) -> contextlib.AbstractContextManager[Any]:
    """The processed-weight cache (:mod:`attncomm.models.weight_cache`) when on and the weights are local."""
    if not getattr(cfg, "weight_cache", True) or not isinstance(source, Path):
        return contextlib.nullcontext()
    from attncomm.models.weight_cache import processed_weights_cache

    return processed_weights_cache(root, cfg.short_name, source, dtype)


def _hf_attention(bridge: Any) -> Any:
    """The HF attention module of layer 0 (holds ``scaling`` and ``attn_logit_softcapping``)."""
    return bridge.blocks[0].attn.original_component


def _rotary_module(bridge: Any) -> Any | None:
    """The HF rotary-embedding module the model uses, or None for absolute positions."""
    for name, module in bridge.original_model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


def _positive_or_none(value: Any) -> float | None:
    """TransformerLens marks an absent softcap with -1; return None for it."""
    return float(value) if value is not None and float(value) > 0 else None


class ModelAdapter(HookNames):
    """A loaded, processed model: its bridge, tokenizer, architecture facts, weights and hook names."""

    def __init__(
        self,
        cfg: ModelConfig,
        bridge: Any,
        tokenizer: PreTrainedTokenizerBase,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        self.cfg = cfg
        self.short_name: str = cfg.short_name
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self._split_qkv = False
        self.arch = self._arch_facts()

    # ---- facts and weights ------------------------------------------------------------------

    def _arch_facts(self) -> ArchFacts:
        """Read the architecture facts from the bridge config and the HF modules."""
        c = self.bridge.cfg
        hf_attn = _hf_attention(self.bridge)
        d_head = int(c.d_head)
        rotary = getattr(c, "positional_embedding_type", "standard") == "rotary"
        rotary_dim = rotary_base = None
        if rotary:
            rotary_dim = int(self.rotary_cos_sin(1)[0].shape[-1])
            hf_cfg = self.bridge.original_model.config
            rope = getattr(hf_cfg, "rope_parameters", None) or {}
            rotary_base = float(rope.get("rope_theta", getattr(hf_cfg, "rope_theta", c.rotary_base)))
        scaling = getattr(hf_attn, "scaling", None)
        if getattr(c, "scale_attn_by_inverse_layer_idx", False):
            raise NotImplementedError("scale_attn_by_inverse_layer_idx models are not supported by attncomm")
        embed = self.bridge.embed.original_component
        embed_scale = getattr(embed, "embed_scale", None)
        try:
            has_bias = self.bridge.blocks[0].attn.b_Q is not None
        except AttributeError:
            has_bias = False
        return ArchFacts(
            n_layers=int(c.n_layers),
            n_heads=int(c.n_heads),
            n_kv_heads=int(getattr(c, "n_key_value_heads", None) or c.n_heads),
            d_model=int(c.d_model),
            d_head=d_head,
            d_vocab=int(c.d_vocab),
            n_ctx=int(c.n_ctx),
            normalization="RMS" if getattr(c, "normalization_type", "LN") == "RMS" else "LN",
            rotary=rotary,
            rotary_dim=rotary_dim,
            rotary_base=rotary_base,
            rotary_adjacent_pairs=bool(getattr(c, "rotary_adjacent_pairs", False)),
            parallel_attn=bool(getattr(c, "parallel_attn_mlp", False)),
            post_attn_norm=hasattr(self.bridge.blocks[0], "ln1_post"),
            attn_softcap=_positive_or_none(getattr(c, "attn_scores_soft_cap", None)),
            final_softcap=_positive_or_none(getattr(c, "output_logits_soft_cap", None)),
            embed_scale=float(embed_scale) if embed_scale is not None else 1.0,
            has_attn_bias=has_bias,
            attn_scale=float(1.0 / scaling) if scaling else float(d_head**0.5),
        )

    @functools.cached_property
    def weights(self) -> HeadWeights:
        """The processed weights in one place, GQA expanded, absent biases as zeros."""
        b, a = self.bridge, self.arch
        L, H, D, dh = a.n_layers, a.n_heads, a.d_model, a.d_head
        kw = {"dtype": self.dtype, "device": self.device}

        def get(name: str, zeros_shape: tuple[int, ...]) -> Tensor:
            try:
                value = getattr(b, name)
            except AttributeError:
                value = None
            if value is None:
                return torch.zeros(zeros_shape, **kw)
            value = value.detach().clone()
            if value.ndim >= 3 and value.shape[1] != H:  # grouped keys/values -> query heads
                value = value.repeat_interleave(H // value.shape[1], dim=1)
            return value

        with torch.no_grad():
            gain = None
            if a.post_attn_norm:
                gains = []
                for block in b.blocks:
                    w = block.ln1_post.original_component.weight.detach()
                    offset = bool(getattr(b.cfg, "rmsnorm_uses_offset", False))
                    gains.append((1.0 + w) if offset else w.clone())
                gain = torch.stack(gains).to(**kw)
            return HeadWeights(
                W_Q=get("W_Q", (L, H, D, dh)),
                W_K=get("W_K", (L, H, D, dh)),
                W_V=get("W_V", (L, H, D, dh)),
                W_O=get("W_O", (L, H, dh, D)),
                b_Q=get("b_Q", (L, H, dh)),
                b_K=get("b_K", (L, H, dh)),
                b_V=get("b_V", (L, H, dh)),
                b_O=get("b_O", (L, D)),
                W_U=b.W_U.detach().clone(),
                b_U=get("b_U", (a.d_vocab,)),
                W_E=b.W_E.detach().clone(),
                W_pos=None if a.rotary else b.W_pos.detach().clone(),
                ln1_post_gain=gain,
            )

    def rotary_cos_sin(
        self, n_pos: int
    ) -> tuple[Float[Tensor, "pos rotary_dim"], Float[Tensor, "pos rotary_dim"]]:
        """The cos/sin tables of positions ``0..n_pos-1`` exactly as the model computes them (NeoX layout)."""
        module = _rotary_module(self.bridge)
        if module is None:
            raise ValueError(f"model {self.cfg.name!r} has no rotary embedding (absolute positions)")
        probe = torch.zeros(1, n_pos, 1, dtype=self.dtype)  # HF rotary modules read only dtype/device
        position_ids = torch.arange(n_pos, device=self.device)[None]
        with torch.no_grad():
            cos, sin = module(probe.to(self.device), position_ids)
        return cos[0], sin[0]

    @functools.cached_property
    def n_params(self) -> int:
        """Parameters of the checkpoint (tied weights once), counted on a meta-device twin of the HF model.

        The bridge's own module tree holds split q/k/v copies and, after processing, untied embeddings.
        """
        original = self.bridge.original_model
        with torch.device("meta"):
            twin = type(original)(original.config)
        return int(sum(p.numel() for p in twin.parameters()))

    def describe(self) -> dict[str, Any]:
        """Layers, heads, parameter count and architecture facts, for the describe stage."""
        return {
            "name": self.cfg.name,
            "short_name": self.short_name,
            "family": self.cfg.family,
            "architecture": type(self.bridge.original_model).__name__,
            "n_params": self.n_params,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            **asdict(self.arch),
        }

    # ---- hook names: HookNames (resid_pre, ln1_scale, pattern, ...) and the split-qkv inputs ----

    def q_input(self, layer: int) -> str:
        """Per-head query input ``[batch pos head_index d_model]`` (turns split-qkv input on)."""
        self.set_split_qkv_input(True)
        return f"blocks.{layer}.hook_q_input"

    def k_input(self, layer: int) -> str:
        """Per-kv-head key input ``[batch pos kv_head d_model]`` (turns split-qkv input on)."""
        self.set_split_qkv_input(True)
        return f"blocks.{layer}.hook_k_input"

    def set_split_qkv_input(self, enabled: bool) -> None:
        """Give each head its own copy of the attention input so queries/keys can be patched alone."""
        if enabled != self._split_qkv:
            logger.debug("split qkv input %s for %s", "on" if enabled else "off", self.cfg.name)
            self.bridge.set_use_split_qkv_input(enabled)
            self._split_qkv = enabled

    def _check_names(self, names: Sequence[str]) -> None:
        """Raise a clear error for hook names the model does not have."""
        missing = [n for n in names if n not in self.bridge.hook_dict]
        if missing:
            raise KeyError(
                f"model {self.cfg.name!r} has no hook(s) {missing}; use the ModelAdapter name helpers "
                "(resid_pre, ln1_scale, pattern, ...) to build hook names"
            )

    # ---- running ----------------------------------------------------------------------------

    def to_tokens(self, texts: str | Sequence[str], prepend_bos: bool) -> Int[Tensor, "batch pos"]:
        """Tokenize, right-padded (causal attention keeps real tokens unaffected by the padding)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        return self.bridge.to_tokens(batch, prepend_bos=prepend_bos, padding_side="right")

    def run_with_cache(
        self, tokens: Int[Tensor, "batch pos"], names: Sequence[str]
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], dict[str, Tensor]]:
        """Run without gradients, caching only the requested hooks (keys are the names given)."""
        self._check_names(names)
        cache: dict[str, Tensor] = {}

        def make_store(key: str) -> HookFn:
            def store(tensor: Tensor, hook: Any) -> None:
                cache[key] = tensor.detach()

            return store

        hooks = [(name, make_store(name)) for name in dict.fromkeys(names)]
        with torch.no_grad():
            logits = self.bridge.run_with_hooks(tokens.to(self.device), fwd_hooks=hooks)
        not_fired = [n for n in names if n not in cache]
        if not_fired:
            raise RuntimeError(
                f"hook(s) {not_fired} did not fire on model {self.cfg.name!r}; split-qkv hooks need "
                "set_split_qkv_input(True) (q_input/k_input do it)"
            )
        return logits, cache

    def run_with_hooks(
        self, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[tuple[str, HookFn]]
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Run without gradients with forward hooks (name, fn(tensor, hook) -> tensor | None)."""
        self._check_names([name for name, _ in fwd_hooks])
        with torch.no_grad():
            return self.bridge.run_with_hooks(tokens.to(self.device), fwd_hooks=list(fwd_hooks))
