"""Path patching: the effect of a sender head on chosen receivers only (heads' query/key/value inputs, or
the logits), many senders per forward pass.

For sender ``s`` and the receiver set ``R`` (denoising: base run = corrupted, source = clean; noising
the reverse):

1. run the base prompts with ``s``'s output (``hook_z``) taken from the source run and every other
   head's output frozen at its base value (MLPs and norms recompute), and record what the receivers
   read there: a receiver head's query/key/value input (``hook_q_input`` / ``hook_k_input`` /
   ``hook_v_input``, the residual stream before that head's own ``ln1``), and for ``logits`` the final
   residual (``blocks.{L-1}.hook_resid_post``);
2. run the base prompts again with only those receiver inputs replaced by the recorded values (the
   final residual receives the recorded change ``resid_post(1) - resid_post(base)``) at the configured
   positions, and read the metric.

The metric is normalised as in activation patching (0 = corrupted, 1 = clean). With every head of the
layers after ``s`` and the logits as receivers in an attention-only model this equals activation
patching of ``s``'s output (tested). ``receivers`` entries are ``("q"|"k"|"v", layer, head)`` or
``("logits",)``; for grouped-query models the head of a ``k``/``v`` receiver is the key/value head.
TransformerLens ships no general path patching (its ``get_act_patch_direct_path`` covers the direct
path of one component only), hence this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.analyses.activation_patching import base_metrics, check_direction
from attncomm.analyses.common import (
    AnalysisInputError,
    check_corrupted,
    check_heads,
    check_index,
    check_positions,
    normalised,
    repeat_prompts,
)

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.tasks.base import Task, TaskPrompts

Receiver = tuple[Any, ...]


def parse_receivers(
    specs: Sequence[Any], model: ModelAdapter, option: str = "path_patch.receivers"
) -> list[Receiver]:
    """``[[layer, head, q|k|v] | [logits], ...]`` -> ``[("q", layer, head) | ("logits",)]``, validated."""
    out: list[Receiver] = []
    if not specs:
        raise AnalysisInputError(f"{option} is empty; give e.g. {option}=[[9,6,q],[10,0,k]] or [[logits]]")
    for spec in specs:
        if (
            isinstance(spec, str)
            and spec == "logits"
            or (isinstance(spec, Sequence) and not isinstance(spec, str) and list(spec) == ["logits"])
        ):
            out.append(("logits",))
            continue
        if (
            not isinstance(spec, Sequence)
            or isinstance(spec, str)
            or len(spec) != 3
            or spec[2] not in ("q", "k", "v")
        ):
            raise AnalysisInputError(
                f"{option}: malformed receiver {spec!r}; each receiver is [layer, head, q|k|v] or [logits], "
                f"e.g. {option}=[[9,6,q],[10,0,k]]"
            )
        layer = check_index(option, spec[0], model.arch.n_layers, "layer")
        n_heads = model.arch.n_kv_heads if spec[2] in ("k", "v") else model.arch.n_heads
        head = check_index(option, spec[1], n_heads, "head")
        out.append((spec[2], layer, head))
    return out


def _input_hook(kind: str, layer: int) -> str:
    return f"blocks.{layer}.hook_{kind}_input"


def path_patching(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    corrupted: Tensor | None,
    receivers: Sequence[Any] = (("logits",),),
    senders: Sequence[Any] | None = None,
    positions: Sequence[int] | None = None,
    direction: str = "denoising",
    max_batch: int = 256,
    tokens: Tensor | None = None,
) -> pd.DataFrame:
    """Path patching from each sender head to all ``receivers`` together; one row per sender.

    Columns: ``direction``, ``layer``, ``head`` (the sender), ``receivers`` (their spec as text),
    ``value`` (mean metric), ``normalised``, ``clean``, ``corrupted``. Senders at or after a receiver's
    layer have no path to it (their rows read the base metric for those receivers).
    """
    clean = prompts.tokens if tokens is None else tokens
    corrupted = check_corrupted(clean, corrupted, "path_patch")
    check_direction(direction, "path_patch.direction")
    recv = parse_receivers(receivers, model)
    L, H = model.arch.n_layers, model.arch.n_heads
    pairs = (
        [(layer, head) for layer in range(L) for head in range(H)]
        if senders is None
        else check_heads("path_patch.senders", senders, L, H)
    )
    pos = check_positions("path_patch.positions", positions, clean.shape[1])
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    n = len(prompts)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    final = f"blocks.{L - 1}.hook_resid_post"
    head_recv = [r for r in recv if r[0] != "logits"]
    want_logits = any(r[0] == "logits" for r in recv)
    record = sorted({_input_hook(r[0], r[1]) for r in head_recv})
    previous = model._split_qkv
    if head_recv:
        model.set_split_qkv_input(True)
    try:
        _, base_cache = model.run_with_cache(base, z_names + [final])
        _, src_cache = model.run_with_cache(source, z_names)
        clean_m, corr_m = base_metrics(model, task, prompts, clean, corrupted)
        per_pass = max(1, max_batch // max(n, 1))
        values = []
        for start in tqdm(range(0, len(pairs), per_pass), desc="path patching", leave=False):
            chunk = pairs[start : start + per_pass]
            m = len(chunk)
            values.append(
                _chunk(
                    model,
                    task,
                    prompts,
                    base,
                    chunk,
                    head_recv,
                    want_logits,
                    pos,
                    base_cache,
                    src_cache,
                    record,
                    final,
                    m,
                    n,
                )
            )
    finally:
        model.set_split_qkv_input(previous)
    mean = torch.cat(values).mean(1)
    c, r = float(clean_m.mean()), float(corr_m.mean())
    text = ";".join("logits" if x[0] == "logits" else f"L{x[1]}H{x[2]}.{x[0]}" for x in recv)
    return pd.DataFrame(
        {
            "direction": direction,
            "layer": [p[0] for p in pairs],
            "head": [p[1] for p in pairs],
            "receivers": text,
            "value": mean.tolist(),
            "normalised": [normalised(v, c, r) for v in mean.tolist()],
            "clean": c,
            "corrupted": r,
        }
    )


def _chunk(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    base: Tensor,
    chunk: list[tuple[int, int]],
    head_recv: list[Receiver],
    want_logits: bool,
    pos: list[int] | None,
    base_cache: dict[str, Tensor],
    src_cache: dict[str, Tensor],
    record: list[str],
    final: str,
    m: int,
    n: int,
) -> Tensor:
    """Both passes for ``m`` senders at once; returns the metric ``[m, n]``."""
    L = model.arch.n_layers
    tokens = base.repeat(m, 1)

    def freeze(layer: int):
        name = f"blocks.{layer}.attn.hook_z"

        def hook(act: Tensor, hook: Any) -> Tensor:
            out = base_cache[name].repeat(m, 1, 1, 1).to(act.dtype)
            for j, (sl, sh) in enumerate(chunk):
                if sl == layer:
                    out[j * n : (j + 1) * n, :, sh] = src_cache[name][:, :, sh].to(act.dtype)
            return out

        return hook

    recorded: dict[str, Tensor] = {}

    def store(name: str):
        def hook(act: Tensor, hook: Any) -> None:
            recorded[name] = act.detach()

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_z", freeze(layer)) for layer in range(L)]
    hooks += [(name, store(name)) for name in record + ([final] if want_logits else [])]
    model.run_with_hooks(tokens, hooks)  # pass 1: record what the receivers read
    p = slice(None) if pos is None else torch.tensor(pos)

    def patch_input(name: str, heads: list[int]):
        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            for h in heads:
                new = recorded[name][:, :, h]
                act[:, p, h] = new[:, p].to(act.dtype)
            return act

        return hook

    by_hook: dict[str, list[int]] = {}
    for kind, layer, head in head_recv:
        by_hook.setdefault(_input_hook(kind, layer), []).append(head)
    hooks2: list[tuple[str, Any]] = [(name, patch_input(name, heads)) for name, heads in by_hook.items()]
    if want_logits:
        delta = recorded[final] - base_cache[final].repeat(m, 1, 1).to(recorded[final].dtype)

        def add_delta(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[:, p] = act[:, p] + delta[:, p].to(act.dtype)
            return act

        hooks2.append((final, add_delta))
    logits = model.run_with_hooks(tokens, hooks2)
    return task.metric(logits, repeat_prompts(prompts, m)).reshape(m, n)
