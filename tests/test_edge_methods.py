"""Edge-level methods on real (tiny) models: EAP against hand autograd, EAP-IG(1) = EAP, exact against a
hand-written patching hook, evaluation end points, and the ACC mapping."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from attncomm.core.edge_graph import EdgeGraph
from attncomm.methods.edge_patching import (
    eap_scores,
    edge_hooks_enabled,
    evaluate_circuits,
    exact_scores,
    graph_shape,
    make_ablation,
)
from attncomm.models.adapter import ModelAdapter
from tests.edge_fixtures import hand_corrupted, ioi_prompts, load_toy_ioi, task_metric
from tests.models_fixtures import load_tiny, test_cache_dir, tiny_model_config

#: the shared adapters handed out by :func:`tiny64` in this process
_HANDED_OUT: dict[str, ModelAdapter] = {}


def tiny64(builder: str) -> ModelAdapter:
    """The process's float64 tiny model (``load_tiny``), in its loaded state.

    Edge methods switch split q/k/v inputs and ``hook_mlp_in`` on and leave them on; the autouse
    fixture :func:`_restore_loaded_state` switches them off again after each test, so the adapter other
    test modules share is unchanged (its runs equal those before, bit for bit: the first test checks).
    """
    model = load_tiny(builder, torch.float64)
    _HANDED_OUT[builder] = model
    return model


def _restore(model: ModelAdapter) -> None:
    """Switch off what :func:`edge_hooks_enabled` leaves on (the loaded state has both off)."""
    model.set_split_qkv_input(False)
    model.bridge.set_use_hook_mlp_in(False)
    assert all(p.requires_grad for p in model.bridge.parameters())


@pytest.fixture(autouse=True)
def _restore_loaded_state() -> Iterator[None]:
    yield
    for model in _HANDED_OUT.values():
        _restore(model)


def test_restoring_the_shared_adapter_restores_its_runs() -> None:
    """What :func:`tiny64` relies on: after the edge hooks and :func:`_restore`, the shared adapter runs
    exactly as loaded (Gemma-2's split q/k/v path rounds differently, so a leftover would show)."""
    model = tiny64("tiny-gemma2")
    _restore(model)
    tokens = random_pair(7)[0]
    before = model.run_with_hooks(tokens, [])
    with edge_hooks_enabled(model):
        pass
    assert not torch.equal(model.run_with_hooks(tokens, []), before)
    _restore(model)
    assert torch.equal(model.run_with_hooks(tokens, []), before)


def random_pair(seed: int = 0, b: int = 3, p: int = 7) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (b, p), generator=g), torch.randint(0, 500, (b, p), generator=g)


def last_pos_metric(logits: Tensor, idx: Tensor) -> Tensor:
    return logits[:, -1, 11] - logits[:, -1, 42]


# ---- hand references ---------------------------------------------------------------------------


def _out_values(model: ModelAdapter, tokens: Tensor, nodes: list[str]) -> dict[str, Tensor]:
    """Nodes' outputs, read with plain hooks from one run: embeddings, hook_z @ W_O of one head, or
    hook_mlp_out."""
    names: dict[str, list[str]] = {}
    for node in nodes:
        if node == "input":
            name = "blocks.0.hook_resid_pre"
        elif node.startswith("m"):
            name = f"blocks.{int(node[1:])}.hook_mlp_out"
        else:
            layer = int(node[1 : node.index(".")])
            name = f"blocks.{layer}.attn.hook_z"
        names[node] = [name]
        if node.startswith("a") and model.arch.post_attn_norm:
            names[node].append(name.replace("attn.hook_z", "ln1_post.hook_scale"))
    _, cache = model.run_with_cache(tokens, sorted({n for v in names.values() for n in v}))
    out = {}
    for node in nodes:
        value = cache[names[node][0]]
        if node.startswith("a"):
            layer, head = (int(x) for x in node[1:].split(".h"))
            value = value[:, :, head] @ model.weights.W_O[layer, head]
            if model.arch.post_attn_norm:  # its share of the post-normed attention output (b_O is zero)
                assert not model.weights.b_O.any()
                value = value * model.weights.ln1_post_gain[layer] / cache[names[node][1]]
        out[node] = value
    return out


