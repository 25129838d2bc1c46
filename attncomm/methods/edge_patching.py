"""Edge-level attribution and patching on a loaded model: EAP, EAP-IG, exact edge patching and circuit
evaluation, all on the :mod:`attncomm.core.edge_graph` graph.

How the edge graph maps onto the model's hooks (TransformerLens 4.3 bridge, split q/k/v inputs and
``hook_mlp_in`` turned on):

- outputs: ``input`` = ``blocks.0.hook_resid_pre`` (token + position embeddings); head ``a{l}.h{h}`` =
  ``hook_z[..., h, :] @ W_O[l, h]`` (its write into the residual; the shared ``b_O`` is a constant that no
  edge carries); ``m{l}`` = ``blocks.{l}.hook_mlp_out``.
- input slots: ``a{l}.h{h}<q|k|v>`` = ``blocks.{l}.hook_{q|k|v}_input[..., h, :]`` (the residual before
  ``ln1``, one copy per head); ``m{l}`` = ``blocks.{l}.hook_mlp_in`` (before ``ln2``); ``logits`` =
  ``ln_final.hook_in``.

A slot's value is the sum of its parents' outputs plus constants (biases), so patching an edge
``u -> v`` means adding ``(ablated_u - current_u)`` to ``v``'s slot, where ``current_u`` is ``u``'s output in
the same (patched) run and ``ablated_u`` its output under the ablation (the corrupted run, the mean over
the task's prompts, or zero). This is EAP-IG's ``evaluate_graph``. Models whose heads do not write
additively into the residual (Gemma-2's post-attention norm) or whose key/value heads are shared
(grouped-query attention) are refused with a clear message: their slots cannot be split per edge here.

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
    name = model.cfg.name
    if a.post_attn_norm:
        raise UnsupportedModelError(
            f"model {name!r} normalises the attention output after summing the heads (post-attention "
            "norm, as Gemma-2), so a head's write into the residual is not additive; edge-level methods "
            "(eap, eap-ig, exact, evaluate) support GPT-2 and GPT-NeoX/Pythia-style models"
        )
    if a.n_kv_heads != a.n_heads:
        raise UnsupportedModelError(
            f"model {name!r} shares key/value heads between query heads (grouped-query attention, "
            f"{a.n_heads} query / {a.n_kv_heads} kv heads); per-query-head <k>/<v> slots are not split "
            "yet, so edge-level methods support GPT-2 and GPT-NeoX/Pythia-style models only"
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
    """Turn on split q/k/v inputs and ``hook_mlp_in`` and freeze the parameters for the block."""
    check_supported(model)
    model.set_split_qkv_input(True)
    model.bridge.set_use_hook_mlp_in(True)
    params = [p for p in model.bridge.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
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
    """Forward hooks that hand every node's output of this run to ``write`` (in forward order)."""
    W_O = model.weights.W_O
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
) -> tuple[Tensor, Tensor]:
    """One forward and one backward pass: returns ``(metric per prompt, outputs[n_forward, b, p, d])``.

    During the backward pass ``on_grad`` receives the gradient of ``sum(metric)`` at every input slot
    (each layer's q, k, v slots and MLP slot, then the logits), so callers reduce it at once instead of
    holding all slots' gradients. ``before_backward(outputs)`` runs between the passes.
    ``input_value`` replaces the ``input`` node's output (EAP-IG's interpolated embeddings); parameters
    get no gradients.
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


def eap_scores(
    model: Any,
    graph: EdgeGraph,
    clean: Int[Tensor, "batch pos"],
    corrupted: Int[Tensor, "batch pos"],
    metric: MetricFn,
    batch_size: int = 8,
    ig_steps: int = 1,
    progress: bool = False,
) -> Float[Tensor, "n_forward n_backward"]:
    """EAP (``ig_steps=1``) or EAP-IG on the inputs (``ig_steps > 1``) scores of every edge (float64).

    ``score(u -> v) = mean_prompts sum_pos (out_u(clean) - out_u(corrupted)) . g_v`` where ``g_v`` is the
    gradient of the metric at ``v``'s slot: at the clean run for EAP; for EAP-IG the mean over
    ``alpha = k / ig_steps`` (``k = 1..ig_steps``, a right Riemann sum, so one step is EAP) of the
    gradient at the run whose embeddings are ``corrupted + alpha (clean - corrupted)``. Pairs that are
    not edges are NaN. Per batch: one corrupted forward pass and ``ig_steps`` forward+backward passes;
    each slot's gradient is reduced against the output differences as soon as the backward pass
    produces it, so memory holds two ``[n_forward, batch, pos, d_model]`` tensors, not the slots'.
    """
    check_pair(clean, corrupted)
    if ig_steps < 1:
        raise EdgePatchingInputError(f"method.ig_steps must be at least 1, got {ig_steps}")
    scores = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64, device=model.device)
    with edge_hooks_enabled(model):
        for idx in tqdm(
            _batches(len(clean), batch_size), desc="eap", leave=False, disable=None if progress else True
        ):
            batch_metric = functools.partial(_call_metric, metric, idx)
            _eap_batch(model, graph, clean[idx], corrupted[idx], batch_metric, ig_steps, scores)
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

    def values(self, model: Any, graph: EdgeGraph, idx: Tensor) -> Tensor | None:
        """The ablated outputs of the prompts ``idx`` (None for zero)."""
        if self.kind == "patching":
            assert self.corrupted is not None
            return node_outputs(model, graph, self.corrupted[idx])[1]
        if self.kind == "mean":
            assert self.mean is not None
            return self.mean
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
) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "n_circuits batch pos d_vocab"]:
    """Run ``tokens`` with every edge outside ``keep`` carrying its parent's ablated output.

    ``ablated`` is ``[n_forward, batch|1, pos, d_model]`` (None = zero). With a stack of ``R`` circuits
    (``keep`` of shape ``[R, n_forward, n_backward]``) the batch is repeated ``R`` times and run in one
    forward pass, one circuit per copy; the logits are then ``[R, batch, pos, d_vocab]``. Call inside
    :func:`edge_hooks_enabled`.
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
    # dbuf[i] = ablated_i - current_i, filled in forward order; prefix[hi] = sum of dbuf[:hi]
    dbuf = torch.zeros(graph.n_forward, R, b, p, d, dtype=model.dtype, device=dev)
    abl = None if ablated is None else ablated[:, None]  # [n_forward, 1, batch|1, pos, d]
    prefix: dict[int, Tensor] = {0: torch.zeros(R, b, p, d, dtype=model.dtype, device=dev)}

    def write(rows: slice, value: Tensor) -> None:
        now = value.view(value.shape[0], R, b, p, d)
        dbuf[rows] = -now if abl is None else abl[rows] - now

    def prefix_sum(hi: int) -> Tensor:
        if hi not in prefix:
            last = max(k for k in prefix if k < hi)
            prefix[hi] = prefix[last] + dbuf[last:hi].sum(0)
        return prefix[hi]

    def delta(cols: slice, hi: int) -> Tensor | None:
        """What the slots ``cols`` get added: the sum of ``dbuf`` over their missing parents, computed
        from the fewer of the missing and the kept parents (every ``i < hi`` is a parent)."""
        m = missing[:, :hi, cols]  # [R, hi, n_cols]
        n_missing = int(m.sum())
        if n_missing == 0:
            return None
        k = keeps[:, :hi, cols]
        n_cols = m.shape[-1]
        if int(k.sum()) < n_missing:
            rows = torch.nonzero(k.any(dim=2).any(dim=0)).flatten()
            out = prefix_sum(hi)[None].expand(n_cols, R, b, p, d)
            if rows.numel():
                kept = torch.einsum("irbpd,rij->jrbpd", dbuf[rows], k[:, rows].to(dbuf.dtype))
                out = out - kept
        else:
            rows = torch.nonzero(m.any(dim=2).any(dim=0)).flatten()
            out = torch.einsum("irbpd,rij->jrbpd", dbuf[rows], m[:, rows].to(dbuf.dtype))
        return out.reshape(n_cols, R * b, p, d)

    def slot_hook(cols: slice, hi: int) -> Callable[..., Tensor]:
        def fwd(t: Tensor, hook: Any) -> Tensor:
            dv = delta(cols, hi)
            return t if dv is None else t + dv.permute(1, 2, 0, 3)

        return fwd

    def single_hook(col: int, hi: int) -> Callable[..., Tensor]:
        def fwd(t: Tensor, hook: Any) -> Tensor:
            dv = delta(slice(col, col + 1), hi)
            return t if dv is None else t + dv[0]

        return fwd

    hooks = _output_hooks(model, lay, write)
    for layer in range(lay.L):
        hi = lay.heads(layer).start
        for letter in "qkv":
            hooks.append((f"blocks.{layer}.hook_{letter}_input", slot_hook(lay.slots(layer, letter), hi)))
        hooks.append((f"blocks.{layer}.hook_mlp_in", single_hook(lay.mlp_slot(layer), lay.mlp_prev(layer))))
    hooks.append(("ln_final.hook_in", single_hook(graph.n_backward - 1, graph.n_forward)))
    run_tokens = tokens.to(model.device).repeat(R, 1)
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(run_tokens, fwd_hooks=hooks)
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
) -> Float[Tensor, " n_circuits"]:
    """Mean metric over the prompts of the model with each circuit (edges outside it ablated), float64.

    ``copies`` circuits share one forward pass (default: about 32 prompt copies per pass); circuits with
    the same edges run once."""
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
        for idx in tqdm(
            _batches(len(clean), batch_size), desc="evaluate", leave=False, disable=None if progress else True
        ):
            ablated = ablation.values(model, graph, idx)
            step = _copies(len(idx), copies)
            for start in range(0, len(unique), step):
                keeps = torch.stack(unique[start : start + step])
                logits = patched_logits(model, graph, clean[idx], ablated, keeps)
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
) -> Float[Tensor, "n_forward n_backward"]:
    """Each edge's true effect: ``mean_prompts metric(clean) - metric(clean with that edge ablated)``.

    One patched copy of the batch per edge (``copies`` edges per forward pass): for toy and tiny models
    (and as the tests' reference).
    ``edges`` restricts the work to some ``(i, j)`` pairs; the others are NaN.
    """
    pairs = edges if edges is not None else [tuple(x) for x in torch.nonzero(graph.real).tolist()]
    scores = torch.full((graph.n_forward, graph.n_backward), float("nan"), dtype=torch.float64)
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    full = graph.full()
    with edge_hooks_enabled(model):
        for idx in tqdm(
            _batches(len(clean), batch_size), desc="exact", leave=False, disable=None if progress else True
        ):
            ablated = ablation.values(model, graph, idx)
            with torch.no_grad():
                base = metric(model.bridge.run_with_hooks(clean[idx].to(model.device), fwd_hooks=[]), idx)
            step = _copies(len(idx), copies)
            for start in range(0, len(pairs), step):
                chunk = pairs[start : start + step]
                keeps = full[None].repeat(len(chunk), 1, 1)
                for r, (i, j) in enumerate(chunk):
                    keeps[r, i, j] = False
                logits = patched_logits(model, graph, clean[idx], ablated, keeps)
                for r in range(len(chunk)):
                    sums[start + r] += (base - metric(logits[r], idx)).to(torch.float64).sum().cpu()
    for e, (i, j) in enumerate(pairs):
        scores[i, j] = sums[e] / len(clean)
    return scores
