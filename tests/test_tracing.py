"""End-to-end tracing on tiny models: graph invariants, skip reasons, per-firing results (sections 4-5)."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch

from attncomm.core.prompt_graph import trace_prompt
from attncomm.methods.acc_tracing import _prompt_tensors, build_omega_cache, needed_hooks, trace_prompts
from attncomm.tasks import get_task
from tests.models_fixtures import LLAMA_LIKE, load_tiny

SKIPS = {None, "incorrect", "nonpositive_total", "no_head_seed"}


def _check_graph(graph: nx.MultiDiGraph, root_name: str, labels: set[str], n_heads: int) -> None:
    roots = [n for n in graph.nodes if len(n) == 2]
    assert len(roots) == 1 and roots[0][0] == root_name and roots[0][1] in labels
    root = roots[0]
    for u, v, data in graph.edges(data=True):
        assert data["type"] in ("d", "s")
        assert isinstance(data["weight"], float) and math.isfinite(data["weight"])
        assert len(u) == 4 and isinstance(u[0], int)
        if v == root:
            assert data["type"] == "d"
        else:
            assert len(v) == 4 and isinstance(v[1], int) and u[0] < v[0], (u, v)
    for node in graph.nodes:
        if node == root:
            continue
        layer, comp, lab_d, lab_s = node
        assert type(layer) is int and lab_d in labels and lab_s in labels
        if isinstance(comp, str):
            assert comp in ("MLP", "AH bias", "Embedding") and lab_d == lab_s
            if comp == "Embedding":
                assert layer == 0
        else:
            assert type(comp) is int and 0 <= comp < n_heads
    assert nx.is_directed_acyclic_graph(graph)
    # every node reaches the root
    assert all(nx.has_path(graph, n, root) for n in graph.nodes)


@pytest.mark.parametrize("builder", ["tiny-gpt2", "tiny-pythia", "tiny-gemma2", *LLAMA_LIKE])
def test_trace_end_to_end(builder: str) -> None:
    model = load_tiny(builder)
    a = model.arch
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 12, seed=0, prepend_bos=builder == "tiny-gemma2")
    out = list(
        trace_prompts(model, task, prompts, skip_incorrect=False, progress=False, prompt_ids=range(100, 112))
    )
    assert [o.prompt_id for o in out] == list(range(100, 112))
    assert {o.skip_reason for o in out} <= SKIPS and "incorrect" not in {o.skip_reason for o in out}
    traced = [o for o in out if o.graph is not None]
    assert traced, f"no prompt of {builder} was traced"
    assert any(o.n_firings > 0 for o in traced)
    for o in out:
        if o.skip_reason is not None:
            assert o.graph is None and o.n_firings == 0
            continue
        labels = prompts.labels[o.prompt_id - 100]
        _check_graph(o.graph, task.direction_name, set(labels.values()), a.n_heads)
        pos_of = {lab: pos for pos, lab in labels.items()}
        for (p, layer, _h, d, s), res in o.results.items():
            assert p == o.prompt_id and 0 < layer < a.n_layers and 0 <= s <= d
            assert res.contrib_dest.shape == (layer, a.n_heads + 2, d + 1)
            assert res.contrib_src.shape == (layer, a.n_heads + 2, d + 1)
            assert torch.isfinite(res.contrib_dest).all() and torch.isfinite(res.contrib_src).all()
            for terms in (res.dest_terms, res.src_terms):
                assert terms.dtype == torch.long and len(set(terms.tolist())) == terms.numel()
                assert terms.numel() == 0 or int(terms.max()) < a.d_head
            if res.dest_terms.numel() == 0:
                assert float(res.contrib_dest.abs().max()) == 0.0
        # every head node with upstream edges is a decomposed firing of this prompt
        for node in o.graph.nodes:
            if len(node) == 4 and isinstance(node[1], int) and o.graph.in_degree(node) > 0:
                key = (o.prompt_id, node[0], node[1], pos_of[node[2]], pos_of[node[3]])
                assert key in o.results, key


def test_skip_incorrect_and_tokens_mode() -> None:
    model = load_tiny("tiny-gpt2")
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 6, seed=1)
    out = list(trace_prompts(model, task, prompts, skip_incorrect=True, progress=False))
    logits, _ = model.run_with_cache(prompts.tokens, [model.resid_pre(0)])
    correct = task.is_correct(logits, prompts)
    for o, ok in zip(out, correct.tolist(), strict=True):
        assert (o.skip_reason == "incorrect") == (not ok)
    tok = list(trace_prompts(model, task, prompts, with_tokens=True, skip_incorrect=False, progress=False))
    token_labels = prompts.token_labels(model.tokenizer)
    for o in tok:
        if o.graph is not None:
            _check_graph(
                o.graph, task.direction_name, set(token_labels[o.prompt_id].values()), model.arch.n_heads
            )


def test_skip_reasons_from_seeds() -> None:
    """Flipping the task direction flips the seed total: one of the two is skipped as nonpositive."""
    model = load_tiny("tiny-gpt2")
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 1, seed=3)
    _, hooks = model.run_with_cache(prompts.tokens, needed_hooks(model))
    omega = build_omega_cache(model)
    w = task.direction(model.weights.W_U, prompts)[0]
    end = int(prompts.end[0])
    results = {}
    for sign in (1.0, -1.0):
        pt = _prompt_tensors(model, hooks, 0, end, sign * w, prompts.labels[0], omega, torch.float32)
        results[sign] = trace_prompt(pt, omega, direction_name=task.direction_name)
    reasons = {results[1.0].skip_reason, results[-1.0].skip_reason}
    assert "nonpositive_total" in reasons
    assert reasons <= SKIPS
    # the seed total is the direction's logit difference carried by the residual at end (sign flips)
    assert results[1.0].seed_total == pytest.approx(-results[-1.0].seed_total, rel=1e-4)
    zero = _prompt_tensors(model, hooks, 0, end, 0 * w, prompts.labels[0], omega, torch.float32)
    assert trace_prompt(zero, omega, direction_name="x").skip_reason == "nonpositive_total"