def _out_value(model: ModelAdapter, tokens: Tensor, node: str) -> Tensor:
    """One node's output (:func:`_out_values`)."""
    return _out_values(model, tokens, [node])[node]


def _diffs(model: ModelAdapter, plus: Tensor, minus: Tensor, edges: list[str]) -> dict[str, Tensor]:
    """``out_u(plus) - out_u(minus)`` of the parent ``u`` of every edge, by edge (detached)."""
    parents = sorted({edge.split("->")[0] for edge in edges})
    a, b = _out_values(model, plus, parents), _out_values(model, minus, parents)
    return {edge: (a[edge.split("->")[0]] - b[edge.split("->")[0]]).detach() for edge in edges}


def _slot_hook(slot: str, add) -> tuple[str, object]:
    """(hook name, fn) adding ``add(t_slice)`` to one input slot."""
    if slot == "logits":
        return "ln_final.hook_in", lambda t, hook: t + add(t)
    if slot.startswith("m"):
        return f"blocks.{int(slot[1:])}.hook_mlp_in", lambda t, hook: t + add(t)
    node, letter = slot[:-3], slot[-2]
    layer, head = (int(x) for x in node[1:].split(".h"))

    def fn(t: Tensor, hook) -> Tensor:
        t = t.clone()
        t[:, :, head] = t[:, :, head] + add(t[:, :, head])
        return t

    return f"blocks.{layer}.hook_{letter}_input", fn


def _eps_hooks(edges: list[str], diffs: dict[str, Tensor]) -> tuple[list[Tensor], list[tuple[str, object]]]:
    """One zero scalar ``eps_e`` per edge and the hooks adding ``eps_e * diff_e`` to each edge's slot.

    d metric / d eps_e at eps = 0 is edge e's directional derivative whatever the other edges' eps are
    (they add exact zeros), so one backward pass gives the derivatives of all the edges."""
    eps = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in edges]
    hooks = [
        _slot_hook(edge.split("->")[1], lambda t, e=e, d=diffs[edge]: e * d)
        for edge, e in zip(edges, eps, strict=True)
    ]
    return eps, hooks


def _grads(value: Tensor, eps: list[Tensor]) -> list[float]:
    """d value / d eps (0 where ``value`` does not depend on an eps)."""
    if not value.requires_grad:  # no slot feeds the metric (e.g. all of them behind a held output)
        return [0.0] * len(eps)
    grads = torch.autograd.grad(value, eps, allow_unused=True)
    return [0.0 if g is None else float(g) for g in grads]


def hand_eap(model, clean, corrupted, metric, edges: list[str]) -> dict[str, float]:
    """By edge: d/d eps of metric(clean, slot += eps * (out_u(clean) - out_u(corrupted))) at eps = 0
    (autograd), averaged over the prompts.

    The gradient of the *sum* over prompts is taken and then divided, as ``eap_scores`` does: the bridge's
    rotary attention (Llama, Gemma-2) computes its softmax in float32 even in a float64 model, so the
    gradient of the mean would be rounded differently there (about 1e-7 relative)."""
    with edge_hooks_enabled(model):
        eps, hooks = _eps_hooks(edges, _diffs(model, clean, corrupted, edges))
        with torch.enable_grad():
            logits = model.bridge.run_with_hooks(clean, fwd_hooks=hooks)
            grads = _grads(metric(logits, torch.arange(len(clean))).sum(), eps)
    return {edge: g / len(clean) for edge, g in zip(edges, grads, strict=True)}


