"""Activation patching between a clean and a corrupted run, many cells per forward pass.

A *cell* is one activation slice: ``(layer, head, pos)`` of an activation ``kind``. Denoising runs the
corrupted prompts and patches in the clean activation of the cell; noising runs the clean prompts and
patches in the corrupted one. The result is normalised so that 0 is the corrupted run's metric and 1
the clean run's (the ratio of prompt means), in both directions.

Two paths with the same results. Head outputs (``z``) of GPT-2-style models take the *resumed* path
(:func:`resumed_z_metrics`): the base and source runs are computed once by a plain forward
(:mod:`attncomm.analyses.resumable_forward`) and each cell reruns only what the patch can change --
the patched position at its layer, then the later blocks on the positions from the patched one on
(earlier positions' keys/values from the cached base run) -- and unembeds only at ``end``. Everything
else takes the *hook* path (:func:`hooked_metrics`): the base prompts are repeated ``m`` times along
the batch dimension and copy ``j`` patches cell ``j`` (one hook per layer touched, each writing only
its copies), so one bridge forward pass evaluates ``m = max_batch // n_prompts`` cells.
TransformerLens's ``transformer_lens.patching`` runs one forward per cell
(``generic_activation_patch``) and is used as the speed baseline (``make bench``).

Kinds and hooks (``blocks.{layer}.``): ``resid_pre``, ``attn_out``, ``mlp_out`` (``[batch pos d_model]``;
head None), ``z`` (head outputs ``attn.hook_z``), ``q``, ``k``, ``v`` (``attn.hook_q/k/v``, before
rotary), all ``[batch pos head d_head]``, and ``pattern`` (``attn.hook_pattern``
``[batch head dest src]``; ``pos`` is the destination row). For grouped-query models the head axis
of ``k`` and ``v`` is the key/value head (``n_kv_heads`` of them, each shared by
``n_heads // n_kv_heads`` query heads): that is the unit the model computes, and patching it is what
TransformerLens refuses to do for such models.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.analyses import resumable_forward as rf
from attncomm.analyses.common import (
    AnalysisInputError,
    check_corrupted,
    metric_from_final,
    normalised,
    position_labels,
    repeat_prompts,
)

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.tasks.base import Task, TaskPrompts

#: kind -> (hook name template, layout)
KINDS: dict[str, tuple[str, str]] = {
    "resid_pre": ("blocks.{}.hook_resid_pre", "bpd"),
    "attn_out": ("blocks.{}.hook_attn_out", "bpd"),
    "mlp_out": ("blocks.{}.hook_mlp_out", "bpd"),
    "z": ("blocks.{}.attn.hook_z", "bphd"),
    "q": ("blocks.{}.attn.hook_q", "bphd"),
    "k": ("blocks.{}.attn.hook_k", "bphd"),
    "v": ("blocks.{}.attn.hook_v", "bphd"),
    "pattern": ("blocks.{}.attn.hook_pattern", "bhqk"),
}
HEAD_KINDS = ("z", "q", "k", "v", "pattern")
DIRECTIONS = ("denoising", "noising")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One patched slice: ``head`` / ``pos`` None mean every head / every position."""

    layer: int
    head: int | None = None
    pos: int | None = None


def hook_name(kind: str, layer: int) -> str:
    """The hook of activation ``kind`` at ``layer``."""
    return KINDS[kind][0].format(layer)


def check_kind(kind: str, option: str = "act_patch.kinds") -> str:
    if kind not in KINDS:
        raise AnalysisInputError(
            f"{option}: unknown activation kind {kind!r}; valid kinds: {', '.join(KINDS)}"
        )
    return kind


def check_direction(direction: str, option: str = "act_patch.direction") -> str:
    if direction not in DIRECTIONS:
        raise AnalysisInputError(f"{option}={direction!r} is not valid; use denoising or noising")
    return direction


def n_head_slots(model: ModelAdapter, kind: str) -> int:
    """Heads along the head axis of ``kind`` (key/value heads for ``k``/``v``)."""
    return model.arch.n_kv_heads if kind in ("k", "v") else model.arch.n_heads


def _write(act: Tensor, src: Tensor, layout: str, cell: Cell) -> None:
    """``act[cell] = src[cell]`` in place; ``act`` and ``src`` are one copy ``[batch, ...]``."""
    if layout == "bpd":
        idx: tuple[Any, ...] = (slice(None), slice(None) if cell.pos is None else cell.pos)
    elif layout == "bphd":
        idx = (
            slice(None),
            slice(None) if cell.pos is None else cell.pos,
            slice(None) if cell.head is None else cell.head,
        )
    else:  # bhqk
        idx = (
            slice(None),
            slice(None) if cell.head is None else cell.head,
            slice(None) if cell.pos is None else cell.pos,
        )
    act[idx] = src[idx]


