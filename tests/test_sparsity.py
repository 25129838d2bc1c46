"""Sparse attention decomposition statistics: pure computations on hand-made firings, and the stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attncomm.core.term_statistics import (
    d_head_lower_bound,
    head_density,
    head_density_table,
    histogram,
    summary,
    term_counts,
    with_fraction,
)
from attncomm.errors import AttncommError, MissingArtifactError
from attncomm.io.results import FiringKey, FiringRecord, PromptRecord, write_results
from attncomm.runtime.config import AppConfig, ModelConfig, TaskConfig
from attncomm.runtime.registry import RunContext, get_stage
from attncomm.stages.sparsity import dims_from_config, run_sparsity
from attncomm.viz.plots import head_density_heatmap, sparsity_by_model_task, sparsity_histogram
from tests.fakes import RecordingTracker

H = 4  # heads of the hand-made model


def _rec(key: FiringKey, dest: list[int], src: list[int]) -> FiringRecord:
    layer, d = key[1], key[3]
    zeros = np.zeros((layer, H + 2, d + 1), dtype=np.float32)
    return FiringRecord(np.array(dest, dtype=np.int64), np.array(src, dtype=np.int64), zeros, zeros.copy())


#: (prompt, layer, head, dest, src) -> (dest terms, source terms); an empty side was not traced
FIRINGS: dict[FiringKey, tuple[list[int], list[int]]] = {
    (0, 1, 0, 3, 1): ([5, 2], [7]),
    (0, 1, 1, 3, 2): ([0, 1, 2], []),
    (0, 2, 0, 4, 0): ([], [3, 1, 0, 6]),
    (1, 2, 1, 5, 5): ([9], [1, 2]),
}


def firings() -> dict[FiringKey, FiringRecord]:
    return {k: _rec(k, d, s) for k, (d, s) in FIRINGS.items()}


def test_term_counts_exclude_untraced_sides() -> None:
    df, untraced = term_counts(firings(), d_head=16)
    assert untraced == {"dest": 1, "src": 1}
    assert len(df) == 6
    dest = df[df["side"] == "dest"].sort_values(["prompt", "layer", "head"])
    assert dest["n_terms"].tolist() == [2, 3, 1]
    src = df[df["side"] == "src"]
    assert sorted(src["n_terms"]) == [1, 2, 4]
    assert np.allclose(df["frac_d_head"], df["n_terms"] / 16)
    row = df[(df["side"] == "src") & (df["layer"] == 2) & (df["head"] == 0)].iloc[0]
    assert (row["prompt"], row["dest"], row["src"], row["n_terms"]) == (0, 4, 0, 4)


def test_summary_histogram_and_densities() -> None:
    df, untraced = term_counts(firings(), d_head=16)
    summ = summary(df, untraced).set_index("side")
    assert summ.loc["dest", "n_traced"] == 3 and summ.loc["dest", "n_untraced"] == 1
    assert summ.loc["dest", "mean_terms"] == 2.0 and summ.loc["dest", "median_terms"] == 2.0
    assert (summ.loc["dest", "min_terms"], summ.loc["dest", "max_terms"]) == (1, 3)
    assert summ.loc["src", "mean_terms"] == pytest.approx(7 / 3)
    assert summ.loc["both", "n_traced"] == 6 and summ.loc["both", "n_untraced"] == 2
    assert summ.loc["both", "mean_frac_d_head"] == pytest.approx(13 / 6 / 16)

    hist = histogram(df, 5)
    dest = hist[hist["side"] == "dest"].set_index("n_terms")["count"]
    assert dest.to_dict() == {1: 1, 2: 1, 3: 1, 4: 0, 5: 0}
    assert hist["count"].sum() == 6

    nan = np.nan
    np.testing.assert_array_equal(head_density(df, "dest", 3, H)[1:, :2], [[2, 3], [nan, 1]])
    np.testing.assert_array_equal(head_density(df, "src", 3, H)[1:, :2], [[1, nan], [4, 2]])
    both = head_density(df, None, 3, H)
    assert both.shape == (3, H) and np.isnan(both[0]).all() and np.isnan(both[:, 2:]).all()
    np.testing.assert_array_equal(both[1:, :2], [[1.5, 3], [4, 1.5]])
    assert head_density(df).shape == (3, 2)  # inferred from the largest layer/head seen

    table = head_density_table(df)
    assert set(table["side"]) == {"dest", "src", "both"}
    row = table[(table["side"] == "both") & (table["layer"] == 1) & (table["head"] == 0)].iloc[0]
    assert (row["mean_terms"], row["n_sides"]) == (1.5, 2)


def test_fraction_and_lower_bound() -> None:
    assert d_head_lower_bound(firings()) == 10
    df, _ = term_counts(firings())
    assert "frac_d_head" not in df
    with pytest.raises(ValueError, match="more than d_head=3"):
        with_fraction(df, 3)
    empty, untraced = term_counts({})
    assert len(empty) == 0 and untraced == {"dest": 0, "src": 0}
    assert summary(empty).set_index("side").loc["both", "n_traced"] == 0


def test_dims_from_config() -> None:
    assert dims_from_config({"n_embd": 768, "n_head": 12, "n_layer": 12}) == (64, 12, 12)
    assert dims_from_config({"hidden_size": 2304, "num_attention_heads": 8, "head_dim": 256}) == (
        256,
        None,
        8,
    )


def test_figures() -> None:
    df, _ = term_counts(firings(), d_head=16)
    assert len(sparsity_histogram(df, 16, "t").axes) >= 2
    fig = head_density_heatmap({s: head_density(df, s, 3, H) for s in ("dest", "src")})
    assert len(fig.axes) == 3  # two heatmaps and a colorbar
    both = pd.concat([df.assign(model="m1", task="ioi"), df.assign(model="m2", task="gp")])
    assert len(sparsity_by_model_task(both).axes) == 2
    with pytest.raises(ValueError, match="lacks columns"):
        sparsity_by_model_task(df)


# ----------------------------------------------------------------------------- stage


def _cfg(tmp_path: Path, model_dir: Path | None = None, short: str = "toy", task: str = "ioi") -> AppConfig:
    cfg = AppConfig(
        model=ModelConfig(
            name=short, short_name=short, family="gpt2", path=str(model_dir) if model_dir else None
        ),
        task=TaskConfig(name=task, n_prompts=3, seed=0),
    )
    cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def _model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": H, "n_layer": 3})
    )
    return d


def _write(ctx: RunContext, path: Path | None = None) -> Path:
    fs = firings()
    parts = [
        PromptRecord(0, "traced", 3, {k: v for k, v in fs.items() if k[0] == 0}),
        PromptRecord(1, "traced", 1, {k: v for k, v in fs.items() if k[0] == 1}),
        PromptRecord(2, "incorrect", 0, {}),
    ]
    return write_results(path or ctx.artifacts.tracing_results(), parts)


def test_registered() -> None:
    spec = get_stage("sparsity")
    assert not spec.needs_model and spec.consumes == ("tracing_results",)


@pytest.mark.slow
def test_sparsity_stage(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, _model_dir(tmp_path))
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    ctx.tracker = RecordingTracker()  # type: ignore[assignment]
    _write(ctx)
    metrics = run_sparsity(cfg, ctx)
    assert metrics["sparsity/d_head"] == 16 and metrics["sparsity/n_firings"] == 4
    assert metrics["sparsity/n_prompts_traced"] == 2
    assert metrics["sparsity/dest/mean_terms"] == 2.0 and metrics["sparsity/src/n_untraced"] == 1
    assert metrics["sparsity/both/mean_frac_d_head"] == pytest.approx(13 / 6 / 16)

    out = tmp_path / "run" / "sparsity"
    table = pd.read_parquet(out / "toy_ioi_term_counts.parquet")
    assert len(table) == 6 and set(table["model"]) == {"toy"} and set(table["d_head"]) == {16}
    assert table["n_terms"].sum() == 13
    summ = pd.read_csv(out / "toy_ioi_summary.csv").set_index("side")
    assert summ.loc["src", "max_terms"] == 4
    dens = pd.read_csv(out / "toy_ioi_head_density.csv")
    assert len(dens[dens["side"] == "both"]) == 4
    hist = pd.read_csv(out / "toy_ioi_histogram.csv")
    assert len(hist) == 2 * 16 and hist["count"].sum() == 6
    meta = json.loads((out / "toy_ioi_meta.json").read_text())
    assert meta == meta | {"d_head": 16, "d_head_source": "model config.json", "n_layers": 3, "n_heads": H}
    figures = sorted(p.name for p in (tmp_path / "run" / "figures").iterdir())
    assert figures == [
        "sparsity_toy_ioi_head_density.pdf",
        "sparsity_toy_ioi_head_density.png",
        "sparsity_toy_ioi_histogram.pdf",
        "sparsity_toy_ioi_histogram.png",
    ]
    logged = ctx.tracker.logged  # type: ignore[attr-defined]
    for key in ("sparsity/summary", "sparsity/histogram", "sparsity/head_density"):
        assert key in logged
    assert isinstance(logged["sparsity/summary"], pd.DataFrame)
    assert str(logged["sparsity/histogram_figure"]).endswith(
        "sparsity_toy_ioi_histogram.png"
    )  # image via its PNG
    assert '"sparsity"' in (tmp_path / "run" / "manifest.json").read_text()


@pytest.fixture
def no_figure_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip rendering figure files (slow on a shared CPU) in tests about other things."""
    monkeypatch.setattr("attncomm.stages.sparsity.save_figure", lambda fig, path: [])


