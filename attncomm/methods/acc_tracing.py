"""ACC's model runner, in memory: run a model on task prompts, trace each prompt or collect its signals.

:func:`trace_prompts` runs the :class:`~attncomm.models.adapter.ModelAdapter` on the prompts in batches,
caching only the hooks the maths reads (``ln1`` normalized input and scale, attention pattern, values,
MLP outputs, the embedding, ``ln_final`` scale and, for Gemma-2, ``ln1_post`` scale), then calls
:func:`attncomm.core.prompt_graph.trace_prompt` per prompt and yields a :class:`PromptTrace` per prompt.
Omega SVDs come from an :class:`~attncomm.core.omega_factors.OmegaCache` (built from the model's processed
weights if none is given, and reusable across calls).

:func:`collect_signals` runs the model the same way for the control-signal analysis (section 9): every
firing of every layer passing the attention and destination filters, decomposed as the tracer does,
with its source signal ``P_V x_s``. Both drive the model through :func:`cached_batches`, and the hooks
they read are named once (:func:`needed_hooks`, :func:`signal_hooks`). The edge interventions and
experiments run the model through the same batching
(:func:`attncomm.core.edge_interventions.batch_ranges`, ``cached_runs``) and read
:func:`attncomm.core.edge_interventions.needed_hooks`, a subset of the tracer's hooks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.core.contributions import PromptWrites, head_value_writes
from attncomm.core.edge_interventions import batch_ranges
from attncomm.core.edge_interventions import needed_hooks as write_hooks
from attncomm.core.edge_list import EdgeList
from attncomm.core.omega_factors import OmegaCache
from attncomm.core.prompt_graph import FiringBudgetStop, FiringResult, PromptTensors, trace_prompt
from attncomm.core.types import FiringKey
from attncomm.io.firing_spool import FiringSpool
from attncomm.models.adapter import ModelAdapter
from attncomm.runtime.memory_budget import memory_budget_bytes
from attncomm.tasks.base import Task, TaskPrompts

if TYPE_CHECKING:
    import pandas as pd

    from attncomm.models.plain_model import PlainModel

logger = logging.getLogger(__name__)

__all__ = [
    "CollectedSignals",
    "PromptTrace",
    "build_omega_cache",
    "cache_bytes",
    "cached_batches",
    "collect_signals",
    "needed_hooks",
    "signal_hooks",
    "trace_prompts",
]


@dataclass
class PromptTrace:
    """The tracing of one prompt: edges (None when skipped), skip reason and per-firing results.

    ``graph`` (a ``MultiDiGraph``, None when skipped) is built from the compact ``edges`` on first
    access. ``results`` maps ``(prompt, l, h, d, s)`` to the firing's result: a dict in memory, or a
    :class:`~attncomm.io.firing_spool.FiringSpool` reading each firing back from disk when
    :func:`trace_prompts` was given a ``spool_dir``. ``skip_reason`` is None, ``"incorrect"``,
    ``"nonpositive_total"``, ``"no_head_seed"`` or ``"firing_budget"`` (then ``budget_stop`` says how
    far the prompt got); a skipped prompt has no results.
    """

    prompt_id: int
    edges: EdgeList | None
    skip_reason: str | None
    results: Mapping[FiringKey, FiringResult] = field(default_factory=dict)
    budget_stop: FiringBudgetStop | None = None

    @property
    def n_firings(self) -> int:
        return len(self.results)

    @functools.cached_property
    def graph(self) -> nx.MultiDiGraph | None:
        return None if self.edges is None else self.edges.to_graph()


def build_omega_cache(model: ModelAdapter | PlainModel, dtype: torch.dtype = torch.float32) -> OmegaCache:
    """An :class:`OmegaCache` over the model's processed (GQA-expanded) weights and its own rotary tables."""
    a, w = model.arch, model.weights
    return OmegaCache(
        W_Q=w.W_Q.detach().to("cpu", dtype),
        W_K=w.W_K.detach().to("cpu", dtype),
        b_Q=w.b_Q.detach().to("cpu", dtype) if a.has_attn_bias else None,
        b_K=w.b_K.detach().to("cpu", dtype) if a.has_attn_bias else None,
        rotary=a.rotary,
        rotary_tables=(lambda n: tuple(t.to("cpu") for t in model.rotary_cos_sin(n))) if a.rotary else None,  # type: ignore[misc]
        rotary_dim=int(a.rotary_dim or 0),
        rotary_base=float(a.rotary_base or 10000.0),
        adjacent_pairs=a.rotary_adjacent_pairs,
        dtype=dtype,
    )


