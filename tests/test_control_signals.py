"""Control signals (section 9): clustering, prototype and controlled heads on hand-made vectors with a
known answer; the per-firing decomposition against the tracer's; the stage end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import cdist, pdist

from attncomm.core.signal_clusters import (
    PUNCTUATION,
    candidate_firings,
    cluster_signals,
    default_cut,
    dominant_cluster,
    head_control,
    is_punctuation,
    layer_source_signals,
    mean_pairwise_distance,
    normalize_rows,
    prototype,
    sink_mask,
)
from attncomm.errors import ConfigError
from attncomm.methods.acc_tracing import build_omega_cache, trace_prompts
from attncomm.runtime.config import AppConfig, TaskConfig
from attncomm.runtime.registry import RunContext, get_stage
from attncomm.stages.control_signals import analyse_signals, run_control_signals
from attncomm.tasks import get_task
from attncomm.viz.plots import cluster_size_bars, control_signal_histograms
from tests import models_fixtures as fixtures
from tests.fakes import RecordingTracker
from tests.models_fixtures import load_tiny


def _unit(deg: float, norm: float = 1.0) -> np.ndarray:
    r = np.deg2rad(deg)
    return norm * np.array([np.cos(r), np.sin(r), 0.0])


def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == v).tolist()) for v in np.unique(labels)}


# ----------------------------------------------------------------------------- pure maths


def test_average_linkage_on_cosine_distance_with_cut() -> None:
    # angles 0, 40, 85 degrees (norms differ: only directions matter). Cosine distances: d(0,40) =
    # 0.234, d(40,85) = 0.293, d(0,85) = 0.913. {0,40} merge first; then average linkage joins 85 at
    # (0.913 + 0.293) / 2 = 0.603 (single linkage: 0.293, complete: 0.913).
    X = np.stack([_unit(0, 2.0), _unit(40, 0.5), _unit(85, 3.0)])
    assert _partition(cluster_signals(X, 0.5)) == {frozenset({0, 1}), frozenset({2})}
    assert _partition(cluster_signals(X, 0.7)) == {frozenset({0, 1, 2})}  # complete linkage would split
    assert _partition(cluster_signals(X, 0.2)) == {frozenset({0}), frozenset({1}), frozenset({2})}
    assert cluster_signals(X[:1], 0.5).tolist() == [1]
    assert cluster_signals(np.zeros((0, 3)), 0.5).shape == (0,)
    assert (default_cut(False), default_cut(True)) == (0.97, 0.99)


def test_dominant_cluster_and_prototype_known_answer() -> None:
    e = np.eye(5)
    group_a = [e[0], e[0] + 0.2 * e[2], e[0] - 0.2 * e[2], e[0] + 0.3 * e[3], e[0] - 0.3 * e[3]]
    group_b = [e[1], e[1] + 0.1 * e[4], e[1] - 0.1 * e[4]]
    X = np.stack(group_b + group_a + [-e[0] + e[1]])  # the last one: 45 deg from B, 135 from A
    labels = cluster_signals(X, 0.97)
    parts = _partition(labels)
    assert frozenset({3, 4, 5, 6, 7}) in parts and frozenset({0, 1, 2, 8}) in parts, parts
    dom = dominant_cluster(labels)
    members = np.flatnonzero(labels == dom)
    assert members.tolist() == [3, 4, 5, 6, 7]
    j, mean_dist = prototype(normalize_rows(X[members]))
    assert members[j] == 3  # e_0 itself: the symmetric centre of its group
    brute = cdist(X[members], X[members], "cosine").mean(axis=1)  # self-distance (0) included
    assert j == int(np.argmin(brute)) and mean_dist == pytest.approx(brute[j], abs=1e-12)
    # ties between equally large clusters: the smallest label
    assert dominant_cluster(np.array([3, 3, 1, 1, 2])) == 1
    with pytest.raises(ValueError):
        dominant_cluster(np.array([], dtype=int))
    with pytest.raises(ValueError, match="zero vector"):
        normalize_rows(np.zeros((1, 3)))


def test_mean_pairwise_distance_and_controlled_heads() -> None:
    rng = np.random.default_rng(0)
    tight = normalize_rows(np.array([[1.0, 0.05, 0, 0], [1.0, -0.05, 0, 0], [1.0, 0, 0.05, 0]]))
    assert mean_pairwise_distance(tight) == pytest.approx(pdist(tight, "cosine").mean(), abs=1e-12)
    spread = normalize_rows(rng.normal(size=(6, 4)))
    assert mean_pairwise_distance(spread) == pytest.approx(pdist(spread, "cosine").mean(), abs=1e-12)
    assert np.isnan(mean_pairwise_distance(tight[:1]))

    e = np.eye(4)
    #            head (0,0): tight sinks + an opposite non-sink | (0,1): orthogonal sinks | (1,0): one sink
    vecs = [tight[0], tight[1], tight[2], -e[0], e[0], e[1], e[2], e[3]]
    layers = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    heads = np.array([0, 0, 0, 0, 1, 1, 0, 0])
    sink = np.array([True, True, True, False, True, True, True, False])
    out = head_control(layers, heads, normalize_rows(np.stack(vecs)), sink, max_distance=0.5)
    assert set(out) == {(0, 0), (0, 1), (1, 0)}
    n, dist, ctrl = out[(0, 0)]
    assert (n, ctrl) == (3, True) and dist == pytest.approx(pdist(tight, "cosine").mean())
    n, dist, ctrl = out[(0, 1)]
    assert (n, ctrl) == (2, False) and dist == pytest.approx(1.0)
    n, dist, ctrl = out[(1, 0)]
    assert (n, ctrl) == (1, False) and np.isnan(dist)
    # the threshold is strict and configurable
    unit = normalize_rows(np.stack(vecs))
    assert head_control(layers, heads, unit, sink, max_distance=1.0)[(0, 1)][2] is False
    assert head_control(layers, heads, unit, sink, max_distance=1.01)[(0, 1)][2] is True


def test_punctuation_and_sinks() -> None:
    for text in (",", " ,", ".", " .", "!", " ?", ";", ":", "...", "\n.\n"):
        assert is_punctuation(text), text
    for text in ("", " ", " said", " Mary", "a.", " 1"):
        assert not is_punctuation(text), text
    assert {",", ".", ";", ":", "!", "?"} <= PUNCTUATION
    srcs = np.array([0, 3, 5, 0])
    punct = np.array([False, True, False, True])
    assert sink_mask(srcs).tolist() == [True, False, False, True]
    assert sink_mask(srcs, punct).tolist() == [True, True, False, True]


def test_candidate_firings() -> None:
    A = torch.zeros(2, 4, 4)
    A[0, 0, 0] = 1.0
    A[0, 2, 0], A[0, 2, 1] = 0.5, 0.4
    A[1, 3, 3], A[1, 3, 2] = 0.39, 0.41
    A[1, 1, 0] = 0.9  # d = 1 < min_dest
    A[1, 2, 3] = 0.9  # s > d: not causal
    h, d, s = candidate_firings(A, 0.4, 2)
    assert list(zip(h.tolist(), d.tolist(), s.tolist(), strict=True)) == [(0, 2, 0), (0, 2, 1), (1, 3, 2)]


def _hand_table() -> tuple[pd.DataFrame, np.ndarray]:
    e = np.eye(3)
    rows = [
        # prompt, layer, head, dest, src, n_terms, is_punct, signal
        (0, 0, 0, 2, 0, 3, False, e[0]),
        (0, 0, 1, 3, 0, 2, False, e[0] + 0.1 * e[1]),
        (0, 1, 0, 4, 2, 1, True, 2 * e[0] - 0.1 * e[1]),  # punctuation source
        (0, 1, 1, 4, 3, 4, False, e[0] + 0.1 * e[2]),  # not a sink
        (1, 1, 1, 3, 1, 2, False, e[1]),
        (1, 0, 0, 2, 0, 0, False, np.zeros(3)),  # untraceable source side: left out
    ]
    table = pd.DataFrame(
        [r[:7] for r in rows], columns=["prompt", "layer", "head", "dest", "src", "n_terms", "is_punct"]
    )
    table["attention"] = 0.5
    table["src_token"] = "x"
    return table, np.stack([r[7] for r in rows])


def test_analyse_signals_on_hand_made_firings() -> None:
    table, signals = _hand_table()
    for rotary, n_sink_dom in ((False, 2), (True, 3)):
        res = analyse_signals(table, signals, rotary=rotary, cut=0.5, n_layers=2, n_heads=2)
        f = res.firings
        assert len(f) == 5 and res.summary["n_untraceable"] == 1 and res.summary["n_firings_filtered"] == 6
        assert f["in_dominant"].tolist() == [True, True, True, True, False]
        assert res.summary["dominant_size"] == 4 and res.summary["n_clusters"] == 2
        assert res.summary["dominant_sink_share"] == pytest.approx(n_sink_dom / 4)
        assert f["is_sink"].tolist() == [True, True, rotary, False, False]
        # prototype: least mean cosine distance inside the dominant cluster, computed by brute force
        dom = signals[:4]
        brute = cdist(dom, dom, "cosine").mean(axis=1)
        assert res.prototype_row == int(np.argmin(brute))
        assert res.summary["prototype_mean_distance"] == pytest.approx(brute.min())
        p = f.iloc[res.prototype_row]
        assert (res.summary["prototype_layer"], res.summary["prototype_head"]) == (p["layer"], p["head"])
        expected_ip = 1 - cdist(signals[:5], signals[[res.prototype_row]], "cosine")[:, 0]
        np.testing.assert_allclose(f["ip_with_prototype"], expected_ip, atol=1e-12)
        assert f["ip_with_prototype"].iloc[res.prototype_row] == pytest.approx(1.0)
        assert res.clusters["size"].tolist() == [4, 1] and res.clusters["dominant"].tolist() == [True, False]
        assert res.clusters["n_sink"].tolist() == [n_sink_dom, 0]
        heads = res.heads.set_index(["layer", "head"])
        assert len(heads) == 4 and heads["n_firings"].sum() == 5
        assert heads.loc[(1, 0), "n_sink"] == int(rotary)
    empty = analyse_signals(table.iloc[5:], signals[5:], rotary=False, cut=0.97, n_layers=2, n_heads=2)
    assert len(empty.firings) == 0 and empty.prototype_row is None and empty.summary["n_clusters"] == 0
    with pytest.raises(ValueError, match="signals"):
        analyse_signals(table, signals[:2], rotary=False, cut=0.5)


def test_figures() -> None:
    fig = control_signal_histograms([0.9, 0.8, 0.95], [0.1, -0.2], "t")
    assert len(fig.axes) == 1
    clusters = pd.DataFrame({"cluster": [1, 2], "size": [5, 2], "n_sink": [4, 0]})
    assert len(cluster_size_bars(clusters, "t", max_bars=1).axes) == 1
    with pytest.raises(ValueError, match="lacks columns"):
        cluster_size_bars(clusters.drop(columns="n_sink"))


# ----------------------------------------------------------------------------- against the tracer


@pytest.mark.parametrize(
    "builder",
    # the other families' runs are in the full suite only (make test-fast keeps one)
    [
        "tiny-gpt2",
        pytest.param("tiny-pythia", marks=pytest.mark.slow),
        pytest.param("tiny-gemma2", marks=pytest.mark.slow),
    ],
)
def test_decomposition_matches_tracer(builder: str) -> None:
    """Same selected source terms as the tracer on every firing both see; signal = P_V x_s from full V."""
    model = load_tiny(builder)
    a = model.arch
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 10, seed=0, prepend_bos=builder == "tiny-gemma2")
    omega = build_omega_cache(model)
    traced = list(
        trace_prompts(model, task, prompts, skip_incorrect=False, progress=False, omega_cache=omega)
    )
    traced = [pt for pt in traced if pt.n_firings > 0]  # tiny random models skip many prompts
    prompts = prompts.subset([pt.prompt_id for pt in traced])
    names = [n for layer in range(a.n_layers) for n in (model.ln1_normalized(layer), model.pattern(layer))]
    _, cache = model.run_with_cache(prompts.tokens[:, : int(prompts.lengths.max())], names)
    n_compared = n_checked = 0
    for p, pt in enumerate(traced):
        n = int(prompts.end[p]) + 1
        cos = sin = None
        if a.rotary:
            cos, sin = omega.tables(n)
        for layer in range(a.n_layers):
            x = cache[model.ln1_normalized(layer)][p, :n].float()
            pattern = cache[model.pattern(layer)][p, :, :n, :n].float()
            sig = layer_source_signals(
                x,
                pattern,
                omega,
                layer,
                min_attention=0.0,
                min_dest=1,
                cos=cos,
                sin=sin,
                adjacent=a.rotary_adjacent_pairs,
            )
            index = {
                (int(h), int(d), int(s)): f
                for f, (h, d, s) in enumerate(zip(sig.heads, sig.dests, sig.srcs, strict=True))
            }
            assert len(index) == sum(d + 1 for d in range(1, n)) * a.n_heads  # every causal pair, d >= 1
            for (_, lt, h, d, s), res in pt.results.items():
                if lt != layer:
                    continue
                f = index[(h, d, s)]
                assert torch.equal(sig.src_terms[f], res.src_terms), (layer, h, d, s)
                assert int(sig.n_terms[f]) == res.src_terms.numel()
                n_compared += 1
            # the signal is P_V x_s with V of Omega_s(d - s) taken from the full SVD (d_model rows)
            for f in range(0, len(index), 7):
                h, d, s = int(sig.heads[f]), int(sig.dests[f]), int(sig.srcs[f])
                _, _, V = omega.get(layer, h, d - s, "s")
                assert V.shape[0] == a.d_model
                Vs = V[:, sig.src_terms[f]]
                expected = Vs @ (Vs.T @ x[s])
                torch.testing.assert_close(sig.signal[f], expected, atol=1e-5, rtol=1e-4)
                n_checked += 1
    assert n_compared >= 2 and n_checked > 0, n_compared


# ----------------------------------------------------------------------------- the stage


def _context(builder: str, run_dir: Path, n_prompts: int = 4, **cs: Any) -> tuple[AppConfig, RunContext]:
    cfg = AppConfig(
        model=fixtures.tiny_model_config(builder), task=TaskConfig(name="ioi", n_prompts=n_prompts, seed=0)
    )
    cfg.paths.cache_dir = str(fixtures.test_cache_dir())
    for key, value in cs.items():
        setattr(cfg.control_signals, key, value)
    ctx = RunContext.for_tests(cfg, run_dir)
    ctx.model = load_tiny(builder)  # the session's loaded model (the stage would load the same one)
    ctx.tracker = RecordingTracker()  # type: ignore[assignment]
    return cfg, ctx


def _strong_firings(ctx: RunContext, ids: list[int], min_attention: float, min_dest: int) -> set[tuple]:
    """Every (prompt, layer, head, dest, src) with A >= min_attention and dest >= min_dest, from the hooks."""
    model = ctx.model
    prompts = ctx.prompts.subset(ids)
    names = [model.pattern(layer) for layer in range(model.arch.n_layers)]
    _, cache = model.run_with_cache(prompts.tokens[:, : int(prompts.lengths.max())], names)
    out = set()
    for i, pid in enumerate(ids):
        n = int(prompts.end[i]) + 1
        for layer in range(model.arch.n_layers):
            A = cache[model.pattern(layer)][i].float()
            for h in range(model.arch.n_heads):
                for d in range(min_dest, n):
                    for s in range(d + 1):
                        if float(A[h, d, s]) >= min_attention:
                            out.add((pid, layer, h, d, s))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["tiny-gpt2", "tiny-pythia"])
def test_control_signals_stage(builder: str, tmp_path: Path) -> None:
    cfg, ctx = _context(builder, tmp_path / "run")
    metrics = run_control_signals(cfg, ctx)
    rotary = builder != "tiny-gpt2"
    out = tmp_path / "run" / "control_signals"
    stem = f"{builder}_ioi"
    firings = pd.read_parquet(out / f"{stem}_firings.parquet")
    columns = "prompt layer head dest src attention n_terms cluster is_sink ip_with_prototype".split()
    assert set(columns) <= set(firings.columns)
    # exactly the firings passing the filters (all layers, layer 0 included) with a traceable source side
    keys = set(map(tuple, firings[["prompt", "layer", "head", "dest", "src"]].to_numpy().tolist()))
    strong = _strong_firings(ctx, [1, 2, 3], 0.4, 2)
    assert keys <= strong and len(strong) - len(keys) == metrics["control_signals/n_untraceable"]
    assert set(firings["prompt"]) == {1, 2, 3} and 0 in set(firings["layer"])
    assert (
        (firings["attention"] >= 0.4).all()
        and (firings["dest"] >= 2).all()
        and (firings["n_terms"] > 0).all()
    )
    # the sink rule: source 0 (GPT-2), or a punctuation source (rotary)
    expected_sink = (firings["src"] == 0) | (firings["is_punct"] & rotary)
    assert firings["is_sink"].tolist() == expected_sink.tolist()
    if rotary:
        assert (firings["is_sink"] & (firings["src"] > 0)).any(), "no punctuation sink on tiny-pythia"
        assert set(firings.loc[firings["is_punct"], "src_token"].str.strip()) <= PUNCTUATION
    summary = pd.read_csv(out / f"{stem}_summary.csv").iloc[0]
    assert summary["cut"] == (0.99 if rotary else 0.97)
    dom = firings[firings["in_dominant"]]
    assert (dom["cluster"] == summary["dominant_cluster"]).all()
    assert len(dom) == summary["dominant_size"] == firings["cluster"].value_counts().max()
    assert summary["dominant_sink_share"] == pytest.approx(dom["is_sink"].mean())
    proto = firings[
        (firings["prompt"] == summary["prototype_prompt"])
        & (firings["layer"] == summary["prototype_layer"])
        & (firings["head"] == summary["prototype_head"])
        & (firings["dest"] == summary["prototype_dest"])
        & (firings["src"] == summary["prototype_src"])
    ]
    assert len(proto) == 1 and bool(proto["in_dominant"].iloc[0])
    assert proto["ip_with_prototype"].iloc[0] == pytest.approx(1.0, abs=1e-9)
    assert firings["ip_with_prototype"].between(-1 - 1e-9, 1 + 1e-9).all()
    clusters = pd.read_csv(out / f"{stem}_clusters.csv")
    assert clusters["size"].sum() == len(firings) and clusters["dominant"].sum() == 1
    heads = pd.read_csv(out / f"{stem}_heads.csv")
    a = ctx.model.arch
    assert len(heads) == a.n_layers * a.n_heads and heads["n_firings"].sum() == len(firings)
    assert heads["controlled"].sum() == metrics["control_signals/n_controlled_heads"]
    assert (heads.loc[heads["controlled"], "mean_sink_distance"] < 0.5).all()
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    assert figures == sorted(
        f"control_signals_{stem}_{n}.{ext}"
        for n in ("inner_products", "cluster_sizes")
        for ext in ("png", "pdf")
    )
    logged = ctx.tracker.logged  # type: ignore[attr-defined]
    for key in (
        "inner_products_figure",
        "cluster_sizes_figure",
        "clusters",
        "heads",
        "summary",
        "dominant_sink_share",
    ):
        assert f"control_signals/{key}" in logged, key
    assert metrics["control_signals/n_firings"] == len(firings)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "control_signals" in json.dumps(manifest)


def test_stage_options_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("attncomm.stages.control_signals.save_figure", lambda fig, path: [])
    spec = get_stage("control_signals")
    assert spec.needs_model and spec.produces == ("control_signals",)
    # an explicit cut overrides the default; a lower attention threshold admits more firings
    cfg, ctx = _context("tiny-gpt2", tmp_path / "a", prompts=[0], cut=2.0, min_attention=0.3)
    metrics = run_control_signals(cfg, ctx)
    assert metrics["control_signals/cut"] == 2.0 and metrics["control_signals/n_clusters"] == 1
    assert metrics["control_signals/dominant_fraction"] == 1.0
    strong = _strong_firings(ctx, [0], 0.3, 2)
    assert metrics["control_signals/n_firings_filtered"] == len(strong)
    with pytest.raises(ConfigError, match="not prompt ids"):
        cfg, ctx = _context("tiny-gpt2", tmp_path / "b", n_prompts=3)  # default prompts 1, 2, 3
        run_control_signals(cfg, ctx)