@pytest.mark.usefixtures("no_figure_files")
def test_d_head_fallbacks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # published model name, no config.json on disk: section 9's value
    cfg = _cfg(tmp_path, short="gpt2-small")
    ctx = RunContext.for_tests(cfg, tmp_path / "pub")
    _write(ctx)
    assert run_sparsity(cfg, ctx)["sparsity/d_head"] == 64
    # unknown model: the tracing results' lower bound, with a warning
    cfg = _cfg(tmp_path)
    ctx = RunContext.for_tests(cfg, tmp_path / "unknown")
    _write(ctx)
    with caplog.at_level(logging.WARNING, logger="attncomm.stages.sparsity"):
        assert run_sparsity(cfg, ctx)["sparsity/d_head"] == 10
    assert "lower bound 10" in caplog.text


@pytest.mark.usefixtures("no_figure_files")
def test_reads_shards_when_not_merged(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, _model_dir(tmp_path))
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    _write(ctx, ctx.artifacts.tracing_results(shard=0))
    assert run_sparsity(cfg, ctx)["sparsity/n_firings"] == 4


def test_missing_tracing_results(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(MissingArtifactError) as err:
        run_sparsity(cfg, RunContext.for_tests(cfg, tmp_path / "empty"))
    assert err.value.producer == "trace"


def test_results_of_another_model_are_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "small"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_head": 4, "n_layer": 3})
    )
    cfg = _cfg(tmp_path, model_dir)
    ctx = RunContext.for_tests(cfg, tmp_path / "run")
    _write(ctx)
    with pytest.raises(AttncommError, match="do not belong to this model"):
        run_sparsity(cfg, ctx)


@pytest.mark.slow
def test_figure_across_models_and_tasks(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    for task in ("ioi", "gp"):
        cfg = _cfg(tmp_path, _model_dir(tmp_path), task=task)
        cfg.paths.root = str(root)
        ctx = RunContext.from_config(cfg)
        _write(ctx)
        run_sparsity(cfg, ctx)
    assert (root / "figures" / "sparsity_by_model_task.png").is_file()
