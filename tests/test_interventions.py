"""Edge interventions (ACC-METHOD.md section 7) on tiny random models.

Expectations are computed independently of :mod:`attncomm.core.edge_interventions`: upstream writes from
:func:`attncomm.core.residual.component_writes`, projectors as dense ``B B^T`` from ``OmegaCache.get``,
singular-term contributions ``c[k]`` from dense Omegas and the model's own normalized inputs, and
attention logits from the model's ``hook_attn_scores``.
"""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch
from torch import Tensor

from attncomm.core.edge_interventions import (
    Removal,
    edge_sites,
    head_space_delta,
    intervention_graph,
    needed_hooks,
    removal_hooks,
    removal_vector,
    selected_basis,
    site_removal,
    upstream_write,
)
from attncomm.core.node_ids import read_graph, write_graph
from attncomm.core.residual import component_writes
from attncomm.methods.acc_tracing import build_omega_cache
from attncomm.models.adapter import ModelAdapter
from tests.acc_reference import augment, dest_firing, random_tokens, relative_logit
from tests.models_fixtures import LLAMA_LIKE, load_tiny

TINY = ["tiny-gpt2", "tiny-pythia", "tiny-gemma2", *LLAMA_LIKE]
N_POS = 8


def _tokens(batch: int = 2, seed: int = 0) -> Tensor:
    return random_tokens(batch, N_POS, seed)


def _raw_scores(model: ModelAdapter, scores: Tensor) -> Tensor:
    """Unscaled attention logits before any softcap, from ``hook_attn_scores``."""
    cap = model.arch.attn_softcap
    if cap is not None:
        scores = cap * torch.atanh(scores / cap)
    return scores * model.arch.attn_scale