def hand_ig(model, clean, corrupted, metric, edges: list[str], steps: int) -> dict[str, float]:
    """By edge, the EAP-IG score by hand: the mean over alpha = k/steps of the directional derivative of
    the metric along (out_u(clean) - out_u(corrupted)) at slot v, embeddings interpolated by alpha."""
    total = dict.fromkeys(edges, 0.0)
    with edge_hooks_enabled(model):
        diffs = _diffs(model, clean, corrupted, edges)
        emb_clean = _out_value(model, clean, "input").detach()
        emb_corr = _out_value(model, corrupted, "input").detach()
        for k in range(1, steps + 1):
            eps, hooks = _eps_hooks(edges, diffs)
            embed = emb_corr + (k / steps) * (emb_clean - emb_corr)
            hooks = [("blocks.0.hook_resid_pre", lambda t, hook, e=embed: e), *hooks]
            with torch.enable_grad():
                logits = model.bridge.run_with_hooks(clean, fwd_hooks=hooks)
                grads = _grads(metric(logits, torch.arange(len(clean))).sum(), eps)
            for edge, g in zip(edges, grads, strict=True):
                total[edge] += g / len(clean)
    return {edge: t / steps for edge, t in total.items()}


def hand_exact(model, clean, corrupted, metric, edges: list[str]) -> dict[str, float]:
    """By edge: metric(clean) - metric(clean with only u -> v carrying u's corrupted output), by one hand
    hook (one patched run per edge)."""
    idx = torch.arange(len(clean))
    out = {}
    with edge_hooks_enabled(model):
        diffs = _diffs(model, corrupted, clean, edges)
        with torch.no_grad():
            base = metric(model.bridge.run_with_hooks(clean, fwd_hooks=[]), idx)
            for edge in edges:
                name, fn = _slot_hook(edge.split("->")[1], lambda t, d=diffs[edge]: d)
                patched = model.bridge.run_with_hooks(clean, fwd_hooks=[(name, fn)])
                out[edge] = float((base - metric(patched, idx)).mean())
    return out


#: the families: GPT-2 (3 layers), Pythia (3 layers, parallel attention), Llama and Qwen2 (2 layers,
#: grouped-query attention 4 query / 2 kv heads, Qwen2 with q/k/v biases), Gemma-2 (2 layers, GQA,
#: post-attention and post-MLP norms, softcaps, scaled embeddings)
FAMILIES = ["tiny-gpt2", "tiny-pythia", "tiny-llama", "tiny-qwen2", "tiny-gemma2"]


def some_edges(graph: EdgeGraph) -> list[str]:
    """Edges of every kind for a 2- or 3-layer graph (last = the top layer), including the key and value
    inputs of two query heads that share a kv head in the grouped-query models."""
    top = graph.shape.n_layers - 1
    edges = [
        "input->a0.h1<q>",
        f"input->a{top}.h0<k>",
        f"a0.h2->a{top}.h3<v>",
        f"a0.h1->a{top}.h0<k>",
        f"a0.h1->a{top}.h1<k>",
        f"a0.h3->a{top}.h1<v>",
        f"m0->a{top}.h0<q>",
        f"a{top}.h1->logits",
        f"m{top}->logits",
    ]
    edges.append("a0.h0->m1" if graph.shape.parallel_attn else "a0.h0->m0")
    return edges


