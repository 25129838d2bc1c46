"""In-memory ACC tracing driver: run a model on task prompts and trace each prompt (no file I/O).

:func:`trace_prompts` runs the :class:`~attncomm.models.ModelAdapter` on the prompts in batches,
caching only the hooks the maths reads (``ln1`` normalized input and scale, attention pattern, values,
MLP outputs, the embedding, ``ln_final`` scale and, for Gemma-2, ``ln1_post`` scale), then calls
:func:`attncomm.core.tracing.trace_prompt` per prompt and yields a :class:`PromptTrace` per prompt.
Omega SVDs come from an :class:`~attncomm.core.omega.OmegaCache` (built from the model's processed
weights if none is given, and reusable across calls).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.core.contributions import PromptWrites, head_value_writes
from attncomm.core.omega import OmegaCache
from attncomm.core.tracing import FiringResult, PromptTensors, trace_prompt
from attncomm.memory import memory_budget_bytes
from attncomm.models import ModelAdapter
from attncomm.tasks.base import Task, TaskPrompts

logger = logging.getLogger(__name__)

__all__ = ["PromptTrace", "build_omega_cache", "cache_bytes", "needed_hooks", "trace_prompts"]


@dataclass
class PromptTrace:
    """The tracing of one prompt: graph (None when skipped), skip reason and per-firing results.

    ``results`` is keyed by ``(prompt, l, h, d, s)``. ``skip_reason`` is None, ``"incorrect"``,
    ``"nonpositive_total"`` or ``"no_head_seed"``.
    """

    prompt_id: int
    graph: nx.MultiDiGraph | None
    skip_reason: str | None
    results: dict[tuple[int, int, int, int, int], FiringResult] = field(default_factory=dict)

    @property
    def n_firings(self) -> int:
        return len(self.results)


def build_omega_cache(model: ModelAdapter, dtype: torch.dtype = torch.float32) -> OmegaCache:
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


def needed_hooks(model: ModelAdapter) -> list[str]:
    """The hook names tracing reads (nothing else is cached)."""
    a = model.arch
    names = [model.resid_pre(0), model.ln_final_scale()]
    for layer in range(a.n_layers):
        names += [
            model.ln1_normalized(layer),
            model.ln1_scale(layer),
            model.pattern(layer),
            model.v(layer),
            model.mlp_out(layer),
        ]
        if a.post_attn_norm:
            names.append(model.ln1_post_scale(layer))
    return names


def cache_bytes(model: ModelAdapter, n_pos: int) -> int:
    """Bytes of the hooks :func:`needed_hooks` caches for one prompt of ``n_pos`` tokens (model dtype)."""
    a = model.arch
    per_layer = a.n_heads * n_pos * n_pos + n_pos * (3 * a.d_model + a.n_kv_heads * a.d_head + 4)
    return torch.empty((), dtype=model.dtype).element_size() * (a.n_layers * per_layer + n_pos * a.d_model)


def _prompt_tensors(
    model: ModelAdapter,
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
    model: ModelAdapter,
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
) -> Iterator[PromptTrace]:
    """Trace every prompt (batched forward passes, only the needed hooks cached) and yield its result.

    ``prompt_ids[i]`` is the id of ``prompts``' row ``i`` (default ``0..N-1``). Selection arithmetic
    (term selection, greedy rules) runs in ``dtype`` (float32 by default, as the reference).
    ``max_memory_gb`` bounds the chunked intermediates (``None``: a safe fraction of the available
    memory, :func:`attncomm.memory.memory_budget_bytes`): the forward batch shrinks so that its cached
    hooks fit, and each layer's firings are traced in chunks that fit.
    """
    n_prompts = len(prompts)
    ids = list(range(n_prompts)) if prompt_ids is None else [int(i) for i in prompt_ids]
    if len(ids) != n_prompts:
        raise ValueError(f"trace_prompts: {len(ids)} prompt_ids for {n_prompts} prompts")
    omega = omega_cache if omega_cache is not None else build_omega_cache(model, dtype)
    labels_all = prompts.token_labels(model.tokenizer) if with_tokens else prompts.labels
    directions = task.direction(model.weights.W_U, prompts)
    names = needed_hooks(model)
    budget = memory_budget_bytes(max_memory_gb, model.device)
    width_all = int(prompts.lengths.max()) if n_prompts else 1
    batch_size = max(1, min(batch_size, budget // max(1, cache_bytes(model, width_all))))
    bar = tqdm(total=n_prompts, desc="tracing prompts", disable=not progress)
    for start in range(0, n_prompts, batch_size):
        rows = list(range(start, min(n_prompts, start + batch_size)))
        sub = prompts.subset(rows)
        width = int(sub.lengths.max())
        logits, cache = model.run_with_cache(sub.tokens[:, :width], names)
        correct = task.is_correct(logits, sub).cpu()
        del logits
        for i, row in enumerate(rows):
            pid = ids[row]
            if skip_incorrect and not bool(correct[i]):
                yield PromptTrace(prompt_id=pid, graph=None, skip_reason="incorrect")
                bar.update(1)
                continue
            end = int(sub.end[i])
            pt = _prompt_tensors(model, cache, i, end, directions[row], labels_all[row], omega, dtype)
            if i == len(rows) - 1:
                cache.clear()  # the batch's hooks are no longer needed: free them before tracing
            res = trace_prompt(
                pt,
                omega,
                direction_name=task.direction_name,
                upstream_fraction=upstream_fraction,
                seed_fraction=seed_fraction,
                selection_dtype=dtype,
                progress=progress,
                memory_budget=budget,
            )
            results = {(pid, *key): value for key, value in res.results.items()}
            logger.debug("prompt %d: %d firings, skip=%s", pid, len(results), res.skip_reason)
            yield PromptTrace(prompt_id=pid, graph=res.graph, skip_reason=res.skip_reason, results=results)
            bar.update(1)
        del cache
    bar.close()