def cells_hooks(
    kind: str, cells: Sequence[Cell], source: dict[str, Tensor], n: int
) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """Hooks patching copy ``j`` (rows ``j*n..(j+1)*n-1``) of a repeated batch at ``cells[j]``."""
    layout = KINDS[kind][1]
    by_layer: dict[int, list[tuple[int, Cell]]] = {}
    for j, cell in enumerate(cells):
        by_layer.setdefault(cell.layer, []).append((j, cell))

    def make(name: str, items: list[tuple[int, Cell]]) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            src = source[name].to(act.dtype)
            for j, cell in items:
                _write(act[j * n : (j + 1) * n], src, layout, cell)
            return act

        return hook

    return [
        (hook_name(kind, layer), make(hook_name(kind, layer), items)) for layer, items in by_layer.items()
    ]


def patched_metrics(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    base_tokens: Tensor,
    source_tokens: Tensor,
    kind: str,
    cells: Sequence[Cell],
    max_batch: int = 256,
    progress: bool = True,
    extra_hooks: Sequence[tuple[str, Any]] = (),
    resumed: bool = True,
) -> Tensor:
    """The metric ``[n_cells, batch]`` of the base run with each cell patched from the source run.

    Head outputs (``z``) of models the plain forward covers take the resumed path
    (:func:`resumed_z_metrics`) unless ``resumed`` is False; everything else runs the bridge with
    patching hooks. ``extra_hooks`` run in every forward pass (after the patching hooks); they see the
    repeated batch (and force the hook path).
    """
    check_kind(kind)
    if resumed and kind == "z" and not extra_hooks and cells:
        w, why = resumed_weights(model, task, prompts, base_tokens, source_tokens)
        if w is not None:
            return resumed_z_metrics(w, task, prompts, base_tokens, source_tokens, cells, max_batch, progress)
        logger.info("act_patch z on %s: hook path (%s)", model.cfg.name, why)
    return hooked_metrics(
        model, task, prompts, base_tokens, source_tokens, kind, cells, max_batch, progress, extra_hooks
    )