@pytest.mark.parametrize("builder", FAMILIES)
def test_eap_equals_hand_autograd_and_ig1(builder: str) -> None:
    model = tiny64(builder)
    graph = EdgeGraph(graph_shape(model))
    clean, corrupted = random_pair()
    scores = eap_scores(model, graph, clean, corrupted, last_pos_metric, batch_size=2)
    assert scores.dtype == torch.float64 and torch.isnan(scores[~graph.real]).all()
    assert not torch.isnan(scores[graph.real]).any()
    edges = some_edges(graph)
    hand = hand_eap(model, clean, corrupted, last_pos_metric, edges)
    for edge in edges:
        i, j = graph.edge_index(edge)
        assert abs(float(scores[i, j]) - hand[edge]) < 1e-9, edge
    ig1 = eap_scores(model, graph, clean, corrupted, last_pos_metric, batch_size=3, ig_steps=1)
    torch.testing.assert_close(ig1[graph.real], scores[graph.real], rtol=0, atol=1e-9)
    ig3 = eap_scores(model, graph, clean, corrupted, last_pos_metric, batch_size=3, ig_steps=3)
    assert not torch.allclose(ig3[graph.real], scores[graph.real])  # more steps: a different estimate
    ig_edges = ["input->a1.h0<k>", "a1.h1->logits", "a0.h1->a1.h1<v>"]
    hand_ig3 = hand_ig(model, clean, corrupted, last_pos_metric, ig_edges, 3)
    for edge in ig_edges:
        i, j = graph.edge_index(edge)
        assert abs(float(ig3[i, j]) - hand_ig3[edge]) < 1e-9, edge


def test_parallel_mlp_does_not_read_same_layer_heads() -> None:
    model = tiny64("tiny-pythia")
    graph = EdgeGraph(graph_shape(model))
    assert graph.shape.parallel_attn
    with pytest.raises(Exception, match="unknown edge"):
        graph.edge_index("a0.h0->m0")
    # and the model agrees: patching a0.h0's output into m0's input would be a no-op edge; m0 reads resid_pre
    clean, corrupted = random_pair(1)
    assert hand_exact(model, clean, corrupted, last_pos_metric, ["a0.h0->m1"])["a0.h0->m1"] != 0.0


def test_eap_on_toy_ioi_equals_hand_autograd() -> None:
    model = load_toy_ioi()
    prompts = ioi_prompts(model, 5)
    corrupted = hand_corrupted(prompts)
    metric = task_metric(prompts)
    graph = EdgeGraph(graph_shape(model))
    scores = eap_scores(model, graph, prompts.tokens, corrupted, metric, batch_size=2)
    edges = ["input->a0.h1<k>", "a1.h2->a2.h0<q>", "a2.h3->logits", "a0.h0->a2.h1<v>"]
    hand = hand_eap(model, prompts.tokens, corrupted, metric, edges)
    for edge in edges:
        i, j = graph.edge_index(edge)
        assert abs(float(scores[i, j]) - hand[edge]) < 1e-9, edge


@pytest.mark.parametrize("builder", FAMILIES)
def test_exact_equals_hand_patching(builder: str) -> None:
    model = tiny64(builder)
    graph = EdgeGraph(graph_shape(model))
    clean, corrupted = random_pair(2)
    ablation = make_ablation("patching", model, graph, clean, corrupted=corrupted)
    edges = some_edges(graph)
    pairs = [graph.edge_index(e) for e in edges]
    scores = exact_scores(model, graph, clean, ablation, last_pos_metric, batch_size=2, edges=pairs)
    hand = hand_exact(model, clean, corrupted, last_pos_metric, edges)
    for edge, (i, j) in zip(edges, pairs, strict=True):
        assert abs(float(scores[i, j]) - hand[edge]) < 1e-9, edge
    assert torch.isnan(scores[0, graph.in_index["m0"]])  # not asked for


@pytest.mark.parametrize("ablation_kind", ["patching", "mean", "zero"])
def test_evaluate_end_points(ablation_kind: str) -> None:
    model = load_toy_ioi()
    prompts = ioi_prompts(model, 4)
    corrupted = hand_corrupted(prompts)
    metric = task_metric(prompts)
    graph = EdgeGraph(graph_shape(model))
    ablation = make_ablation(
        ablation_kind, model, graph, prompts.tokens, prompts.lengths, corrupted=corrupted, batch_size=3
    )
    full, empty = evaluate_circuits(
        model, graph, prompts.tokens, ablation, [graph.full(), graph.empty()], metric, batch_size=3
    )
    with torch.no_grad():
        clean_metric = metric(
            model.bridge.run_with_hooks(prompts.tokens, fwd_hooks=[]), torch.arange(4)
        ).mean()
        corrupt_metric = metric(model.bridge.run_with_hooks(corrupted, fwd_hooks=[]), torch.arange(4)).mean()
    assert abs(float(full) - float(clean_metric)) < 1e-9
    if ablation_kind == "patching":
        # every edge carries the corrupted run's values: the corrupted run itself
        assert abs(float(empty) - float(corrupt_metric)) < 1e-9
        faith = (empty - empty) / (full - empty)
        assert float(faith) == 0.0
    else:
        assert abs(float(empty) - float(clean_metric)) > 1e-6