def needed_hooks(model: ModelAdapter | PlainModel) -> list[str]:
    """The hook names tracing reads (nothing else is cached): every component write and ``ln1`` scale
    (:func:`~attncomm.core.edge_interventions.needed_hooks`), the ``ln_final`` scale and each layer's
    normalized head input."""
    names = write_hooks(model) + [model.ln_final_scale()]
    names += [model.ln1_normalized(layer) for layer in range(model.arch.n_layers)]
    return names


def signal_hooks(model: ModelAdapter | PlainModel) -> list[str]:
    """The hook names the control-signal analysis reads: each layer's normalized input and pattern."""
    return [
        n for layer in range(model.arch.n_layers) for n in (model.ln1_normalized(layer), model.pattern(layer))
    ]


def cached_batches(
    model: ModelAdapter | PlainModel, prompts: TaskPrompts, names: Sequence[str], batch_size: int
) -> Iterator[tuple[list[int], TaskPrompts, Tensor, dict[str, Tensor]]]:
    """Run ``model`` on ``prompts`` in batches of ``batch_size`` rows, caching only ``names``.

    Yields ``(rows, sub, logits, cache)``: the batch's row indices into ``prompts``, its
    :class:`~attncomm.tasks.base.TaskPrompts`, and the outputs of a run on its tokens cut to its longest
    prompt. Nothing is kept between batches (drop ``logits`` and ``cache`` to free them).
    """
    for batch in batch_ranges(len(prompts), batch_size):
        rows = list(batch)
        sub = prompts.subset(rows)
        width = int(sub.lengths.max())
        yield (rows, sub, *model.run_with_cache(sub.tokens[:, :width], names))


def cache_bytes(model: ModelAdapter | PlainModel, n_pos: int) -> int:
    """Bytes of the hooks :func:`needed_hooks` caches for one prompt of ``n_pos`` tokens (model dtype)."""
    a = model.arch
    per_layer = a.n_heads * n_pos * n_pos + n_pos * (3 * a.d_model + a.n_kv_heads * a.d_head + 4)
    return torch.empty((), dtype=model.dtype).element_size() * (a.n_layers * per_layer + n_pos * a.d_model)


