"""Edge-level attribution and patching on a loaded model: EAP, EAP-IG, exact edge patching and circuit
evaluation, all on the :mod:`attncomm.core.edge_graph` graph.

How the edge graph maps onto the model's hooks (TransformerLens 4.3 bridge, split q/k/v inputs and
``hook_mlp_in`` turned on):

- outputs: ``input`` = ``blocks.0.hook_resid_pre`` (token + position embeddings; Gemma-2's are scaled by
  ``sqrt(d_model)``); head ``a{l}.h{h}`` = ``hook_z[..., h, :] @ W_O[l, h]`` (its write into the residual;
  the shared ``b_O`` is a constant that no edge carries); ``m{l}`` = ``blocks.{l}.hook_mlp_out``.
- input slots: ``a{l}.h{h}<q|k|v>`` = ``blocks.{l}.hook_{q|k|v}_input[..., h, :]`` (the residual before
  ``ln1``, one copy per head); ``m{l}`` = ``blocks.{l}.hook_mlp_in`` (before ``ln2``); ``logits`` =
  ``ln_final.hook_in``.

Grouped-query models (Llama, Qwen2, Mistral, Gemma-2) get slots per *query* head: inside
:func:`edge_hooks_enabled` the model runs with its key/value projections repeated per query head
(:func:`attncomm.models.kv_heads.per_query_head_kv`, the same outputs), so ``hook_k_input[..., h, :]`` is
query head ``h``'s own key input and patching ``u -> a{l}.h{h}<k>`` leaves its group-mates' keys alone
(as EAP-IG does with TransformerLens's ``ungroup_grouped_query_attention``).

Gemma-2 normalises the summed attention output (``ln1_post``) and the MLP output (``ln2_post``) before
they enter the residual. The MLP's output is then simply ``hook_mlp_out`` (after ``ln2_post``); a head's
output is its share of ``hook_attn_out`` (after ``ln1_post``) in that same run:
``(hook_z[..., h, :] @ W_O[l, h] + b_O / n_heads) * gain / ln1_post.hook_scale``, which sum over the
heads to ``hook_attn_out`` exactly. So the residual is still the sum of the node outputs, and the
patching rule below holds (the head's output is measured after the post-norm of the run it is in, so a
patched run re-normalises). The attention-logit and final-logit softcaps and the scaled embeddings are
inside the model's forward pass and need nothing here.

Scores use the sign "clean minus corrupted": ``eap`` is ``sum_pos (out_u(clean) - out_u(corrupted)) .
d metric / d slot_v`` averaged over prompts, the first-order estimate of ``metric(clean) - metric(clean
with u -> v patched)``, which is exactly what ``exact`` measures. (EAP-IG stores ``corrupted - clean``,
the negation; selection uses absolute values, so circuits are the same.)
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from attncomm.core.edge_graph import EdgeGraph, GraphShape
from attncomm.errors import AttncommError
from attncomm.models.kv_heads import per_query_head_kv

logger = logging.getLogger(__name__)

#: ``metric(logits, prompt_indices) -> per-prompt metric`` of one batch
MetricFn = Callable[[Tensor, Tensor], Tensor]

ABLATIONS: tuple[str, ...] = ("patching", "mean", "zero")


class UnsupportedModelError(AttncommError, ValueError):
    """A model whose dataflow the edge graph cannot split (post-attention norms, shared key/value heads)."""


class EdgePatchingInputError(AttncommError, ValueError):
    """Clean and corrupted tokens that cannot be patched into each other, or a bad ablation name."""


def graph_shape(model: Any) -> GraphShape:
    """The edge-graph shape of a loaded model (a :class:`~attncomm.models.adapter.ModelAdapter`)."""
    a = model.arch
    return GraphShape(a.n_layers, a.n_heads, a.parallel_attn, a.d_model)


def check_supported(model: Any) -> None:
    """Refuse models whose heads' writes or key/value inputs cannot be patched per edge."""
    a = model.arch
    if a.n_heads % a.n_kv_heads:
        raise UnsupportedModelError(
            f"model {model.cfg.name!r} has {a.n_heads} query heads and {a.n_kv_heads} key/value heads, not a "
            "multiple; edge-level methods need each key/value head shared by a whole group of query heads"
        )