@pytest.mark.parametrize("builder", FAMILIES)
def test_evaluate_all_and_no_edges_every_family(builder: str) -> None:
    """All edges kept = the clean run, none kept (patching) = the corrupted run, so faithfulness 1 / 0."""
    model = tiny64(builder)
    graph = EdgeGraph(graph_shape(model))
    clean, corrupted = random_pair(4)
    idx = torch.arange(len(clean))
    ablation = make_ablation("patching", model, graph, clean, corrupted=corrupted)
    full, empty = evaluate_circuits(
        model, graph, clean, ablation, [graph.full(), graph.empty()], last_pos_metric, batch_size=2
    )
    clean_m = last_pos_metric(model.run_with_hooks(clean, []), idx).mean()
    corr_m = last_pos_metric(model.run_with_hooks(corrupted, []), idx).mean()
    assert abs(float(clean_m) - float(corr_m)) > 1e-3  # the end points differ
    assert abs(float(full) - float(clean_m)) < 1e-9
    assert abs(float(empty) - float(corr_m)) < 1e-9


@pytest.mark.parametrize("builder", ["tiny-llama", "tiny-gemma2"])
def test_grouped_kv_heads_patched_per_query_head(builder: str) -> None:
    """Query heads 0 and 1 share kv head 0. Ablating ``a0.h1 -> a1.h0<k>`` and ``-> a1.h1<k>`` together
    equals patching the shared key input of the grouped model (a hand hook outside the edge context);
    ablating only one of them differs; the model is unchanged after the edge context."""
    model = tiny64(builder)
    assert model.arch.n_kv_heads == 2 and model.arch.n_heads == 4
    graph = EdgeGraph(graph_shape(model))
    clean, corrupted = random_pair(5)
    idx = torch.arange(len(clean))
    ablation = make_ablation("patching", model, graph, clean, corrupted=corrupted)
    both, one = graph.full(), graph.full()
    for name in ["a0.h1->a1.h0<k>", "a0.h1->a1.h1<k>"]:
        both[graph.edge_index(name)] = False
    one[graph.edge_index("a0.h1->a1.h0<k>")] = False
    got_both, got_one = evaluate_circuits(model, graph, clean, ablation, [both, one], last_pos_metric, 2)
    # outside the edge context: the grouped model, one key input per kv head
    model.set_split_qkv_input(True)
    diff = _out_value(model, corrupted, "a0.h1") - _out_value(model, clean, "a0.h1")

    def patch_kv0(t: Tensor, hook) -> Tensor:
        assert t.shape[2] == 2  # grouped again: n_kv_heads key inputs
        t = t.clone()
        t[:, :, 0] = t[:, :, 0] + diff
        return t

    hand = last_pos_metric(model.run_with_hooks(clean, [("blocks.1.hook_k_input", patch_kv0)]), idx).mean()
    assert abs(float(got_both) - float(hand)) < 1e-9
    assert abs(float(got_one) - float(got_both)) > 1e-6


