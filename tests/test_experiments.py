"""Intervention experiments (ACC-METHOD.md section 9): operations, random draws, table, stage end to end.

Expectations are independent of :mod:`attncomm.core.edge_experiments` where possible: contributions
``c[k]`` from dense Omegas and the model's own normalized inputs, relative logits from
``hook_attn_scores``, random sets from a fresh ``numpy.random.RandomState`` driven by hand, and the
section-7 removal effect from :func:`attncomm.core.edge_interventions.intervention_graph`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor

from attncomm.core.edge_experiments import (
    COLUMNS,
    OPERATIONS,
    PUBLISHED_COLUMNS,
    ExperimentEdge,
    ExperimentEdgeError,
    draw_random_terms,
    edge_string,
    group_labels,
    parse_experiment_edges,
    random_complement_terms,
    run_experiments,
    signed_removal,
    summarize,
)
from attncomm.core.edge_interventions import intervention_graph, removal_hooks
from attncomm.core.node_ids import format_node_id, is_root
from attncomm.errors import AttncommError
from attncomm.io.circuits_data import intervention_experiment_edges, load_circuits_data
from attncomm.io.graphml import read_graph
from attncomm.methods.acc_tracing import build_omega_cache
from attncomm.runtime.config import AppConfig, TaskConfig
from attncomm.runtime.registry import RunContext, get_stage
from tests import models_fixtures as fixtures
from tests.acc_reference import dest_firing, random_tokens, relative_logit
from tests.conftest import shared_path
from tests.models_fixtures import load_tiny

N_POS = 8
N_PROMPTS = 4
TERMS = {"d": [0, 1, 4], "s": [2, 3]}


def _tokens(batch: int, seed: int = 0) -> Tensor:
    return random_tokens(batch, N_POS, seed)


def _metric(logits: Tensor, ids) -> Tensor:
    return logits[:, -1, 11] - logits[:, -1, 22]


def _lookup(key, side: str) -> list[int]:
    assert len(key) == 5
    return TERMS[side]


def _toy_graph() -> nx.MultiDiGraph:
    """A combined graph over N_PROMPTS prompts with position labels t0..t7 (prompt 3 has no edge)."""
    G = nx.MultiDiGraph()
    root = ("IO-S direction", "t7")
    top, mid = (2, 1, "t7", "t3"), (1, 0, "t3", "t2")
    G.add_edge(top, root, weight=1.0, type="d", prompts_appeared=[0, 1, 2])
    G.add_edge((1, "MLP", "t7", "t7"), top, weight=0.5, type="d", prompts_appeared=[0, 2])
    G.add_edge(mid, top, weight=0.3, type="s", prompts_appeared=[0, 1, 2])
    G.add_edge((0, 2, "t2", "t1"), mid, weight=0.2, type="s", prompts_appeared=[1])
    return G


TOY_EDGES = [
    ExperimentEdge((1, "MLP", "t7", "t7"), (2, 1, "t7", "t3")),
    ExperimentEdge((1, 0, "t3", "t2"), (2, 1, "t7", "t3"), "mid -> top"),
    ExperimentEdge((0, 2, "t2", "t1"), (1, 0, "t3", "t2")),
]
POSITIONS = [{f"t{i}": i for i in range(N_POS)} for _ in range(N_PROMPTS)]


def _run(seed: int = 0, edges=TOY_EDGES, batch_size: int = 5):
    model = load_tiny("tiny-gpt2")
    omega = build_omega_cache(model, model.dtype)
    return run_experiments(
        _toy_graph(),
        edges,
        model,
        _tokens(N_PROMPTS, seed=5),
        _metric,
        POSITIONS,
        _lookup,
        omega,
        seed=seed,
        model_name="tiny-gpt2",
        batch_size=batch_size,
        progress=False,
    )


# ----------------------------------------------------------------------------- random terms


@pytest.mark.parametrize(
    ("selected", "rank", "size"),
    [([0, 3, 5], 16, 3), ([1], 4, 1), (list(range(10)), 16, 6), (list(range(8)), 8, 0), ([], 8, 0)],
)
def test_random_complement_terms(selected: list[int], rank: int, size: int) -> None:
    rng = np.random.RandomState(0)
    for _ in range(20):
        got = random_complement_terms(selected, rank, rng)
        assert len(got) == size == min(len(selected), rank - len(selected))
        assert len(set(got)) == len(got)
        assert not set(got) & set(selected)
        assert all(0 <= k < rank for k in got)
    # the reference's draw: choice over the ascending complement, without replacement
    a, b = np.random.RandomState(7), np.random.RandomState(7)
    complement = [i for i in range(rank) if i not in selected]
    want = list(b.choice(complement, size, replace=False)) if size else []
    assert random_complement_terms(selected, rank, a) == want
    assert a.randint(1 << 30) == b.randint(1 << 30)  # same generator state afterwards
    with pytest.raises(ValueError, match="out of range"):
        random_complement_terms([rank], rank, rng)


def test_draw_order_is_edge_operation_prompt_and_every_operation_draws() -> None:
    selected = [{2: [0, 1], 0: [3]}, {1: [5, 6, 7], 4: []}]
    ranks = [{2: 8, 0: 8}, {1: 12, 4: 12}]
    got = draw_random_terms(selected, ranks, np.random.RandomState(3))
    rng = np.random.RandomState(3)
    want: list[dict] = [{}, {}]
    for e in range(2):
        for i, op in enumerate(OPERATIONS):
            for p in sorted(selected[e]):
                if not selected[e][p]:
                    continue  # no selected terms: no draw
                complement = [k for k in range(ranks[e][p]) if k not in selected[e][p]]
                size = min(len(selected[e][p]), len(complement))
                terms = [int(k) for k in rng.choice(complement, size, replace=False)]
                if op.random:
                    want[e][(i, p)] = terms
    assert got == want
    assert [op.name for op in OPERATIONS] == [
        "Removing (SVs)",
        "Removing (Random)",
        "Boosting (SVs)",
        "Boosting (Random)",
    ]


# ----------------------------------------------------------------------------- edges


def test_parse_experiment_edges_and_errors() -> None:
    edges = parse_experiment_edges(
        [["(7, 9, 'end', 'S2')", "(9, 9, 'end', 'IO')", "S-Inhibition Head -> Name Mover Head"]]
        + [["(9, 'MLP', 'end', 'end')", "(10, 9, 'end', 'is')"]]
    )
    assert edges[0] == ExperimentEdge(
        (7, 9, "end", "S2"), (9, 9, "end", "IO"), "S-Inhibition Head -> Name Mover Head"
    )
    assert edges[1].description == ""
    with pytest.raises(ExperimentEdgeError, match=r"experiments\.edges\[1\].*\(9, 'MLP', 'end'"):
        parse_experiment_edges(
            [["(1, 2, 'a', 'b')", "(3, 4, 'c', 'd')"], ["(9, 'MLP', 'end'", "(10, 9, 'e', 'is')"]]
        )
    with pytest.raises(ExperimentEdgeError, match=r"edges\[0\].*__import__"):
        parse_experiment_edges([["__import__('os')", "(10, 9, 'end', 'is')"]])
    with pytest.raises(ExperimentEdgeError, match="must be an attention head"):
        parse_experiment_edges([["(1, 2, 'a', 'b')", "(3, 'MLP', 'c', 'c')"]])
    with pytest.raises(ExperimentEdgeError, match="is the root"):
        parse_experiment_edges([["(1, 2, 'a', 'b')", "('IO-S direction', 'end')"]])
    with pytest.raises(
        ExperimentEdgeError, match=r"edges\[0\] = \"\(1, 2, 'a', 'b'\)\": expected \[upstream_id"
    ):
        parse_experiment_edges(["(1, 2, 'a', 'b')"])
    assert issubclass(ExperimentEdgeError, AttncommError)


def test_edge_names_match_the_published_table() -> None:
    published = pd.read_parquet(
        shared_path("reference", "published", "gpt2-small", "gp", "gpt2-small_gp.parquet")
    )
    edges = parse_experiment_edges(intervention_experiment_edges(load_circuits_data(), "gpt2-small", "gp"))
    assert [edge_string(e.upstream, e.downstream, 0) for e in edges] == list(dict.fromkeys(published["edge"]))
    assert [e.label for e in edges] == list(dict.fromkeys(published["edge_labeled"]))
    assert group_labels(edges) == list(dict.fromkeys(published["edge_labeled_group"]))
    ioi = parse_experiment_edges(intervention_experiment_edges(load_circuits_data(), "gpt2-small", "ioi"))
    assert group_labels(ioi)[0] == "S-Inhibition Head -> Name Mover Head"


# ----------------------------------------------------------------------------- exact identity


def _relative(model, scores: Tensor, d: int, s: int) -> Tensor:
    return relative_logit(scores * model.arch.attn_scale, d, s)


def _scores_after(model, tokens: Tensor, layer: int, removals: list) -> Tensor:
    """``hook_attn_scores`` of ``layer`` with the removals applied (signs already in their deltas)."""
    store: dict[str, Tensor] = {}

    def keep(t: Tensor, hook: object) -> None:
        store["a"] = t.detach()

    model.run_with_hooks(
        tokens, removal_hooks(model, removals, sign=1.0) + [(model.attn_scores(layer), keep)]
    )
    return store["a"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-pythia"])
def test_boosting_adds_what_removing_takes_away(name: str) -> None:
    """Dest side, float64: with r = P_U x_d, removing moves the relative logit by -sum_{k in T} c[k],
    boosting by +sum_{k in T} c[k]; a random complement set of the same size moves it by its own terms."""
    model = load_tiny(name, torch.float64)
    arch = model.arch
    f = dest_firing(model, N_POS)
    tokens, layer, head, d, s, x, U, c = f.tokens, f.layer, f.head, f.d, f.s, f.x, f.U, f.c
    selected = c.argsort(descending=True)[:3].tolist()
    random_set = random_complement_terms(selected, U.shape[1], np.random.RandomState(0))
    r0 = _relative(model, f.scores[head], d, s)
    tol = 1e-9 if not arch.rotary else 1e-5
    for terms in (selected, random_set):
        for sign in (-1.0, 1.0):
            vec, removal = signed_removal(
                x[d],
                U[:, terms],
                1.0,
                center=True,
                model=model,
                layer=layer,
                head=head,
                side="d",
                position=d,
                sign=sign,
            )
            store = _scores_after(model, tokens, layer, [removal])
            r1 = _relative(model, store[0, head], d, s)
            want = sign * c[terms].sum()
            assert abs(float(r1 - r0 - want)) <= tol * max(1.0, float(c.abs().sum())), (
                float(r1 - r0),
                float(want),
            )
            torch.testing.assert_close(
                vec,
                sign * (U[:, terms] @ (U[:, terms].T @ x[d]) - (U[:, terms] @ (U[:, terms].T @ x[d])).mean()),
            )
    assert abs(float(c[selected].sum())) > 1e-3


# ----------------------------------------------------------------------------- the table


def test_table_rows_columns_and_values() -> None:
    result = _run()
    df = result.table
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == len(TOY_EDGES) * len(OPERATIONS) * N_PROMPTS
    G = _toy_graph()
    # nesting order: edge, operation (published loop order), prompt 0..N-1
    order = [(e.label, op.name, p) for e in TOY_EDGES for op in OPERATIONS for p in range(N_PROMPTS)]
    assert list(zip(df["edge_labeled"], df["operation_performed"], df["prompt_id"], strict=True)) == order
    rank = build_omega_cache(load_tiny("tiny-gpt2")).get(2, 1, 4, "d")[0].shape[1]
    for e in TOY_EDGES:
        data = G.edges[e.upstream, e.downstream, 0]
        rows = df[df["edge_labeled"] == e.label]
        assert set(rows["edge"]) == {edge_string(e.upstream, e.downstream, 0)}
        assert set(rows["edge_weight"]) == {data["weight"]}
        assert set(rows["edge_type"]) == {data["type"]}
        ablated = sorted(set(rows.loc[rows["is_ablated"], "prompt_id"]))
        assert ablated == data["prompts_appeared"]
        sel = TERMS[data["type"]]
        for r in rows.itertuples(index=False):
            assert r.is_boosting == (r.operation_performed.startswith("Boosting"))
            assert r.intervention_type == "local"
            assert r.intervention_type_name == ("Local (Random)" if r.is_random else "Local (SVs)")
            assert math.isclose(
                r.scores_dest_src_diff_metric,
                r.scores_dest_src_downstream_ah_interv - r.scores_dest_src_downstream_ah,
                abs_tol=1e-6,
            )
            assert math.isclose(
                r.logit_diff_metric,
                (r.logit_diff_interv - r.logit_diff) / r.logit_diff,
                rel_tol=1e-4,
                abs_tol=1e-6,
            )
            assert (
                0 <= r.scores_dest_src_downstream_ah <= 1 and 0 <= r.scores_dest_src_downstream_ah_interv <= 1
            )
            if not r.is_ablated:  # clean rows, as published
                assert r.logit_diff_interv == r.logit_diff and r.norm_ratio == 1.0
                assert r.scores_dest_src_downstream_ah_interv == r.scores_dest_src_downstream_ah
                assert r.n_terms == 0 and list(r.terms) == []
                continue
            if r.is_random:
                assert len(r.terms) == min(len(sel), rank - len(sel)) and not set(r.terms) & set(sel)
            else:
                assert list(r.terms) == sel
            assert -1.0 <= r.cosine_similarity <= 1.0 + 1e-6 and r.norm_ratio > 0
    ablated = df[df["is_ablated"]]
    assert (ablated["cosine_similarity"] < 1.0 - 1e-6).any() and (ablated["norm_ratio"] != 1.0).any()
    # Removing (SVs) is the section-7 intervention: same numbers as the intervention graph
    model = load_tiny("tiny-gpt2")
    iv = intervention_graph(
        G,
        model,
        _tokens(N_PROMPTS, seed=5),
        _metric,
        POSITIONS,
        _lookup,
        build_omega_cache(model),
        progress=False,
    )
    for e in TOY_EDGES:
        data = iv.edges[e.upstream, e.downstream, 0]
        rows = df[
            (df["edge_labeled"] == e.label)
            & (df["operation_performed"] == "Removing (SVs)")
            & df["is_ablated"]
        ]
        got = (rows["logit_diff_interv"].astype(float) - rows["logit_diff"].astype(float)).tolist()
        assert got == pytest.approx(data["logit_diff"], rel=1e-3, abs=1e-4)
    # boosting the selected terms moves the logit diff the other way from removing them (first order)
    rem = df[(df["operation_performed"] == "Removing (SVs)") & df["is_ablated"]]
    boo = df[(df["operation_performed"] == "Boosting (SVs)") & df["is_ablated"]]
    d_rem = (rem["logit_diff_interv"] - rem["logit_diff"]).to_numpy()
    d_boo = (boo["logit_diff_interv"] - boo["logit_diff"]).to_numpy()
    big = np.abs(d_rem) > 1e-4
    assert big.any() and (np.sign(d_rem[big]) == -np.sign(d_boo[big])).mean() >= 0.8
    summary = summarize(result)
    assert len(summary) == len(TOY_EDGES) * len(OPERATIONS)
    assert summary["rows"].tolist() == [N_PROMPTS] * len(summary)


def test_batching_does_not_change_the_numbers() -> None:
    a, b = _run(batch_size=1).table, _run(batch_size=64).table
    pd.testing.assert_frame_equal(a.drop(columns="terms"), b.drop(columns="terms"), rtol=1e-4, atol=1e-5)


def test_seed_makes_runs_identical_and_changes_only_random_rows() -> None:
    a, b, c = _run(0).table, _run(0).table, _run(1).table
    pd.testing.assert_frame_equal(a, b)
    fixed = ~a["is_random"]
    pd.testing.assert_frame_equal(a[fixed], c[fixed])
    rand = a["is_random"] & a["is_ablated"]
    assert (a.loc[rand, "terms"].map(tuple) != c.loc[rand, "terms"].map(tuple)).any()
    assert (a.loc[rand, "logit_diff_interv"] != c.loc[rand, "logit_diff_interv"]).any()
    clean = a["is_random"] & ~a["is_ablated"]
    pd.testing.assert_frame_equal(a[clean], c[clean])


def test_edge_not_in_graph_is_a_warning_and_zero_rows(caplog) -> None:
    missing = ExperimentEdge((0, 3, "t2", "t1"), (1, 0, "t3", "t2"))
    with caplog.at_level(logging.WARNING, logger="attncomm.core.edge_experiments"):
        result = _run(edges=[missing, TOY_EDGES[0]])
    assert "(0, 3, 't2', 't1') -> (1, 0, 't3', 't2') is not in" in caplog.text
    assert result.missing == [missing]
    assert set(result.table["edge_labeled"]) == {TOY_EDGES[0].label}
    summary = summarize(result)
    assert summary.loc[summary["edge_index"] == 0, "rows"].tolist() == [0] * 4
    assert not summary.loc[summary["edge_index"] == 0, "in_graph"].any()
    empty = _run(edges=[missing]).table
    assert len(empty) == 0 and list(empty.columns) == list(COLUMNS)


def test_columns_and_dtypes_match_the_published_table() -> None:
    published = pd.read_parquet(
        shared_path("reference", "published", "gpt2-small", "gp", "gpt2-small_gp.parquet")
    )
    assert tuple(published.columns) == PUBLISHED_COLUMNS
    ours = _run().table
    assert list(ours.columns[: len(PUBLISHED_COLUMNS)]) == list(published.columns)
    for col in PUBLISHED_COLUMNS:
        want, got = published[col].dtype, ours[col].dtype
        if pd.api.types.is_string_dtype(want):
            assert pd.api.types.is_string_dtype(got), col
        else:
            assert got == want, (col, got, want)
    # the published table: every prompt for every edge and operation, in the same nesting order
    n = published["prompt_id"].nunique()
    assert len(published) == 3 * 4 * n
    assert published["operation_performed"].iloc[::n].tolist() == [op.name for op in OPERATIONS] * 3
    clean = published[~published["is_ablated"]]
    assert (clean["logit_diff_interv"] == clean["logit_diff"]).all() and (clean["norm_ratio"] == 1).all()


# ----------------------------------------------------------------------------- the stage

#: tiny-gpt2 traces 3 of the first 6 greater-than prompts (no positive total or no head seed in the others)
STAGE_PROMPTS = 6


def _cfg() -> AppConfig:
    cfg = AppConfig(
        model=fixtures.tiny_model_config("tiny-gpt2"),
        task=TaskConfig(name="gt", n_prompts=STAGE_PROMPTS, seed=0, batch_size=8),
    )
    cfg.paths.cache_dir = str(fixtures.test_cache_dir())
    cfg.trace.skip_incorrect = False  # a random model gets the task wrong
    return cfg


def test_registered() -> None:
    spec = get_stage("experiments")
    assert spec.needs_model
    assert spec.consumes == ("combined_graphs", "tracing_results")
    assert spec.produces == ("intervention_data",)


def test_stage_config_errors(tmp_path: Path) -> None:
    from attncomm.stages.experiments import run_experiments_stage

    cfg = _cfg()
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    with pytest.raises(AttncommError, match="experiments.edges"):  # no published edges for tiny-gpt2
        run_experiments_stage(cfg, ctx)
    cfg.experiments.edges = [["(1, 2, 'a', 'b')", "(3, 'bad', 'c', 'd')", ""]]
    with pytest.raises(ExperimentEdgeError, match=r"experiments\.edges\[0\].*\(3, 'bad', 'c', 'd'\)"):
        run_experiments_stage(cfg, ctx)
    cfg.experiments.edges = [["(1, 2, 'a', 'b')", "(3, 1, 'c', 'd')", ""]]
    with pytest.raises(AttncommError, match="'unify' stage"):
        run_experiments_stage(cfg, ctx)


@pytest.mark.slow
def test_trace_unify_experiments(tmp_path: Path) -> None:
    from attncomm.stages.experiments import run_experiments_stage
    from attncomm.stages.trace import run_trace
    from attncomm.stages.unify import run_unify

    cfg = _cfg()
    run_dir = tmp_path / "run"
    run_trace(cfg, RunContext.for_tests(cfg, run_dir))
    run_unify(cfg, RunContext.for_tests(cfg, run_dir))
    ctx = RunContext.for_tests(cfg, run_dir)
    G = read_graph(ctx.artifacts.combined_graph(cfg.experiments.threshold))
    chosen = [(u, v) for u, v in G.edges() if not is_root(v)]
    assert chosen, "the threshold-0.7 combined graph of the tiny run has no non-root edge"
    u, v = chosen[0]
    n_keys = G.number_of_edges(u, v)
    missing = ("(0, 'MLP', 'nowhere', 'nowhere')", format_node_id(v), "absent")
    cfg.experiments.edges = [[format_node_id(u), format_node_id(v), ""], list(missing)]
    metrics = run_experiments_stage(cfg, ctx)

    df = pd.read_parquet(ctx.artifacts.intervention_data)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == n_keys * len(OPERATIONS) * STAGE_PROMPTS
    for _, rows in df.groupby(["edge", "operation_performed"]):
        assert sorted(rows["prompt_id"]) == list(range(STAGE_PROMPTS))
    appeared = sorted({p for k in G[u][v] for p in G.edges[u, v, k]["prompts_appeared"]})
    assert sorted(set(df.loc[df["is_ablated"], "prompt_id"])) == appeared
    assert set(df["model_name"]) == {"tiny-gpt2"}
    assert np.isfinite(df["logit_diff_interv"].to_numpy()).all()
    assert (df.loc[df["is_ablated"], "logit_diff_interv"] != df.loc[df["is_ablated"], "logit_diff"]).any()
    assert metrics["experiments/rows"] == len(df) and metrics["experiments/edges_missing"] == 1
    assert metrics["experiments/edge1/remove_svs/rows"] == 0
    summary = pd.read_csv(ctx.artifacts.intervention_data.with_name("tiny-gpt2_gt_summary.csv"))
    assert summary.loc[summary["edge_index"] == 1, "rows"].tolist() == [0] * 4
    for name in ("logit_diff", "attention", "norm_ratio"):
        assert (ctx.artifacts.figures_dir / f"experiments_tiny-gpt2_gt_{name}.png").is_file()
    manifest = ctx.artifacts.manifest.read_text()
    assert "experiments" in manifest and ctx.artifacts.intervention_data.name in manifest