def _prompt_tensors(
    model: ModelAdapter | PlainModel,
    cache: dict[str, Tensor],
    row: int,
    end: int,
    direction: Tensor,
    labels: dict[int, str],
    omega: OmegaCache,
    dtype: torch.dtype,
) -> PromptTensors:
    """One prompt's tensors (positions ``0..end``) out of a batch cache, in ``dtype`` on the model's device.

    Nothing leaves the device: with ``device=cuda`` the decomposition and contributions run on the GPU
    and only each chunk's per-firing results come back to the host. The attention patterns (one
    ``T x T`` tensor per layer and head) are the only tensors quadratic in the prompt length.
    """
    a, w = model.arch, model.weights
    n = end + 1
    L = a.n_layers
    device = model.device

    def get(name: str) -> Tensor:
        return cache[name][row].to(device, dtype)

    x = torch.stack([get(model.ln1_normalized(layer))[:n] for layer in range(L)])
    scale = torch.stack([get(model.ln1_scale(layer))[:n, 0] for layer in range(L)])
    pattern = torch.stack([get(model.pattern(layer))[:, :n, :n] for layer in range(L)])
    v = torch.stack([get(model.v(layer))[:n] for layer in range(L)])
    if v.shape[2] != a.n_heads:
        v = v.repeat_interleave(a.n_heads // v.shape[2], dim=2)
    mlp = torch.stack([get(model.mlp_out(layer))[:n] for layer in range(L)])
    gain = w.ln1_post_gain.to(device, dtype) if w.ln1_post_gain is not None else None
    post_scale = None
    if a.post_attn_norm:
        post_scale = torch.stack([get(model.ln1_post_scale(layer))[:n, 0] for layer in range(L)])
    bias = w.b_O.to(device, dtype)
    if gain is not None:
        bias = bias * gain
    writes = PromptWrites(
        vo=head_value_writes(v, w.W_O.to(device, dtype), gain),
        pattern=pattern,
        mlp=mlp,
        bias=bias,
        embed=get(model.resid_pre(0))[:n],
        post_scale=post_scale,
    )
    cos = sin = None
    if a.rotary:
        cos, sin = omega.tables(n)
        cos, sin = cos.to(device, dtype), sin.to(device, dtype)
    return PromptTensors(
        end=end,
        x=x,
        scale=scale,
        final_scale=get(model.ln_final_scale())[:n, 0],
        writes=writes,
        direction=direction.to(device, dtype),
        labels=labels,
        cos=cos,
        sin=sin,
        adjacent_pairs=a.rotary_adjacent_pairs,
    )


def trace_prompts(
    model: ModelAdapter | PlainModel,
    task: Task,
    prompts: TaskPrompts,
    *,
    prompt_ids: Sequence[int] | None = None,
    with_tokens: bool = False,
    skip_incorrect: bool = True,
    dtype: torch.dtype = torch.float32,
    omega_cache: OmegaCache | None = None,
    progress: bool = True,
    batch_size: int = 8,
    upstream_fraction: float = 0.7,
    seed_fraction: float = 1.0,
    max_memory_gb: float | None = None,
    spool_dir: str | Path | None = None,
    max_firings: int | None = None,
) -> Iterator[PromptTrace]:
    """Trace every prompt (batched forward passes, only the needed hooks cached) and yield its result.

    ``prompt_ids[i]`` is the id of ``prompts``' row ``i`` (default ``0..N-1``). Selection arithmetic
    (term selection, greedy rules) runs in ``dtype`` (float32 by default, as the reference).
    ``max_memory_gb`` bounds the chunked intermediates (``None``: a safe fraction of the available
    memory, :func:`attncomm.runtime.memory_budget.memory_budget_bytes`): the forward batch shrinks so
    that its cached hooks fit, and each layer's firings are traced in chunks that fit.

    ``spool_dir``: each firing's result is written, as soon as it is traced, to a temporary
    :class:`~attncomm.io.firing_spool.FiringSpool` file in that directory and read back on access, so
    the per-firing results of a long prompt never sit in memory (``None``: kept in a dict). A prompt's
    spool file is deleted once its :class:`PromptTrace` is dropped.

    ``max_firings`` (``None``: no limit): a prompt whose trace would have more than that many firings
    is stopped before the layer that passes the budget
    (:func:`~attncomm.core.prompt_graph.trace_prompt`) and yielded as skipped, ``"firing_budget"``,
    with no edges and no results (its spool, holding the layers traced so far, is deleted at once).
    """
    n_prompts = len(prompts)
    ids = list(range(n_prompts)) if prompt_ids is None else [int(i) for i in prompt_ids]
    if len(ids) != n_prompts:
        raise ValueError(f"trace_prompts: {len(ids)} prompt_ids for {n_prompts} prompts")
    omega = omega_cache if omega_cache is not None else build_omega_cache(model, dtype)
    labels_all = prompts.token_labels(model.tokenizer) if with_tokens else prompts.labels
    directions = task.direction(model.weights.W_U, prompts)
    budget = memory_budget_bytes(max_memory_gb, model.device)
    width_all = int(prompts.lengths.max()) if n_prompts else 1
    batch_size = max(1, min(batch_size, budget // max(1, cache_bytes(model, width_all))))
    bar = tqdm(total=n_prompts, desc="tracing prompts", disable=None if progress else True)
    for rows, sub, logits, cache in cached_batches(model, prompts, needed_hooks(model), batch_size):
        correct = task.is_correct(logits, sub).cpu()
        del logits
        for i, row in enumerate(rows):
            pid = ids[row]
            if skip_incorrect and not bool(correct[i]):
                yield PromptTrace(prompt_id=pid, edges=None, skip_reason="incorrect")
                bar.update(1)
                continue
            end = int(sub.end[i])
            pt = _prompt_tensors(model, cache, i, end, directions[row], labels_all[row], omega, dtype)
            if i == len(rows) - 1:
                cache.clear()  # the batch's hooks are no longer needed: free them before tracing
            spool = None if spool_dir is None else FiringSpool(spool_dir)
            res = trace_prompt(
                pt,
                omega,
                direction_name=task.direction_name,
                upstream_fraction=upstream_fraction,
                seed_fraction=seed_fraction,
                selection_dtype=dtype,
                progress=progress,
                memory_budget=budget,
                sink=None if spool is None else spool.prefixed_sink(pid),
                max_firings=max_firings,
            )
            del pt
            results: Mapping[FiringKey, FiringResult]
            if res.budget_stop is not None:  # nothing of a prompt stopped at the budget is kept
                if spool is not None:
                    spool.close()  # deletes the firings of the layers traced before the stop
                results = {}
            elif spool is None:
                results = {(pid, *key): value for key, value in res.results.items()}
            else:
                results = spool
            logger.debug("prompt %d: %d firings, skip=%s", pid, len(results), res.skip_reason)
            yield PromptTrace(
                prompt_id=pid,
                edges=res.edges,
                skip_reason=res.skip_reason,
                results=results,
                budget_stop=res.budget_stop,
            )
            del res, results, spool
            bar.update(1)
        del cache
    bar.close()


@dataclass
class CollectedSignals:
    """Every firing passing the filters (``table``, one row each) and the signals of the traceable ones.

    ``signals[i]`` is the unnormalized ``P_V x_s`` of ``table`` row ``i`` (zero where ``n_terms == 0``).
    """

    table: pd.DataFrame
    signals: np.ndarray


def collect_signals(
    model: ModelAdapter,
    prompts: TaskPrompts,
    prompt_ids: Sequence[int],
    omega: OmegaCache,
    *,
    min_attention: float,
    min_dest: int,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    progress: bool = True,
) -> CollectedSignals:
    """Run ``model`` on ``prompts`` (row ``i`` has id ``prompt_ids[i]``) and decompose every firing.

    All layers (0 included) and heads; positions ``0..end`` of each prompt; firings with
    ``A >= min_attention`` and ``d >= min_dest``, decomposed and selected in ``dtype`` as the tracer does
    (:func:`~attncomm.core.signal_clusters.layer_source_signals`). The table has
    :data:`~attncomm.core.signal_clusters.SIGNAL_COLUMNS` and
    :data:`~attncomm.core.signal_clusters.TOKEN_COLUMNS`.
    """
    import pandas as pd  # only here: tracing does not need pandas or scipy (signal_clusters)

    from attncomm.core.signal_clusters import (
        SIGNAL_COLUMNS,
        TOKEN_COLUMNS,
        is_punctuation,
        layer_source_signals,
    )

    a = model.arch
    tok = model.tokenizer
    rows: list[dict[str, Any]] = []
    signals: list[np.ndarray] = []
    bar = tqdm(total=len(prompts), desc="control signals: prompts", disable=None if progress else True)
    for idx, sub, logits, cache in cached_batches(model, prompts, signal_hooks(model), batch_size):
        del logits
        for i, row in enumerate(idx):
            pid = int(prompt_ids[row])
            end = int(sub.end[i])
            n = end + 1
            tokens = [int(t) for t in sub.tokens[i, :n]]
            texts = [tok.decode([t]) for t in tokens]
            punct = [is_punctuation(t) for t in texts]
            cos = sin = None
            if a.rotary:
                cos, sin = omega.tables(n)
                cos, sin = cos.to(dtype), sin.to(dtype)
            for layer in range(a.n_layers):
                x = cache[model.ln1_normalized(layer)][i, :n].to("cpu", dtype)
                pattern = cache[model.pattern(layer)][i, :, :n, :n].to("cpu", dtype)
                sig = layer_source_signals(
                    x,
                    pattern,
                    omega,
                    layer,
                    min_attention=min_attention,
                    min_dest=min_dest,
                    cos=cos,
                    sin=sin,
                    adjacent=a.rotary_adjacent_pairs,
                    selection_dtype=dtype,
                )
                for f in range(int(sig.heads.numel())):
                    s = int(sig.srcs[f])
                    rows.append(
                        {
                            "prompt": pid,
                            "layer": layer,
                            "head": int(sig.heads[f]),
                            "dest": int(sig.dests[f]),
                            "src": s,
                            "attention": float(sig.attention[f]),
                            "n_terms": int(sig.n_terms[f]),
                            "src_token": texts[s],
                            "is_punct": punct[s],
                        }
                    )
                signals.append(sig.signal.to(torch.float64).numpy())
            bar.update(1)
        del cache
    bar.close()
    table = pd.DataFrame(rows, columns=[*SIGNAL_COLUMNS, *TOKEN_COLUMNS])
    d_model = int(a.d_model)
    matrix = np.concatenate(signals, axis=0) if signals else np.zeros((0, d_model))
    return CollectedSignals(table=table.astype({"is_punct": bool}), signals=matrix)