def test_patched_runs_against_hand_hooks() -> None:
    """Two circuits whose patched runs a plain hook reproduces: (a) every edge except those out of one
    node = that node's output patched from the corrupted run; (b) only the edges input->logits and
    a0.h0->logits = the corrupted run plus (clean - corrupted) embeddings at the final residual."""
    model = tiny64("tiny-gpt2")
    graph = EdgeGraph(graph_shape(model))
    clean, corrupted = random_pair(3)
    idx = torch.arange(len(clean))
    ablation = make_ablation("patching", model, graph, clean, corrupted=corrupted)
    without_a1h2 = graph.full()
    without_a1h2[graph.out_index["a1.h2"]] = False
    only_two = graph.empty()
    for name in ["input->logits", "a0.h0->logits"]:
        only_two[graph.edge_index(name)] = True
    got = evaluate_circuits(
        model, graph, clean, ablation, [without_a1h2, only_two], last_pos_metric, 3, copies=2
    )
    with edge_hooks_enabled(model):
        corr_result = _out_value(model, corrupted, "a1.h2")
        clean_result = _out_value(model, clean, "a1.h2")
        emb_diff = _out_value(model, clean, "input") - _out_value(model, corrupted, "input")
        with torch.no_grad():
            # (a): a1.h2's write replaced: add (corrupted - clean) of its result to the attention output
            a = model.bridge.run_with_hooks(
                clean, fwd_hooks=[("blocks.1.hook_attn_out", lambda t, hook: t + corr_result - clean_result)]
            )
            b = model.bridge.run_with_hooks(
                corrupted, fwd_hooks=[("ln_final.hook_in", lambda t, hook: t + emb_diff)]
            )
    assert abs(float(got[0]) - float(last_pos_metric(a, idx).mean())) < 1e-9
    assert abs(float(got[1]) - float(last_pos_metric(b, idx).mean())) < 1e-9


@pytest.mark.parametrize("ablation_kind", ["patching", "mean"])
def test_answer_positions_only_same_values(ablation_kind: str) -> None:
    """Evaluating with ``positions`` (the unembedding at the answer position only, prompts sorted by it and
    later positions not run) gives the values of the full run, for circuits and for exact scores."""
    model = load_toy_ioi()
    prompts = ioi_prompts(model, 7)
    assert len(set(prompts.end.tolist())) > 1  # prompts of different lengths: batches are trimmed
    corrupted = hand_corrupted(prompts)
    metric = task_metric(prompts)
    graph = EdgeGraph(graph_shape(model))
    ablation = make_ablation(
        ablation_kind, model, graph, prompts.tokens, prompts.lengths, corrupted=corrupted, batch_size=3
    )
    g = torch.Generator().manual_seed(0)
    circuits = [graph.full(), graph.empty()] + [
        graph.real & (torch.rand(graph.real.shape, generator=g) < f) for f in (0.3, 0.6, 0.9)
    ]
    args = (model, graph, prompts.tokens, ablation, circuits, metric, 3)
    full = evaluate_circuits(*args, copies=2)
    only_end = evaluate_circuits(*args, copies=2, positions=prompts.end)
    torch.testing.assert_close(only_end, full, rtol=0, atol=1e-12)
    assert len(set(full.tolist())) == len(circuits)  # the circuits differ
    pairs = [graph.edge_index(e) for e in ["input->a0.h1<k>", "a1.h2->a2.h0<q>", "a2.h3->logits"]]
    exact = exact_scores(model, graph, prompts.tokens, ablation, metric, 3, edges=pairs)
    exact_end = exact_scores(
        model, graph, prompts.tokens, ablation, metric, 3, edges=pairs, positions=prompts.end
    )
    for i, j in pairs:
        assert abs(float(exact[i, j]) - float(exact_end[i, j])) < 1e-12