def check_pair(clean: Tensor, corrupted: Tensor) -> None:
    """Clean and corrupted tokens must have the same shape (positions are patched one to one)."""
    if clean.shape != corrupted.shape:
        raise EdgePatchingInputError(
            f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)} differ in "
            "shape; "
            "edge patching needs corrupted prompts of the same token length as the clean ones"
        )


@contextlib.contextmanager
def edge_hooks_enabled(model: Any) -> Iterator[None]:
    """Turn on split q/k/v inputs and ``hook_mlp_in``, give every query head its own key/value input
    (grouped-query models) and freeze the parameters for the block."""
    check_supported(model)
    model.set_split_qkv_input(True)
    model.bridge.set_use_hook_mlp_in(True)
    params = [p for p in model.bridge.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with per_query_head_kv(model.bridge, model.arch.n_heads, model.arch.n_kv_heads):
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _Layout:
    """Forward/backward index ranges of each hook of one graph."""

    def __init__(self, graph: EdgeGraph) -> None:
        self.g = graph
        self.L, self.H = graph.shape.n_layers, graph.shape.n_heads

    def heads(self, layer: int) -> slice:
        start = 1 + layer * (self.H + 1)
        return slice(start, start + self.H)

    def mlp(self, layer: int) -> int:
        return 1 + layer * (self.H + 1) + self.H

    def slots(self, layer: int, letter: str) -> slice:
        start = layer * (3 * self.H + 1) + "qkv".index(letter) * self.H
        return slice(start, start + self.H)

    def mlp_slot(self, layer: int) -> int:
        return layer * (3 * self.H + 1) + 3 * self.H

    def mlp_prev(self, layer: int) -> int:
        return self.heads(layer).start if self.g.shape.parallel_attn else self.mlp(layer)


#: ``write(rows, value)``: store the outputs ``value[n_rows, batch, pos, d_model]`` of forward rows ``rows``
WriteFn = Callable[[slice, Tensor], None]


def _into(buf: Tensor) -> WriteFn:
    """A writer that copies outputs into ``buf[n_forward, b, p, d]``."""

    def write(rows: slice, value: Tensor) -> None:
        buf[rows] = value

    return write


def _output_hooks(model: Any, lay: _Layout, write: WriteFn) -> list[tuple[str, Callable[..., Any]]]:
    """Forward hooks that hand every node's output of this run to ``write`` (in forward order).

    With a post-attention norm (Gemma-2) the heads' outputs are written at ``ln1_post.hook_scale``, when
    the run's normalisation scale is known: ``(z_h W_O[h] + b_O / n_heads) * gain / scale``."""
    W_O = model.weights.W_O
    post = bool(model.arch.post_attn_norm)
    hooks: list[tuple[str, Callable[..., Any]]] = []

    def on_input(t: Tensor, hook: Any) -> None:
        write(slice(0, 1), t.detach()[None])

    hooks.append(("blocks.0.hook_resid_pre", on_input))
    for layer in range(lay.L):

        def on_z(t: Tensor, hook: Any, layer: int = layer) -> None:
            write(lay.heads(layer), torch.einsum("bphe,hed->hbpd", t.detach(), W_O[layer].to(t.dtype)))

        def on_mlp(t: Tensor, hook: Any, layer: int = layer) -> None:
            m = lay.mlp(layer)
            write(slice(m, m + 1), t.detach()[None])

        if post:
            z_of: dict[int, Tensor] = {}
            gain = model.weights.ln1_post_gain[layer]
            b_O = model.weights.b_O[layer]

            def keep_z(t: Tensor, hook: Any, layer: int = layer, z_of: dict[int, Tensor] = z_of) -> None:
                z_of[layer] = t.detach()

            def on_scale(
                s: Tensor,
                hook: Any,
                layer: int = layer,
                z_of: dict[int, Tensor] = z_of,
                gain: Tensor = gain,
                b_O: Tensor = b_O,
            ) -> None:
                z = z_of.pop(layer)
                heads = torch.einsum("bphe,hed->hbpd", z, W_O[layer].to(z.dtype)) + (b_O / lay.H).to(z.dtype)
                write(lay.heads(layer), heads * (gain.to(z.dtype) / s.detach().to(z.dtype))[None])

            hooks.append((f"blocks.{layer}.attn.hook_z", keep_z))
            hooks.append((f"blocks.{layer}.ln1_post.hook_scale", on_scale))
        else:
            hooks.append((f"blocks.{layer}.attn.hook_z", on_z))
        hooks.append((f"blocks.{layer}.hook_mlp_out", on_mlp))
    return hooks


def _shape_of(model: Any, tokens: Tensor) -> tuple[int, int, int]:
    return int(tokens.shape[0]), int(tokens.shape[1]), int(model.arch.d_model)


def node_outputs(model: Any, graph: EdgeGraph, tokens: Int[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
    """``(logits, outputs[n_forward, batch, pos, d_model])`` of a plain run (no gradients)."""
    b, p, d = _shape_of(model, tokens)
    buf = torch.zeros(graph.n_forward, b, p, d, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(
            tokens.to(model.device), fwd_hooks=_output_hooks(model, _Layout(graph), _into(buf))
        )
    return logits, buf


#: ``on_grad(columns, hi, grad)``: the gradient ``[n_columns, batch, pos, d_model]`` of the input slots
#: ``columns``, which read the outputs with forward index below ``hi``
GradFn = Callable[[slice, int, Tensor], None]


def slot_gradients(
    model: Any,
    graph: EdgeGraph,
    tokens: Int[Tensor, "batch pos"],
    metric: Callable[[Tensor], Tensor],
    on_grad: GradFn,
    input_value: Tensor | None = None,
    before_backward: Callable[[Tensor], None] | None = None,
    extra_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
) -> tuple[Tensor, Tensor]:
    """One forward and one backward pass: returns ``(metric per prompt, outputs[n_forward, b, p, d])``.

    During the backward pass ``on_grad`` receives the gradient of ``sum(metric)`` at every input slot
    (each layer's q, k, v slots and MLP slot, then the logits), so callers reduce it at once instead of
    holding all slots' gradients. ``before_backward(outputs)`` runs between the passes.
    ``input_value`` replaces the ``input`` node's output (EAP-IG's interpolated embeddings);
    ``extra_hooks`` run after the others (the activation variant's interpolated layer outputs);
    parameters get no gradients.
    """
    b, p, d = _shape_of(model, tokens)
    lay = _Layout(graph)
    outs = torch.zeros(graph.n_forward, b, p, d, dtype=model.dtype, device=model.device)
    leaf: list[Tensor] = []

    def make_leaf(t: Tensor, hook: Any) -> Tensor:
        x = (input_value if input_value is not None else t).detach().clone().requires_grad_(True)
        leaf.append(x)
        return x

    def grad_hook(cols: slice, hi: int, per_head: bool) -> Callable[..., Tensor]:
        def fwd(t: Tensor, hook: Any) -> Tensor:
            def bwd(g: Tensor) -> None:
                on_grad(cols, hi, g.detach().permute(2, 0, 1, 3) if per_head else g.detach()[None])

            # a copy, so that only this slot's reader sees it (hook_mlp_in's tensor is also resid_mid,
            # which the residual connection adds to the MLP output)
            t = t.clone()
            t.register_hook(bwd)
            return t

        return fwd

    hooks: list[tuple[str, Callable[..., Any]]] = [("blocks.0.hook_resid_pre", make_leaf)]
    hooks += _output_hooks(model, lay, _into(outs))
    for layer in range(lay.L):
        hi = lay.heads(layer).start
        for letter in "qkv":
            hooks.append(
                (f"blocks.{layer}.hook_{letter}_input", grad_hook(lay.slots(layer, letter), hi, True))
            )
        mlp = lay.mlp_slot(layer)
        hooks.append(
            (f"blocks.{layer}.hook_mlp_in", grad_hook(slice(mlp, mlp + 1), lay.mlp_prev(layer), False))
        )
    last = graph.n_backward - 1
    hooks.append(("ln_final.hook_in", grad_hook(slice(last, last + 1), graph.n_forward, False)))
    hooks += list(extra_hooks)
    with torch.enable_grad():
        logits = model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=hooks)
        values = metric(logits)
        if before_backward is not None:
            before_backward(outs)
        torch.autograd.grad(values.sum(), leaf)
    return values.detach(), outs


def _batches(n: int, batch_size: int) -> list[Tensor]:
    if batch_size < 1:
        raise EdgePatchingInputError(f"batch size must be at least 1, got {batch_size}")
    return [torch.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def _runs(
    n: int, batch_size: int, positions: Tensor | None
) -> list[tuple[Tensor, int | None, Tensor | None]]:
    """``(prompt indices, positions kept, their read positions)`` of each batch of a patched evaluation.

    Without ``positions``: batches in prompt order, every position. With ``positions`` (the one position
    per prompt the metric reads): prompts sorted by that position so that a batch ends at its last
    prompt's position (a causal model's logits at a position do not depend on the later ones, so the
    positions after it are not run at all)."""
    if positions is None:
        return [(idx, None, None) for idx in _batches(n, batch_size)]
    order = torch.sort(positions.cpu(), stable=True).indices
    runs = []
    for chunk in _batches(n, batch_size):
        idx = order[chunk]
        runs.append((idx, int(positions[idx].max()) + 1, positions[idx]))
    return runs


def _call_metric(metric: MetricFn, idx: Tensor, logits: Tensor) -> Tensor:
    return metric(logits, idx)


def _eap_batch(
    model: Any,
    graph: EdgeGraph,
    clean: Tensor,
    corrupted: Tensor,
    metric: Callable[[Tensor], Tensor],
    ig_steps: int,
    scores: Tensor,
) -> None:
    """Add one batch's (unnormalised) EAP / EAP-IG scores to ``scores``."""
    _, out_corr = node_outputs(model, graph, corrupted)
    state: dict[str, Tensor] = {}

    def set_diff(outs: Tensor) -> None:
        if "diff" not in state:  # the first (alpha = 1) run is the clean run
            state["diff"] = (outs - out_corr).flatten(1)
            state["embed"] = outs[0]

    def on_grad(cols: slice, hi: int, g: Tensor) -> None:
        part = state["diff"][:hi] @ g.flatten(1).T
        scores[:hi, cols] += part.to(torch.float64) / ig_steps

    for k in range(ig_steps, 0, -1):  # alpha = 1 first: its outputs are the clean run's
        value = None
        if k != ig_steps:
            value = out_corr[0] + (k / ig_steps) * (state["embed"] - out_corr[0])
        slot_gradients(model, graph, clean, metric, on_grad, input_value=value, before_backward=set_diff)


#: EAP-IG's variants: integrated gradients on the inputs (embeddings) or on every layer's activations
IG_VARIANTS: tuple[str, ...] = ("inputs", "activations")


def _layer_outputs(model: Any, graph: EdgeGraph) -> list[str]:
    """The hooks whose values the activation variant interpolates, one per group of nodes: the
    embeddings, then per layer the attention output (all heads) and the MLP output."""
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(graph.shape.n_layers):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return names


def _eap_ig_activations_batch(
    model: Any,
    graph: EdgeGraph,
    clean: Tensor,
    corrupted: Tensor,
    metric: Callable[[Tensor], Tensor],
    ig_steps: int,
    scores: Tensor,
) -> None:
    """Add one batch's (unnormalised) EAP-IG activation-variant scores to ``scores``."""
    names = _layer_outputs(model, graph)
    with torch.no_grad():
        _, out_clean = node_outputs(model, graph, clean)
        _, out_corr = node_outputs(model, graph, corrupted)
        acts_clean = model.run_with_cache(clean, names)[1]
        acts_corr = model.run_with_cache(corrupted, names)[1]
    diff = (out_clean - out_corr).flatten(1)
    runs = len(names) * ig_steps

    def on_grad(cols: slice, hi: int, g: Tensor) -> None:
        scores[:hi, cols] += (diff[:hi] @ g.flatten(1).T).to(torch.float64) / runs

    for name in names:
        for k in range(1, ig_steps + 1):
            value = acts_corr[name] + (k / ig_steps) * (acts_clean[name] - acts_corr[name])
            if name == names[0]:
                slot_gradients(model, graph, clean, metric, on_grad, input_value=value)
            else:
                hook = (name, lambda t, hook, v=value: v)
                slot_gradients(model, graph, clean, metric, on_grad, extra_hooks=[hook])


def eap_scores(
    model: Any,
    graph: EdgeGraph,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    metric: MetricFn,
    batch_size: int = 8,
    ig_steps: int = 1,
    progress: bool = False,
    ig_variant: str = "inputs",
) -> Float[Tensor, "n_forward n_backward"]:
    """EAP (``ig_steps=1``) or EAP-IG on the inputs (``ig_steps > 1``) scores of every edge (float64).

    ``score(u -> v) = mean_prompts sum_pos (out_u(clean) - out_u(corrupted)) . g_v`` where ``g_v`` is the
    gradient of the metric at ``v``'s slot: at the clean run for EAP; for EAP-IG the mean over
    ``alpha = k / ig_steps`` (``k = 1..ig_steps``, a right Riemann sum, so one step is EAP) of the
    gradient at the run whose embeddings are ``corrupted + alpha (clean - corrupted)``. Pairs that are
    not edges are NaN. Per batch: one corrupted forward pass and ``ig_steps`` forward+backward passes;
    each slot's gradient is reduced against the output differences as soon as the backward pass
    produces it, so memory holds two ``[n_forward, batch, pos, d_model]`` tensors, not the slots'.

    ``ig_variant="activations"`` is EAP-IG's ``EAP-IG-activations`` (MIB's "EAP-IG-activations"): the
    outputs of one group of nodes at a time (the embeddings; all heads of a layer, i.e. the layer's
    attention output; an MLP) are set to ``corrupted + alpha (clean - corrupted)`` in a clean run, for
    ``alpha = k / ig_steps``, ``k = 1..ig_steps``; every edge's score is ``(out_u(clean) -
    out_u(corrupted)) . g_v`` averaged over all ``(1 + 2 n_layers) * ig_steps`` such runs (as EAP-IG, the
    gradient at every slot is taken in every run; the set group's output is a constant, so no gradient
    flows through it). Edges into the logits get exactly EAP's score at one step (their slot is after every
    group, and at ``alpha = 1`` every run's forward values are the clean run's). Per batch: 2 + 2 forward
    passes and ``(1 + 2 n_layers) * ig_steps`` forward+backward passes.
    """
    check_pair(clean, corrupted)
    if ig_steps < 1:
        raise EdgePatchingInputError(f"method.ig_steps must be at least 1, got {ig_steps}")
    if ig_variant not in IG_VARIANTS:
        raise EdgePatchingInputError(
            f"method.ig_variant={ig_variant!r} is not one of {', '.join(IG_VARIANTS)}"
        )
    one_batch = _eap_ig_activations_batch if ig_variant == "activations" else _eap_batch
    scores = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64, device=model.device)
    with edge_hooks_enabled(model):
        for idx in tqdm(
            _batches(len(clean), batch_size), desc="eap", leave=False, disable=None if progress else True
        ):
            batch_metric = functools.partial(_call_metric, metric, idx)
            one_batch(model, graph, clean[idx], corrupted[idx], batch_metric, ig_steps, scores)
    scores = scores.cpu() / len(clean)
    scores[~graph.real] = float("nan")
    return scores


# ---- ablations and patched runs -------------------------------------------------------------


@dataclass
class Ablation:
    """What an ablated edge carries: the parent's output in the corrupted run (``patching``), its mean
    over the task's prompts per position (``mean``, padding excluded), or zero (``zero``)."""

    kind: str
    corrupted: Tensor | None = None
    mean: Tensor | None = None  # [n_forward, 1, pos, d_model]

    def values(self, model: Any, graph: EdgeGraph, idx: Tensor, n_pos: int | None = None) -> Tensor | None:
        """The ablated outputs of the prompts ``idx`` at their first ``n_pos`` positions (None for zero)."""
        if self.kind == "patching":
            assert self.corrupted is not None
            return node_outputs(model, graph, self.corrupted[idx][:, :n_pos])[1]
        if self.kind == "mean":
            assert self.mean is not None
            return self.mean[:, :, :n_pos]
        return None


def make_ablation(
    kind: str,
    model: Any,
    graph: EdgeGraph,
    clean: Int[Tensor, "batch pos"],
    lengths: Int[Tensor, " batch"] | None = None,
    corrupted: Int[Tensor, "batch pos"] | None = None,
    batch_size: int = 8,
) -> Ablation:
    """Build the ablation ``kind`` (``patching`` needs corrupted tokens; ``mean`` runs the clean prompts)."""
    if kind not in ABLATIONS:
        raise EdgePatchingInputError(f"evaluate.ablation={kind!r} is not one of {', '.join(ABLATIONS)}")
    if kind == "patching":
        if corrupted is None:
            raise EdgePatchingInputError("ablation 'patching' needs corrupted prompts")
        check_pair(clean, corrupted)
        return Ablation(kind, corrupted=corrupted)
    if kind == "zero":
        return Ablation(kind)
    lengths = lengths if lengths is not None else torch.full((len(clean),), clean.shape[1])
    b, p, d = _shape_of(model, clean)
    total = torch.zeros(graph.n_forward, p, d, dtype=torch.float64)
    count = torch.zeros(p, dtype=torch.float64)
    with edge_hooks_enabled(model):
        for idx in _batches(len(clean), batch_size):
            _, outs = node_outputs(model, graph, clean[idx])
            mask = (torch.arange(p)[None, :] < lengths[idx][:, None]).to(torch.float64)  # [b, p]
            total += torch.einsum("nbpd,bp->npd", outs.to(torch.float64).cpu(), mask)
            count += mask.sum(0)
    mean = total / count.clamp(min=1.0)[None, :, None]
    return Ablation(kind, mean=mean[:, None].to(model.dtype).to(model.device))


def patched_logits(
    model: Any,
    graph: EdgeGraph,
    tokens: Int[Tensor, "batch pos"],
    ablated: Tensor | None,
    keep: Bool[Tensor, "n_forward n_backward"] | Bool[Tensor, "n_circuits n_forward n_backward"],
    positions: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "n_circuits batch pos d_vocab"]:
    """Run ``tokens`` with every edge outside ``keep`` carrying its parent's ablated output.

    ``ablated`` is ``[n_forward, batch|1, pos, d_model]`` (None = zero). With a stack of ``R`` circuits
    (``keep`` of shape ``[R, n_forward, n_backward]``) the batch is repeated ``R`` times and run in one
    forward pass, one circuit per copy; the logits are then ``[R, batch, pos, d_vocab]``. With
    ``positions`` (one position per prompt) the unembedding runs at that position only (the
    unembedding of a large vocabulary at every position is a third of GPT-2 small's forward pass) and the
    logits returned at every position are that position's (a broadcast view): for metrics that read the
    logits at ``positions`` only. Call inside :func:`edge_hooks_enabled`.

    How: in forward order, ``dbuf[r, i] = ablated_i - current_i`` is stored for every output ``i`` and
    circuit ``r``; a slot ``j`` with parents ``i < hi`` gets ``sum_i missing[r, i, j] dbuf[r, i]`` added,
    computed as one batched matrix product per layer for all ``3 n_heads`` q/k/v slots (over the rows
    that hold a missing edge), or as ``sum_{i < hi} dbuf[r, i] - sum_i kept[r, i, j] dbuf[r, i]`` (a
    running prefix sum) when fewer edges are kept than missing.
    """
    stacked = keep.ndim == 3
    keeps = keep if stacked else keep[None]
    R = int(keeps.shape[0])
    b, p, d = _shape_of(model, tokens)
    lay = _Layout(graph)
    dev = model.device
    real = graph.real.to(dev)
    keeps = keeps.to(dev) & real[None]
    missing = real[None] & ~keeps
    # dbuf[r, i] = ablated_i - current_i, filled in forward order (every row is written before it is read)
    dbuf = torch.empty(graph.n_forward, R, b, p, d, dtype=model.dtype, device=dev)
    abl = None if ablated is None else ablated[:, None]  # [n_forward, 1, batch|1, pos, d]
    prefix: dict[int, Tensor] = {0: torch.zeros(R, b, p, d, dtype=model.dtype, device=dev)}
    ready: dict[int, Tensor | None] = {}

    def write(rows: slice, value: Tensor) -> None:
        now = value.view(value.shape[0], R, b, p, d)
        if abl is None:
            torch.neg(now, out=dbuf[rows])
        else:
            torch.sub(abl[rows], now, out=dbuf[rows])

    def prefix_sum(hi: int) -> Tensor:
        if hi not in prefix:
            last = max(k for k in prefix if k < hi)
            prefix[hi] = prefix[last] + dbuf[last:hi].sum(0)
        return prefix[hi]

    def weighted(mask: Tensor) -> Tensor:
        """``sum_i mask[r, i, j] dbuf[r, i]`` as ``[R, n_cols, b, p, d]`` (over the rows with an entry)."""
        rows = torch.nonzero(mask.any(dim=2).any(dim=0)).flatten()
        n_cols = mask.shape[-1]
        if rows.numel() == 0:
            return torch.zeros(R, n_cols, b, p, d, dtype=dbuf.dtype, device=dev)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if 4 * rows.numel() < hi - lo:  # a few scattered rows: gather them
            src, w = dbuf[rows], mask[:, rows]
        else:  # a slice: a view, no copy
            src, w = dbuf[lo:hi], mask[:, lo:hi]
        flat = src.view(src.shape[0], R, b * p * d).transpose(0, 1)  # [R, rows, b p d] (strided)
        out = torch.bmm(w.transpose(1, 2).to(dbuf.dtype), flat)
        return out.view(R, n_cols, b, p, d)

    def delta(cols: slice, hi: int) -> Tensor | None:
        """What the slots ``cols`` get added, ``[R, n_cols, b, p, d]``: the sum of ``dbuf`` over their missing
        parents, computed from the fewer of the missing and the kept parents (every ``i < hi`` is one)."""
        m = missing[:, :hi, cols]  # [R, hi, n_cols]
        n_missing = int(m.sum())
        if n_missing == 0:
            return None
        k = keeps[:, :hi, cols]
        if int(k.sum()) < n_missing:
            out = prefix_sum(hi)[:, None]
            if bool(k.any()):
                out = out - weighted(k)
            return out.expand(R, m.shape[-1], b, p, d)
        return weighted(m)

    def qkv_hook(layer: int, letter: str) -> Callable[..., Tensor]:
        H = lay.H

        def fwd(t: Tensor, hook: Any) -> Tensor:
            if layer not in ready:  # the q, k and v slots of a layer in one product
                start = lay.slots(layer, "q").start
                ready[layer] = delta(slice(start, start + 3 * H), lay.heads(layer).start)
            dv = ready[layer]
            if dv is None:
                return t
            part = dv[:, "qkv".index(letter) * H : ("qkv".index(letter) + 1) * H]  # [R, H, b, p, d]
            # in place: t is this slot's own per-head copy of the residual (the split q/k/v fork)
            t.view(R, b, p, H, d).add_(part.permute(0, 2, 3, 1, 4))
            return t

        return fwd

    def single_hook(col: int, hi: int) -> Callable[..., Tensor]:
        def fwd(t: Tensor, hook: Any) -> Tensor:
            dv = delta(slice(col, col + 1), hi)
            return t if dv is None else t + dv[:, 0].reshape(R * b, p, d)

        return fwd

    run_tokens = tokens.to(model.device).repeat(R, 1)
    at = None
    if positions is not None:
        at = (torch.arange(R * b, device=dev), positions.to(dev).repeat(R))

    def only_at(t: Tensor, hook: Any) -> Tensor:
        return t[at][:, None]

    hooks = _output_hooks(model, lay, write)
    for layer in range(lay.L):
        for letter in "qkv":
            hooks.append((f"blocks.{layer}.hook_{letter}_input", qkv_hook(layer, letter)))
        hooks.append((f"blocks.{layer}.hook_mlp_in", single_hook(lay.mlp_slot(layer), lay.mlp_prev(layer))))
    hooks.append(("ln_final.hook_in", single_hook(graph.n_backward - 1, graph.n_forward)))
    if at is not None:  # the final norm is per position: unembed only the positions asked for
        hooks.append(("unembed.hook_in", only_at))
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(run_tokens, fwd_hooks=hooks)
    if at is not None:
        logits = logits.expand(R * b, p, logits.shape[-1])
    return logits.view(R, b, *logits.shape[1:]) if stacked else logits


def _copies(batch: int, copies: int | None) -> int:
    """How many circuits one forward pass runs: about 32 prompt copies per pass, at least one circuit."""
    return copies if copies is not None else max(1, 32 // max(1, batch))


def evaluate_circuits(
    model: Any,
    graph: EdgeGraph,
    clean: Int[Tensor, "batch pos"],
    ablation: Ablation,
    circuits: Sequence[Bool[Tensor, "n_forward n_backward"]],
    metric: MetricFn,
    batch_size: int = 8,
    progress: bool = False,
    copies: int | None = None,
    positions: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, " n_circuits"]:
    """Mean metric over the prompts of the model with each circuit (edges outside it ablated), float64.

    ``copies`` circuits share one forward pass (default: about 32 prompt copies per pass); circuits with
    the same edges run once. ``positions`` (per prompt): the only position the metric reads (a task's
    ``end``); the logits are then computed there only (:func:`patched_logits`), same values."""
    real = graph.real
    unique: list[Tensor] = []
    which: list[int] = []
    for keep in circuits:
        keep = keep & real
        hit = next((u for u, seen in enumerate(unique) if torch.equal(seen, keep)), None)
        if hit is None:
            unique.append(keep)
            hit = len(unique) - 1
        which.append(hit)
    sums = torch.zeros(len(unique), dtype=torch.float64)
    with edge_hooks_enabled(model):
        runs = _runs(len(clean), batch_size, positions)
        for idx, n_pos, at in tqdm(runs, desc="evaluate", leave=False, disable=None if progress else True):
            ablated = ablation.values(model, graph, idx, n_pos)
            step = _copies(len(idx), copies)
            for start in range(0, len(unique), step):
                keeps = torch.stack(unique[start : start + step])
                logits = patched_logits(model, graph, clean[idx][:, :n_pos], ablated, keeps, at)
                for r in range(len(keeps)):
                    sums[start + r] += metric(logits[r], idx).to(torch.float64).sum().cpu()
    return (sums / len(clean))[torch.tensor(which, dtype=torch.long)]


def exact_scores(
    model: Any,
    graph: EdgeGraph,
    clean: Int[Tensor, "batch pos"],
    ablation: Ablation,
    metric: MetricFn,
    batch_size: int = 8,
    edges: Sequence[tuple[int, int]] | None = None,
    progress: bool = False,
    copies: int | None = None,
    positions: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "n_forward n_backward"]:
    """Each edge's true effect: ``mean_prompts metric(clean) - metric(clean with that edge ablated)``.

    One patched copy of the batch per edge (``copies`` edges per forward pass): for toy and tiny models
    (and as the tests' reference).
    ``edges`` restricts the work to some ``(i, j)`` pairs; the others are NaN. ``positions``: as for
    :func:`evaluate_circuits`.
    """
    pairs = edges if edges is not None else [tuple(x) for x in torch.nonzero(graph.real).tolist()]
    scores = torch.full((graph.n_forward, graph.n_backward), float("nan"), dtype=torch.float64)
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    full = graph.full()
    with edge_hooks_enabled(model):
        runs = _runs(len(clean), batch_size, positions)
        for idx, n_pos, at in tqdm(runs, desc="exact", leave=False, disable=None if progress else True):
            ablated = ablation.values(model, graph, idx, n_pos)
            tokens = clean[idx][:, :n_pos]
            with torch.no_grad():
                base = metric(model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=[]), idx)
            step = _copies(len(idx), copies)
            for start in range(0, len(pairs), step):
                chunk = pairs[start : start + step]
                keeps = full[None].repeat(len(chunk), 1, 1)
                for r, (i, j) in enumerate(chunk):
                    keeps[r, i, j] = False
                logits = patched_logits(model, graph, tokens, ablated, keeps, at)
                for r in range(len(chunk)):
                    sums[start + r] += (base - metric(logits[r], idx)).to(torch.float64).sum().cpu()
    for e, (i, j) in enumerate(pairs):
        scores[i, j] = sums[e] / len(clean)
    return scores
