"""The readers and facts the stages share: result-file term lengths and shards, model dimensions
without weights, the per-head grid and prompt batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attncomm.core.edge_interventions import batch_ranges
from attncomm.core.term_statistics import head_grid
from attncomm.io.artifacts import RunArtifacts
from attncomm.io.results import FiringKey, FiringRecord, PromptRecord, read_term_lengths, write_results
from attncomm.models.dimensions import model_dims
from attncomm.runtime.cache_root import built_model_dir
from attncomm.runtime.config import ModelConfig

H = 3  # heads of the hand-made results


def _record(key: FiringKey, dest: list[int], src: list[int]) -> FiringRecord:
    layer, d = key[1], key[3]
    zeros = np.zeros((layer, H + 2, d + 1), dtype=np.float32)
    return FiringRecord(np.array(dest, dtype=np.int64), np.array(src, dtype=np.int64), zeros, zeros.copy())


def test_read_term_lengths_over_shards(tmp_path: Path) -> None:
    a = {
        (0, 1, 2, 3, 1): _record((0, 1, 2, 3, 1), [4, 0], []),
        (0, 2, 0, 2, 2): _record((0, 2, 0, 2, 2), [1], [6]),
    }
    b = {(1, 1, 1, 4, 0): _record((1, 1, 1, 4, 0), [], [2, 3, 9])}
    first = write_results(
        tmp_path / "s0.h5", [PromptRecord(0, "traced", 2, a), PromptRecord(2, "incorrect", 0, {})]
    )
    second = write_results(tmp_path / "s1.h5", [PromptRecord(1, "traced", 1, b)])
    got = read_term_lengths([first, second])
    assert got.rows == [((0, 1, 2, 3, 1), 2, 0), ((0, 2, 0, 2, 2), 1, 1), ((1, 1, 1, 4, 0), 0, 3)]
    assert got.n_heads == H
    assert got.term_bound == 10  # largest selected index 9, plus one
    assert got.prompts == {0: ("traced", 2), 1: ("traced", 1), 2: ("incorrect", 0)}
    empty = read_term_lengths([write_results(tmp_path / "e.h5", [PromptRecord(0, "incorrect", 0, {})])])
    assert (empty.rows, empty.n_heads, empty.term_bound) == ([], None, 0)


def test_shard_files_of_this_run_only(tmp_path: Path) -> None:
    arts = RunArtifacts(tmp_path, "m", "t", 8, 0)
    assert arts.stem == "m_t" and arts.prefix == "m_t_n8"
    arts.tracing_results_dir.mkdir(parents=True)
    for name in ("m_t_n8_0_shard1.h5", "m_t_n8_0_shard0.h5", "m_t_n8_1_shard0.h5", "m_t_n16_0_shard0.h5"):
        (arts.tracing_results_dir / name).touch()
    assert [p.name for p in arts.tracing_result_shards()] == ["m_t_n8_0_shard0.h5", "m_t_n8_0_shard1.h5"]
    assert arts.tracing_results(shard=1) == arts.tracing_result_shards()[1]


def _model(**kw: object) -> ModelConfig:
    return ModelConfig(name="x", short_name=str(kw.pop("short_name", "x")), family="gpt2", **kw)  # type: ignore[arg-type]


def test_model_dims_from_config_json_then_published(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(
        json.dumps({"hidden_size": 96, "num_attention_heads": 3, "num_hidden_layers": 5})
    )
    dims = model_dims(_model(path=str(local)), tmp_path / "cache")
    assert (dims.d_head, dims.n_layers, dims.n_heads, dims.source) == (32, 5, 3, "model config.json")

    built = built_model_dir("tiny-gpt2", tmp_path / "cache")
    built.mkdir(parents=True)
    (built / "config.json").write_text(json.dumps({"n_embd": 64, "n_head": 4, "n_layer": 3, "head_dim": 8}))
    dims = model_dims(_model(builder="tiny-gpt2"), tmp_path / "cache")
    assert (dims.d_head, dims.n_layers, dims.n_heads) == (8, 3, 4)

    dims = model_dims(_model(short_name="gemma-2-2b"), tmp_path / "cache")
    assert (dims.d_head, dims.n_layers, dims.source) == (256, None, "published value (section 9)")
    assert model_dims(_model(), tmp_path / "cache").d_head is None


def test_head_grid() -> None:
    df = pd.DataFrame({"layer": [0, 4, 2], "head": [7, 1, 0]})
    assert head_grid(df) == (5, 8)
    assert head_grid(df, 12, None) == (12, 8)
    assert head_grid(df.iloc[:0]) == (0, 0)


@pytest.mark.parametrize(("n", "size"), [(0, 3), (1, 3), (7, 3), (9, 3), (5, 8)])
def test_batch_ranges_cover_every_row_once(n: int, size: int) -> None:
    batches = [list(r) for r in batch_ranges(n, size)]
    assert [i for b in batches for i in b] == list(range(n))
    assert all(0 < len(b) <= size for b in batches)
    assert len(batches) == -(-n // size)