def hand_ig_activations(model, clean, corrupted, metric, edges: list[str], steps: int) -> dict[str, float]:
    """By edge, EAP-IG-activations by hand: for every group (embeddings, each layer's attention output,
    each MLP output) and ``alpha = k / steps``, the group's output set to ``corrupted + alpha (clean -
    corrupted)`` in a clean run, the directional derivative of the metric along (out_u(clean) -
    out_u(corrupted)) at slot v; the mean over all those runs."""
    groups = ["blocks.0.hook_resid_pre"]
    for layer in range(model.arch.n_layers):
        groups += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    idx = torch.arange(len(clean))
    total = dict.fromkeys(edges, 0.0)
    with edge_hooks_enabled(model):
        diffs = _diffs(model, clean, corrupted, edges)
        _, acts_clean = model.run_with_cache(clean, groups)
        _, acts_corr = model.run_with_cache(corrupted, groups)
        for group in groups:
            for k in range(1, steps + 1):
                value = acts_corr[group] + (k / steps) * (acts_clean[group] - acts_corr[group])
                eps, slot_hooks = _eps_hooks(edges, diffs)
                if any(name == group for name, _ in slot_hooks):  # the logits slot is not a group's output
                    raise AssertionError(group)
                hooks = [(group, lambda t, hook, v=value: v), *slot_hooks]
                with torch.enable_grad():
                    # 0 for an edge whose slot's node feeds only the group held fixed
                    grads = _grads(
                        metric(model.bridge.run_with_hooks(clean, fwd_hooks=hooks), idx).sum(), eps
                    )
                for edge, g in zip(edges, grads, strict=True):
                    total[edge] += g / len(clean)
    return {edge: t / (len(groups) * steps) for edge, t in total.items()}


@pytest.mark.parametrize(
    "builder",
    # the other families' runs are in the full suite only (make test-fast keeps one)
    [
        "tiny-gpt2",
        pytest.param("tiny-pythia", marks=pytest.mark.slow),
        pytest.param("tiny-llama", marks=pytest.mark.slow),
    ],
)
def test_eap_ig_activations_variant(builder: str) -> None:
    model = tiny64(builder)
    graph = EdgeGraph(graph_shape(model))
    clean, corrupted = random_pair(6)
    eap = eap_scores(model, graph, clean, corrupted, last_pos_metric, batch_size=3)
    act1 = eap_scores(
        model, graph, clean, corrupted, last_pos_metric, 3, ig_steps=1, ig_variant="activations"
    )
    into_logits = graph.real.clone()
    into_logits[:, :-1] = False
    # one step: the edges into the logits get EAP's scores exactly; other edges see the gradient with one
    # group of outputs held fixed in each run, so they differ
    torch.testing.assert_close(act1[into_logits], eap[into_logits], rtol=0, atol=1e-9)
    others = graph.real & ~into_logits
    assert not torch.allclose(act1[others], eap[others])
    act2 = eap_scores(
        model, graph, clean, corrupted, last_pos_metric, 2, ig_steps=2, ig_variant="activations"
    )
    edges = ["input->a1.h0<k>", "a0.h1->m1", "m0->a1.h2<q>"]
    hand = hand_ig_activations(model, clean, corrupted, last_pos_metric, edges, 2)
    for edge in edges:
        i, j = graph.edge_index(edge)
        assert abs(float(act2[i, j]) - hand[edge]) < 1e-9, edge


def test_ig_variant_checked() -> None:
    model = tiny64("tiny-gpt2")
    graph = EdgeGraph(graph_shape(model))
    clean, corrupted = random_pair(0)
    with pytest.raises(Exception, match="method.ig_variant"):
        eap_scores(model, graph, clean, corrupted, last_pos_metric, ig_steps=2, ig_variant="layers")


@pytest.mark.parametrize("builder", FAMILIES)
def test_graph_dims_from_config_equal_loaded_model(builder: str) -> None:
    """``stage=discover method=acc`` takes the graph's shape from config.json without loading weights."""
    from attncomm.models.dimensions import graph_dims

    dims = graph_dims(tiny_model_config(builder), test_cache_dir())
    assert dims is not None
    shape = graph_shape(tiny64(builder))
    assert (dims.n_layers, dims.n_heads, dims.parallel_attn, dims.d_model) == (
        shape.n_layers,
        shape.n_heads,
        shape.parallel_attn,
        shape.d_model,
    )
