"""Direct logit attribution (DLA) and the logit lens of a task metric at each prompt's answer position.

DLA: the final residual stream at ``end`` is a sum of components (token and position embeddings, every
layer's attention and MLP output; the attention output further split into heads plus the output bias).
TransformerLens's :meth:`ActivationCache.decompose_resid` and :meth:`ActivationCache.stack_head_results`
build the stacks and :meth:`ActivationCache.apply_ln_to_stack` applies the final norm with the
run's own (cached) scale, so each component's attribution is ``LN(component) . direction`` with the
task's direction ``task.direction(W_U, prompts)``. With the unembedding bias's share of the metric
(``task.metric`` of ``b_U`` alone) the components sum to the metric exactly for models whose logits are
linear in the final normalised residual (all but Gemma-2, whose final logit softcap is not).

Logit lens: the accumulated residual stream after each layer (and after each attention sublayer,
``resid_mid``, where the model has one) read through the model's own final norm (recomputed on that
residual, not the final one's scale) and the unembedding, giving the task metric "so far". The last
entry is the model's own metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from attncomm.analyses.common import metric_from_final, unembed_bias_metric

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.tasks.base import Task, TaskPrompts


def _run_cache(
    model: ModelAdapter, tokens: Tensor, fwd_hooks: Sequence[tuple[str, Any]] = ()
) -> tuple[Tensor, Any]:
    """The bridge's logits and full :class:`ActivationCache` of one run (optionally with hooks)."""
    bridge = model.bridge
    with torch.no_grad(), bridge.hooks(fwd_hooks=list(fwd_hooks)):
        logits, cache = bridge.run_with_cache(tokens.to(model.device))
    return logits, cache


def _at_end(
    stack: Float[Tensor, "comp batch pos d_model"], end: Tensor
) -> Float[Tensor, "comp batch d_model"]:
    rows = torch.arange(stack.shape[1], device=stack.device)
    return stack[:, rows, end.to(stack.device)]


def direct_logit_attribution(
    model: ModelAdapter,
    task: Task,
    prompts: TaskPrompts,
    tokens: Tensor | None = None,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> pd.DataFrame:
    """Per-prompt DLA of the task metric at ``end``; one row per (prompt, component).

    Columns: ``prompt``, ``kind`` (``embed``, ``pos_embed``, ``attn``, ``mlp``, ``head``, ``attn_bias``
    (the attention output not written by any head: ``b_O``), ``unembed_bias``, ``metric`` (the model's
    own metric) and ``residual_error`` (metric minus the sum of the components)), ``layer`` and ``head``
    (-1 where not applicable), ``value``. ``fwd_hooks`` are applied during the run (e.g. an ablation).
    The component rows ``embed``, ``pos_embed``, ``attn``, ``mlp`` and ``unembed_bias`` sum to
    ``metric``; ``head`` plus ``attn_bias`` rows of a layer sum to its ``attn`` row.
    """
    tokens = prompts.tokens if tokens is None else tokens
    logits, cache = _run_cache(model, tokens, fwd_hooks)
    end = prompts.end
    metric = task.metric(logits, prompts)
    direction = task.direction(model.weights.W_U, prompts).to(logits.dtype)

    comps, labels = cache.decompose_resid(layer=None, apply_ln=False, return_labels=True)
    comps = cache.apply_ln_to_stack(comps, layer=None)
    comp_attr = torch.einsum("cbd,bd->cb", _at_end(comps, end), direction)
    heads = cache.stack_head_results(layer=-1, apply_ln=True)
    head_attr = torch.einsum("cbd,bd->cb", _at_end(heads, end), direction)
    bias = unembed_bias_metric(model, task, prompts).to(metric.dtype)

    L, H = model.arch.n_layers, model.arch.n_heads
    n = len(prompts)
    rows: list[dict[str, Any]] = []

    def add(kind: str, layer: int, head: int, values: Tensor) -> None:
        for i, v in enumerate(values.tolist()):
            rows.append({"prompt": i, "kind": kind, "layer": layer, "head": head, "value": v})

    attn_by_layer: dict[int, Tensor] = {}
    for label, values in zip(labels, comp_attr, strict=True):
        if label in ("embed", "pos_embed"):
            add(label, -1, -1, values)
        else:
            layer_s, kind = label.split("_", 1)
            kind = "attn" if kind == "attn_out" else "mlp"
            add(kind, int(layer_s), -1, values)
            if kind == "attn":
                attn_by_layer[int(layer_s)] = values
    head_attr = head_attr.reshape(L, H, n)
    for layer in range(L):
        for head in range(H):
            add("head", layer, head, head_attr[layer, head])
        if layer in attn_by_layer:
            add("attn_bias", layer, -1, attn_by_layer[layer] - head_attr[layer].sum(0))
    add("unembed_bias", -1, -1, bias)
    add("metric", -1, -1, metric)
    add("residual_error", -1, -1, metric - comp_attr.sum(0) - bias)
    return pd.DataFrame(rows)


def dla_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over prompts of every (kind, layer, head) cell of a :func:`direct_logit_attribution` table."""
    return df.groupby(["kind", "layer", "head"], as_index=False)["value"].mean()


def logit_lens(
    model: ModelAdapter, task: Task, prompts: TaskPrompts, tokens: Tensor | None = None, incl_mid: bool = True
) -> pd.DataFrame:
    """The task metric read from the accumulated residual at ``end`` after every (sub)layer.

    Columns: ``prompt``, ``step`` (0 = embeddings, in residual order), ``label`` (TransformerLens's
    ``accumulated_resid`` label: ``0_pre``, ``0_mid``, ``1_pre``, ..., ``final_post``), ``layer`` (the
    block whose input (``pre``) or midpoint (``mid``) it is; ``n_layers`` for the final residual),
    ``kind`` (``pre``/``mid``/``post``), ``value``. The final norm is recomputed on each residual by the
    model's own ``ln_final`` module, then the unembedding (``W_U``, ``b_U``) is applied.
    """
    tokens = prompts.tokens if tokens is None else tokens
    logits, cache = _run_cache(model, tokens)
    incl_mid = incl_mid and any(k.endswith("hook_resid_mid") for k in cache.keys())
    stack, labels = cache.accumulated_resid(layer=None, incl_mid=incl_mid, apply_ln=False, return_labels=True)
    at_end = _at_end(stack, prompts.end)  # [step, batch, d_model]
    w = model.weights
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        normed = model.bridge.ln_final(at_end)
        for step, label in enumerate(labels):
            final = normed[step] @ w.W_U.to(normed.dtype) + w.b_U.to(normed.dtype)
            values = metric_from_final(task, prompts, final)
            layer_s, kind = label.split("_", 1)
            layer = model.arch.n_layers if layer_s == "final" else int(layer_s)
            for i, v in enumerate(values.tolist()):
                rows.append(
                    {"prompt": i, "step": step, "label": label, "layer": layer, "kind": kind, "value": v}
                )
    return pd.DataFrame(rows)
