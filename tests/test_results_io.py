"""Tracing-result storage: published dataset names, part files, shard files and merging."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from attncomm.errors import AttncommError
from attncomm.io.results import (
    FiringRecord,
    PromptRecord,
    TracingResults,
    build_results,
    dataset_name,
    done_prompts,
    parse_dataset_name,
    read_part,
    write_part,
)


def record(prompt: int, n: int, rng: np.random.Generator) -> PromptRecord:
    firings = {}
    for i in range(n):
        layer, d = 1 + i % 3, 2 + i
        key = (prompt, layer, i % 4, d, i % (d + 1))
        firings[key] = FiringRecord(
            rng.permutation(8)[: 1 + i % 5],
            np.array([], dtype=np.int64) if i % 2 else rng.permutation(8)[:3],
            rng.standard_normal((layer, 6, d + 1)).astype(np.float32),
            rng.standard_normal((layer, 6, d + 1)).astype(np.float32),
        )
    return PromptRecord(prompt, "traced" if n else "incorrect", n, firings)


def test_dataset_names_are_published_and_parse_back() -> None:
    assert dataset_name("contrib_sv_dest", (3, 9, 6, 14, 2)) == "contrib_sv_dest_(3, 9, 6, 14, 2)"
    assert parse_dataset_name("svs_used_decomp_j_(0, 1, 2, 3, 4)") == ("svs_used_decomp_j", (0, 1, 2, 3, 4))
    for bad in ["contrib_sv_dest_(1, 2)", "foo_(1, 2, 3, 4, 5)", "contrib_sv_src_(1, 2, 3, 4, x)"]:
        with pytest.raises(ValueError, match="not a tracing-result dataset name"):
            parse_dataset_name(bad)


def test_parts_round_trip_and_mark_done(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rec = record(5, 4, rng)
    write_part(tmp_path, rec)
    assert done_prompts(tmp_path) == {5}
    back = read_part(tmp_path / "parts" / "5.h5")
    assert (back.prompt, back.status, back.n_firings) == (5, "traced", 4)
    assert back.firings.keys() == rec.firings.keys()
    for key, want in rec.firings.items():
        got = back.firings[key]
        np.testing.assert_array_equal(got.dest_terms, want.dest_terms)
        np.testing.assert_array_equal(got.src_terms, want.src_terms)
        np.testing.assert_array_equal(got.contrib_dest, want.contrib_dest)
        np.testing.assert_array_equal(got.contrib_src, want.contrib_src)
    with h5py.File(tmp_path / "parts" / "5.h5") as f:
        name = dataset_name("contrib_sv_src", next(iter(rec.firings)))
        assert f[name].attrs["dims"] == "layer,component,src_pos"


def test_sharded_then_merged_equals_unsharded(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    recs = [record(p, p % 3, rng) for p in range(6)]
    one, many = tmp_path / "one", tmp_path / "many"
    for rec in recs:
        write_part(one, rec)
        write_part(many, rec)
    unsharded = build_results(one / "all.h5", one, range(6))
    build_results(many / "s0.h5", many, [0, 2, 4])
    build_results(many / "s1.h5", many, [1, 3, 5])
    merged = build_results(many / "all.h5", many, range(6))
    a, b = TracingResults(unsharded), TracingResults(merged)
    assert a.prompts() == b.prompts() == {r.prompt: (r.status, r.n_firings) for r in recs}
    fa, fb = a.firings(), b.firings()
    assert fa.keys() == fb.keys() and len(fa) == sum(r.n_firings for r in recs)
    for key in fa:
        np.testing.assert_array_equal(fa[key].contrib_dest, fb[key].contrib_dest)
    assert set(TracingResults(many / "s0.h5").prompts()) == {0, 2, 4}
    assert {k[0] for k in a.firings(prompt=2)} == {2}


def test_damaged_part_is_named(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    bad = tmp_path / "parts" / "3.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(AttncommError, match=r"parts/3\.h5 is damaged"):
        read_part(bad)