# ----------------------------------------------------------------------------- removed vector


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("side", ["d", "s"])
def test_removal_vector_is_centred_scaled_projection(name: str, side: str) -> None:
    model = load_tiny(name)
    arch = model.arch
    omega = build_omega_cache(model, model.dtype)
    tokens = _tokens()
    _, cache = model.run_with_cache(tokens, needed_hooks(model))
    layer, head, d, s, row = arch.n_layers - 1, 1, 6, 3, 1
    where = d if side == "d" else s
    cw = component_writes(cache, model.weights, arch, model, layer, prompt=row)
    terms = [0, 2, 5]
    U, _, V = omega.get(layer, head, d - s, side)
    basis = (U if side == "d" else V)[:, terms]
    P = basis @ basis.T
    scale = cache[model.ln1_scale(layer)][row, where, 0]
    cases = [
        (0, 1, where, 2, cw.heads[0, 1, where, 2]),
        (0, 3, where, where, cw.heads[0, 3, where, where]),
        (layer - 1, "MLP", where, where, cw.mlp[layer - 1, where]),
        (0, "AH bias", where, where, cw.bias[0]),
        (0, "Embedding", where, where, cw.embed[where]),
    ]
    for up_layer, comp, t, t_src, y in cases:
        got_y = upstream_write(cache, model, up_layer, comp, t, t_src, row)
        torch.testing.assert_close(got_y, y, rtol=1e-5, atol=1e-6)
        want = P @ y
        if arch.normalization == "LN":
            want = want - want.mean()
        want = want / scale
        got = removal_vector(
            got_y,
            selected_basis(omega, layer, head, d - s, side, terms),
            scale,
            center=arch.normalization == "LN",
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        W = model.weights.W_Q if side == "d" else model.weights.W_K
        torch.testing.assert_close(head_space_delta(got, model, layer, head, side), want @ W[layer, head])
    if arch.normalization == "RMS":  # no centring for RMSNorm models: the projection keeps its mean
        assert abs(float((P @ cases[2][4]).mean())) > 1e-6
    else:  # fold_ln centres W_Q/W_K, so U and V are orthogonal to the ones vector: centring is a no-op
        assert float(basis.mean(0).abs().max()) < 1e-5


@pytest.mark.parametrize("name", TINY)
def test_queries_and_keys_are_linear_in_the_normalized_input(name: str) -> None:
    """hook_q / hook_k = x W_Q + b_Q / x W_K + b_K (pre-rotary): editing them is exact."""
    model = load_tiny(name)
    w, arch = model.weights, model.arch
    layer = 1
    _, cache = model.run_with_cache(_tokens(), [model.ln1_normalized(layer), model.q(layer), model.k(layer)])
    x = cache[model.ln1_normalized(layer)]
    q = torch.einsum("bpd,hde->bphe", x, w.W_Q[layer]) + w.b_Q[layer]
    k = torch.einsum("bpd,hde->bphe", x, w.W_K[layer]) + w.b_K[layer]
    torch.testing.assert_close(q, cache[model.q(layer)], rtol=1e-5, atol=1e-5)
    k_model = cache[model.k(layer)].repeat_interleave(arch.kv_group_size, dim=2)
    torch.testing.assert_close(k, k_model, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- locality


def _patterns(model: ModelAdapter, tokens: Tensor, hooks: list) -> tuple[Tensor, dict[str, Tensor]]:
    store: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(t: Tensor, hook: object) -> None:
            store[name] = t.detach().clone()

        return hook

    names = [model.pattern(layer) for layer in range(model.arch.n_layers)]
    logits = model.run_with_hooks(tokens, list(hooks) + [(n, keep(n)) for n in names])
    return logits, store


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("side", ["d", "s"])
def test_only_the_intervened_head_changes(name: str, side: str) -> None:
    model = load_tiny(name)
    arch = model.arch
    tokens = _tokens(3)
    layer, head, pos = arch.n_layers - 1, 2, 4
    delta = torch.randn(arch.d_head, generator=torch.Generator().manual_seed(1), dtype=model.dtype) * 3
    removals = [None, Removal(layer, head, side, pos, delta), None]
    clean_logits, clean = _patterns(model, tokens, [])
    logits, patched = _patterns(model, tokens, removal_hooks(model, removals))
    # the rows without a removal are untouched, to the bit
    assert torch.equal(logits[[0, 2]], clean_logits[[0, 2]])
    assert not torch.allclose(logits[1], clean_logits[1])
    for lay in range(layer):
        assert torch.equal(patched[model.pattern(lay)], clean[model.pattern(lay)])
    before, after = clean[model.pattern(layer)][1], patched[model.pattern(layer)][1]
    others = [h for h in range(arch.n_heads) if h != head]
    assert torch.equal(after[others], before[others])
    if side == "d":  # only the query row at pos changes
        rows = [r for r in range(N_POS) if r != pos]
        assert torch.equal(after[head, rows], before[head, rows])
        assert (after[head, pos] - before[head, pos]).abs().max() > 1e-4
    else:  # the key at pos is seen by the queries pos.. only
        assert torch.equal(after[head, :pos], before[head, :pos])
        assert (after[head, pos:, pos] - before[head, pos:, pos]).abs().min() > 1e-6


@pytest.mark.parametrize(
    ("name", "group"), [("tiny-gemma2", 2), ("tiny-llama", 2), ("tiny-qwen2", 2), ("tiny-mistral", 4)]
)
def test_gqa_changes_the_key_of_one_head_only(name: str, group: int) -> None:
    """GQA models (2 or 4 query heads per kv head): our key edit equals the group-key edit on the
    intervened head, while the group-key edit (the reference's bug) also moves the sibling."""
    model = load_tiny(name)
    arch = model.arch
    assert arch.kv_group_size == group
    tokens = _tokens(2)
    layer, head, pos = arch.n_layers - 1, 2, 3
    sibling = 3
    assert sibling // arch.kv_group_size == head // arch.kv_group_size
    delta = torch.randn(arch.d_head, generator=torch.Generator().manual_seed(2)) * 3
    _, clean = _patterns(model, tokens, [])
    _, ours = _patterns(model, tokens, removal_hooks(model, [Removal(layer, head, "s", pos, delta), None]))

    def group_edit(k: Tensor, hook: object) -> Tensor:
        k = k.clone()
        k[0, pos, head // arch.kv_group_size] -= delta
        return k

    _, buggy = _patterns(model, tokens, [(model.k(layer), group_edit)])
    name = model.pattern(layer)
    torch.testing.assert_close(ours[name][0, head], buggy[name][0, head], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[name][0, sibling], clean[name][0, sibling])
    assert (buggy[name][0, sibling] - clean[name][0, sibling]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- exact identities


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("top", [None, 3])
def test_removing_the_projected_dest_input_removes_the_selected_contributions(
    name: str, top: int | None
) -> None:
    """Section 2: relative logit change = -sum_{k in T} c_d[k] when x_d loses P_U x_d (float64)."""
    model = load_tiny(name, torch.float64)
    arch = model.arch
    f = dest_firing(model, N_POS)
    tokens, layer, head, d, s, x, U, c = f.tokens, f.layer, f.head, f.d, f.s, f.x, f.U, f.c
    terms = list(range(arch.d_head)) if top is None else c.abs().argsort(descending=True)[:top].tolist()
    basis = U[:, terms]
    vec = basis @ (basis.T @ x[d])
    removal = Removal(layer, head, "d", d, head_space_delta(vec, model, layer, head, "d"))
    store: dict[str, Tensor] = {}
    model.run_with_hooks(
        tokens,
        removal_hooks(model, [removal])
        + [(model.attn_scores(layer), lambda t, hook: store.setdefault("a", t.detach()))],
    )
    r0 = relative_logit(_raw_scores(model, f.scores[head]), d, s)
    r1 = relative_logit(_raw_scores(model, store["a"][0, head]), d, s)
    want = -c[terms].sum()
    tol = 1e-9 if not arch.rotary else 1e-5  # the model's rotary tables are computed in float32
    assert abs(float(r1 - r0 - want)) <= tol * max(1.0, float(c.abs().sum())), (float(r1 - r0), float(want))
    if top is None:  # all terms: the dest side explains the whole relative logit, minus bias-only parts
        assert abs(float(want)) > 1e-3


@pytest.mark.parametrize("name", TINY)
def test_removing_the_projected_source_input_removes_its_terms_at_s(name: str) -> None:
    """Source side: the key at s loses P_V x_s, so a(d, s) changes by -sum_{k in T} p_s[k](s)
    = -x~_d Omega_s(d-s) P_V x_s and no other a(d, j) moves (tiny-gemma2: through the GQA score path)."""
    model = load_tiny(name, torch.float64)
    arch = model.arch
    omega = build_omega_cache(model, torch.float64)
    tokens = _tokens(1, seed=4)
    layer, head, d, s = arch.n_layers - 1, 2, 7, 3
    names = [model.ln1_normalized(layer), model.attn_scores(layer)]
    _, cache = model.run_with_cache(tokens, names)
    x = cache[model.ln1_normalized(layer)][0]
    U, S, V = omega.get(layer, head, d - s, "s")
    xd = augment(x[d], U.shape[0])
    p_s = (xd @ U) * S * (V.T @ x[s])  # p_s[k](s)
    terms = p_s.abs().argsort(descending=True)[:4].tolist()
    basis = V[:, terms]
    vec = basis @ (basis.T @ x[s])
    removal = Removal(layer, head, "s", s, head_space_delta(vec, model, layer, head, "s"))
    store: dict[str, Tensor] = {}
    model.run_with_hooks(
        tokens,
        removal_hooks(model, [removal])
        + [(model.attn_scores(layer), lambda t, hook: store.setdefault("a", t.detach()))],
    )
    raw0 = _raw_scores(model, cache[model.attn_scores(layer)][0, head])
    raw1 = _raw_scores(model, store["a"][0, head])
    tol = 1e-9 if not arch.rotary else 1e-5
    change = raw1[d, : d + 1] - raw0[d, : d + 1]
    want = -p_s[terms].sum()
    assert abs(float(change[s] - want)) <= tol * max(1.0, float(p_s.abs().sum()))
    assert abs(float(want)) > 1e-3
    others = [j for j in range(d + 1) if j != s]
    assert float(change[others].abs().max()) <= tol


# ----------------------------------------------------------------------------- the graph


def _toy_graph() -> nx.MultiDiGraph:
    G = nx.MultiDiGraph()
    root = ("IO-S direction", "t7")
    G.add_node(root, n_appearences=3)
    top = (2, 1, "t7", "t3")
    mid = (1, 0, "t3", "t2")
    G.add_node(top, n_appearences=3)
    G.add_node(mid, n_appearences=2)
    for node in [
        (1, "MLP", "t7", "t7"),
        (0, "Embedding", "t3", "t3"),
        (0, "AH bias", "t7", "t7"),
        (0, 2, "t2", "t1"),
    ]:
        G.add_node(node, n_appearences=1)
    G.add_edge(top, root, weight=1.0, type="d", prompts_appeared=[0, 1, 2])
    G.add_edge((1, "MLP", "t7", "t7"), top, weight=0.5, type="d", prompts_appeared=[0, 2])
    G.add_edge((0, "AH bias", "t7", "t7"), top, weight=0.1, type="d", prompts_appeared=[1])
    G.add_edge(mid, top, weight=0.3, type="s", prompts_appeared=[0, 1, 2])
    G.add_edge((0, "Embedding", "t3", "t3"), top, weight=0.2, type="s", prompts_appeared=[2])
    G.add_edge((0, 2, "t2", "t1"), mid, weight=0.2, type="s", prompts_appeared=[0, 1])
    return G


def _metric(logits: Tensor, ids) -> Tensor:
    return logits[:, -1, 11] - logits[:, -1, 22]


def test_intervention_graph_matches_single_prompt_runs(tmp_path) -> None:
    model = load_tiny("tiny-gpt2")
    omega = build_omega_cache(model, model.dtype)
    tokens = _tokens(3, seed=5)
    positions = [{f"t{i}": i for i in range(N_POS)} for _ in range(3)]
    terms = {"d": [0, 1, 4], "s": [2, 3]}

    def lookup(key, side):
        assert len(key) == 5
        return terms[side]

    G = _toy_graph()
    out = intervention_graph(
        G, model, tokens, _metric, positions, lookup, omega, batch_size=4, progress=False
    )
    root = ("IO-S direction", "t7")
    clean = _metric(model.run_with_hooks(tokens, []), None)
    _, cache = model.run_with_cache(tokens, needed_hooks(model))
    for work in edge_sites(G, positions):
        data = out.edges[work.u, work.v, work.key]
        assert data["upstream_node"] == repr(work.u) and data["downstream_node"] == repr(work.v)
        assert len(data["logit_diff"]) == len(data["prompts_appeared"])
        assert data["weight"] == G.edges[work.u, work.v, work.key]["weight"]
        for site, got in zip(work.sites, data["logit_diff"], strict=True):
            _, removal = site_removal(site, cache, site.prompt, model, omega, terms[site.side])
            p = site.prompt
            alone = _metric(model.run_with_hooks(tokens[[p]], removal_hooks(model, [removal])), None)
            assert math.isclose(got, float(alone[0] - clean[p]), rel_tol=1e-3, abs_tol=1e-5)
    assert any(abs(v) > 1e-4 for _, _, ld in out.edges(data="logit_diff") if ld for v in ld)
    for _, _, data in out.in_edges(root, data=True):
        assert "logit_diff" not in data and "upstream_node" not in data
    # packing sites of several edges per batch gives the same numbers as one site per batch
    one = intervention_graph(
        G, model, tokens, _metric, positions, lookup, omega, batch_size=1, progress=False
    )
    for u, v, k, ld in out.edges(keys=True, data="logit_diff"):
        if ld is not None:
            assert one.edges[u, v, k]["logit_diff"] == pytest.approx(ld, rel=1e-4, abs=1e-5)
    path = write_graph(out, tmp_path / "iv.graphml")
    back = read_graph(path)
    for u, v, k, ld in out.edges(keys=True, data="logit_diff"):
        if ld is not None:
            assert back.edges[u, v, k]["logit_diff"] == pytest.approx(ld)


def test_edge_sites_errors() -> None:
    G = _toy_graph()
    with pytest.raises(ValueError, match="label 't7' is not a position"):
        edge_sites(G, [{f"t{i}": i for i in range(5)}] * 3)
    bad = nx.MultiDiGraph()
    bad.add_edge((0, "MLP", "t2", "t2"), (1, 0, "t3", "t1"), weight=1.0, type="d", prompts_appeared=[0])
    with pytest.raises(ValueError, match="upstream writes at position 2 but the intervention is at 3"):
        edge_sites(bad, [{f"t{i}": i for i in range(5)}])