def hooked_metrics(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    base_tokens: Tensor,
    source_tokens: Tensor,
    kind: str,
    cells: Sequence[Cell],
    max_batch: int = 256,
    progress: bool = True,
    extra_hooks: Sequence[tuple[str, Any]] = (),
) -> Tensor:
    """:func:`patched_metrics` through the bridge: ``max_batch // n_prompts`` cells per forward pass."""
    n = len(prompts)
    layers = sorted({c.layer for c in cells})
    names = [hook_name(kind, layer) for layer in layers]
    _, source = model.run_with_cache(source_tokens, names)
    per_pass = max(1, max_batch // max(n, 1))
    out = []
    chunks = range(0, len(cells), per_pass)
    for start in tqdm(
        chunks, desc=f"patch {kind}", disable=None if progress and len(chunks) >= 2 else True, leave=False
    ):
        chunk = list(cells[start : start + per_pass])
        m = len(chunk)
        hooks = cells_hooks(kind, chunk, source, n) + list(extra_hooks)
        logits = model.run_with_hooks(base_tokens.repeat(m, 1), hooks)
        out.append(task.metric(logits, repeat_prompts(prompts, m)).reshape(m, n))
    return torch.cat(out) if out else torch.zeros(0, n)


#: the plain-forward weights of each loaded model (read once)
_WEIGHTS: weakref.WeakKeyDictionary[Any, rf.StackWeights] = weakref.WeakKeyDictionary()


def resumed_weights(
    model: ModelAdapter, task: Task, prompts: TaskPrompts, base_tokens: Tensor, source_tokens: Tensor
) -> tuple[rf.StackWeights | None, str]:
    """The plain-forward weights when the resumed path is exact here, else None and the reason."""
    reason = rf.unsupported_reason(model)
    if reason is not None:
        return None, f"the plain forward does not cover {reason}"
    if base_tokens.shape != source_tokens.shape or base_tokens.shape[0] != len(prompts):
        return None, "base and source tokens differ in shape"
    if model not in _WEIGHTS:
        _WEIGHTS[model] = rf.stack_weights(model)
    w = _WEIGHTS[model]
    if not rf.matches_bridge(model, w, base_tokens, prompts.end):
        return None, "the plain forward's logits differ from the bridge's"
    if not _metric_reads_only_end(w, task, prompts, base_tokens):
        return None, f"task {task.name!r}'s metric reads logits outside `end`"
    return w, ""


def _metric_reads_only_end(w: rf.StackWeights, task: Task, prompts: TaskPrompts, tokens: Tensor) -> bool:
    """Whether the metric of (at most 4) prompts is unchanged when every logit outside ``end`` is NaN and
    when given only the logits at ``end`` (what the resumed path computes)."""
    few = prompts.subset(range(min(4, len(prompts))))
    with torch.no_grad():
        logits = rf.unembed(w, rf.forward_cache(w, tokens[: len(few)].to(w.W_E.device)).resid[-1])
    rows = torch.arange(len(few), device=logits.device)
    end = few.end.to(logits.device)
    poisoned = torch.full_like(logits, float("nan"))
    poisoned[rows, end] = logits[rows, end]
    reference = task.metric(logits, few)
    return bool(
        torch.equal(task.metric(poisoned, few), reference)
        and torch.equal(metric_from_final(task, few, logits[rows, end]), reference)
    )


def resumed_z_metrics(
    w: rf.StackWeights,
    task: Task,
    prompts: TaskPrompts,
    base_tokens: Tensor,
    source_tokens: Tensor,
    cells: Sequence[Cell],
    max_batch: int = 256,
    progress: bool = True,
) -> Tensor:
    """Head-output patching by resuming the base run after the patched layer, from the patched position.

    Patching ``z`` of head ``h`` at layer ``L``, position ``p`` changes layer ``L``'s attention output only
    at ``p`` (only its MLP input there), and later layers only at positions ``>= p`` (causal
    attention), whose queries read the base run's cached keys/values of the positions before ``p``.
    So a cell costs blocks ``L+1..`` on positions ``p..max(end)`` plus one MLP row, and the metric
    needs the logits only at ``end``. Cells with the same ``p`` run as one batch (cells x prompts along
    the batch dimension, at most ``max_batch // n_prompts`` cells) that enters the stack layer by
    layer: the cells of layer ``L`` join it after block ``L`` (:func:`resumable_forward.resume`).
    The final residuals of all cells are unembedded together, ``max_batch`` rows per product.
    ``pos`` None patches every position (from 0).
    """
    n = len(prompts)
    dev = w.W_E.device
    with torch.no_grad():
        base = rf.forward_cache(w, base_tokens.to(dev))
        source_z = rf.forward_cache(w, source_tokens.to(dev)).z
    end = prompts.end.to(dev)
    needed = int(end.max()) + 1
    groups: dict[tuple[int, bool], list[int]] = {}
    for j in sorted(range(len(cells)), key=lambda j: cells[j].layer):
        groups.setdefault((cells[j].pos or 0, cells[j].pos is None), []).append(j)
    per_pass = max(1, max_batch // max(n, 1))
    jobs = [(key, idx[i : i + per_pass]) for key, idx in groups.items() for i in range(0, len(idx), per_pass)]
    finals = torch.empty(len(cells), n, w.W_E.shape[1], dtype=w.W_E.dtype, device=dev)
    for (p0, every_pos), chunk in tqdm(
        jobs, desc="patch z (resumed)", disable=not progress or len(jobs) < 2, leave=False
    ):
        with torch.no_grad():
            finals[chunk] = _resumed_finals(
                w, base, source_z, [cells[j] for j in chunk], p0, every_pos, end, needed
            )
    out = []
    with torch.no_grad():
        for start in range(0, len(cells), per_pass):  # unembed many cells at once (one pass over W_U)
            m = len(finals[start : start + per_pass])
            logits = rf.unembed(w, finals[start : start + per_pass].flatten(0, 1))
            out.append(metric_from_final(task, repeat_prompts(prompts, m), logits).reshape(m, n))
    return torch.cat(out) if out else torch.zeros(0, n)


def _resumed_finals(
    w: rf.StackWeights,
    base: rf.RunCache,
    source_z: list[Tensor],
    cells: Sequence[Cell],
    p0: int,
    every_pos: bool,
    end: Tensor,
    needed: int,
) -> Float[Tensor, "cell batch d_model"]:
    """The final residual at ``end`` of the base run patched at each cell (sorted by layer, all with
    first patched position ``p0``; ``every_pos``: every position patched)."""
    n = base.resid[0].shape[0]
    dev = end.device
    prompt_rows = torch.arange(n, device=dev)
    if p0 >= needed:  # after every prompt's end: the metric is the base run's
        return base.resid[-1][prompt_rows, end][None].expand(len(cells), n, -1)
    width = needed - p0 if every_pos else 1
    span = slice(p0, p0 + width)
    at = (end - p0).clamp(min=0)
    entries = []
    for layer in sorted({c.layer for c in cells}):
        here = [c for c in cells if c.layer == layer]
        rows = prompt_rows.repeat(len(here))
        heads = torch.zeros(len(here), w.n_heads, dtype=torch.bool, device=dev)
        for i, c in enumerate(here):
            heads[i, slice(None) if c.head is None else c.head] = True
        heads = heads.repeat_interleave(n, dim=0)[:, None, :, None]
        z = torch.where(heads, source_z[layer][rows, span], base.z[layer][rows, span])
        resid_mid = base.resid[layer][rows, span] + rf.attn_out(w, layer, z)
        resid = base.resid[layer + 1][rows, p0:needed].clone()
        resid[:, :width] = resid_mid + rf.mlp(w, layer, resid_mid)
        entries.append((layer + 1, resid, rows, at[rows]))
    final = rf.resume(w, base, p0, entries).reshape(len(cells), n, -1)
    return torch.where((end >= p0)[None, :, None], final, base.resid[-1][prompt_rows, end][None])


def base_metrics(
    model: ModelAdapter, task: Task, prompts: TaskPrompts, clean: Tensor, corrupted: Tensor
) -> tuple[Tensor, Tensor]:
    """The per-prompt metric of the clean and of the corrupted run."""
    both = model.run_with_hooks(torch.cat([clean, corrupted]), [])
    values = task.metric(both, repeat_prompts(prompts, 2)).reshape(2, len(prompts))
    return values[0], values[1]


def grid_cells(model: ModelAdapter, kind: str, n_pos: int, axes: str) -> list[Cell]:
    """Every cell of ``kind`` over ``axes``: ``layer_pos``, ``layer_head`` or ``layer_head_pos``."""
    L = model.arch.n_layers
    if axes == "layer_pos":
        return [Cell(layer, None, pos) for layer in range(L) for pos in range(n_pos)]
    H = n_head_slots(model, kind)
    if axes == "layer_head":
        return [Cell(layer, head, None) for layer in range(L) for head in range(H)]
    return [Cell(layer, head, pos) for layer in range(L) for head in range(H) for pos in range(n_pos)]


def axes_for(kind: str, by_position: bool) -> list[str]:
    """The grids patched for ``kind``: layer x position for residual kinds, layer x head (and x position)."""
    if kind not in HEAD_KINDS:
        return ["layer_pos"]
    return ["layer_head", "layer_head_pos"] if by_position else ["layer_head"]


def activation_patching(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    corrupted: Tensor | None,
    kinds: Iterable[str] = tuple(KINDS),
    directions: Iterable[str] = ("denoising",),
    by_position: bool = True,
    max_batch: int = 256,
    tokens: Tensor | None = None,
) -> pd.DataFrame:
    """Activation patching of every cell of every kind; one row per (direction, kind, cell).

    Columns: ``direction``, ``kind``, ``grid`` (the patched grid), ``layer``, ``head`` (-1: all/none),
    ``pos`` (-1: all),
    ``token`` (the token at ``pos`` in prompt 0), ``value`` (mean patched metric), ``normalised``
    (0 = corrupted, 1 = clean), ``clean`` and ``corrupted`` (the two runs' mean metrics).
    """
    clean = prompts.tokens if tokens is None else tokens
    corrupted = check_corrupted(clean, corrupted, "act_patch")
    kinds = [check_kind(k) for k in kinds]
    directions = [check_direction(d) for d in directions]
    clean_m, corr_m = base_metrics(model, task, prompts, clean, corrupted)
    c, r = float(clean_m.mean()), float(corr_m.mean())
    labels = position_labels(model, clean)
    frames = []
    for direction in directions:
        base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
        for kind in kinds:
            for axes in axes_for(kind, by_position):
                cells = grid_cells(model, kind, clean.shape[1], axes)
                values = patched_metrics(model, task, prompts, base, source, kind, cells, max_batch).mean(1)
                frames.append(
                    pd.DataFrame(
                        {
                            "direction": direction,
                            "kind": kind,
                            "grid": axes,
                            "layer": [cell.layer for cell in cells],
                            "head": [-1 if cell.head is None else cell.head for cell in cells],
                            "pos": [-1 if cell.pos is None else cell.pos for cell in cells],
                            "token": ["" if cell.pos is None else labels[cell.pos] for cell in cells],
                            "value": values.tolist(),
                            "normalised": [normalised(v, c, r) for v in values.tolist()],
                            "clean": c,
                            "corrupted": r,
                        }
                    )
                )
    return pd.concat(frames, ignore_index=True)
