"""Tracing output that does not grow in memory: the compact edge list and the on-disk firing spool.

* :class:`~attncomm.core.edge_list.EdgeList` gives the same ``MultiDiGraph`` as adding the edges one by
  one (node order, parallel-edge keys, attributes);
* :class:`~attncomm.io.firing_spool.FiringSpool` reads back exactly what was written (dtypes, shapes,
  empty term lists) and forgets everything when closed;
* ``trace_prompts(spool_dir=...)`` gives the same per-firing results and graphs as the in-memory dict,
  leaves no file behind in the spool directory, and the part file written from the spool is byte for
  byte the one written from the dict.
"""

from __future__ import annotations

import random
from pathlib import Path

import networkx as nx
import numpy as np
import torch

from attncomm.core.edge_list import EdgeList
from attncomm.core.prompt_graph import FiringResult
from attncomm.io.firing_spool import FiringSpool
from attncomm.io.results import PromptRecord, write_part
from attncomm.methods.acc_tracing import trace_prompts
from attncomm.stages.trace import FiringRecords
from attncomm.tasks import get_task
from tests.models_fixtures import load_tiny


def test_edge_list_replays_the_multidigraph() -> None:
    rng = random.Random(0)
    nodes = [(rng.randrange(3), rng.choice([0, 1, "MLP"]), f"a{rng.randrange(4)}", "b") for _ in range(12)]
    nodes.append(("logit_diff", "end"))
    direct, edges = nx.MultiDiGraph(), EdgeList()
    for _ in range(300):  # many parallel edges between the same pair
        u, v = rng.choice(nodes), rng.choice(nodes)
        w, kind = rng.uniform(-1, 1), rng.choice("ds")
        direct.add_edge(u, v, weight=w, type=kind)
        edges.add(u, v, w, kind)
    built = edges.to_graph()
    assert len(edges) == 300 and edges.n_nodes == direct.number_of_nodes()
    assert list(built.nodes) == list(direct.nodes)
    assert list(built.edges(keys=True, data=True)) == list(direct.edges(keys=True, data=True))
    assert edges.nbytes() == 300 * (8 + 8 + 8 + 1)


def _result(
    rng: np.random.Generator, dtype: torch.dtype, n_terms: int, shape: tuple[int, ...]
) -> FiringResult:
    return FiringResult(
        dest_terms=torch.from_numpy(rng.permutation(16)[:n_terms].astype(np.int64)),
        src_terms=torch.empty(0, dtype=torch.long),
        contrib_dest=torch.from_numpy(rng.standard_normal(shape)).to(dtype),
        contrib_src=torch.from_numpy(rng.standard_normal(shape)).to(dtype),
    )


def test_spool_reads_back_what_was_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    written = {
        (0, 3, 1, 7, 2): _result(rng, torch.float32, 3, (3, 6, 8)),
        (0, 2, 0, 7, 7): _result(rng, torch.float64, 0, (2, 6, 8)),
        (0, 1, 3, 0, 0): _result(rng, torch.float32, 16, (1, 6, 1)),
    }
    spool = FiringSpool(tmp_path / "spool")
    for key, value in written.items():
        spool.add(key, value)
    assert list(spool) == list(written) and len(spool) == 3
    assert list((tmp_path / "spool").iterdir()) == []  # anonymous: nothing to clean up
    for key, value in written.items():
        back = spool[key]
        for name in ("dest_terms", "src_terms", "contrib_dest", "contrib_src"):
            a, b = getattr(back, name), getattr(value, name)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (key, name)
    assert spool.nbytes == sum(
        sum(t.numel() * t.element_size() for t in (r.dest_terms, r.src_terms, r.contrib_dest, r.contrib_src))
        for r in written.values()
    )
    spool.close()
    assert len(spool) == 0


def test_spooled_tracing_equals_in_memory_and_writes_the_same_part(tmp_path: Path) -> None:
    model = load_tiny("tiny-pythia")
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 4, seed=0, prepend_bos=False)
    plain = list(trace_prompts(model, task, prompts, skip_incorrect=False, progress=False))
    spooled = list(
        trace_prompts(model, task, prompts, skip_incorrect=False, progress=False, spool_dir=tmp_path / "sp")
    )
    assert any(t.n_firings for t in plain)
    for a, b in zip(plain, spooled, strict=True):
        assert isinstance(b.results, FiringSpool) and isinstance(a.results, dict)
        assert a.skip_reason == b.skip_reason and a.n_firings == b.n_firings
        assert list(a.results) == list(b.results)
        for key, ra in a.results.items():
            rb = b.results[key]
            assert torch.equal(ra.dest_terms, rb.dest_terms) and torch.equal(ra.src_terms, rb.src_terms)
            assert torch.equal(ra.contrib_dest, rb.contrib_dest) and torch.equal(
                ra.contrib_src, rb.contrib_src
            )
        if a.graph is None:
            assert b.graph is None
            continue
        assert list(a.graph.edges(keys=True, data=True)) == list(b.graph.edges(keys=True, data=True))
        parts = [
            write_part(
                tmp_path / name, PromptRecord(t.prompt_id, "traced", t.n_firings, FiringRecords(t.results))
            )
            for name, t in (("plain", a), ("spooled", b))
        ]
        assert parts[0].read_bytes() == parts[1].read_bytes()
    assert list((tmp_path / "sp").iterdir()) == []


def _datasets(path: Path) -> list[tuple]:
    """Every dataset of a result file in stored order: name, dtype, shape, compression, attrs, values."""
    import h5py

    out: list[tuple] = []
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                out.append((name, obj.dtype, obj.shape, obj.compression, dict(obj.attrs), obj[()].tobytes()))

        f.visititems(visit)
        out.append(("file-attrs", dict(f.attrs)))
        out.append(("order", list(f.keys())))  # creation order (track_order)
    return out


def test_merging_by_object_copy_gives_the_written_datasets(tmp_path: Path) -> None:
    """build_results copies each stored dataset; the file holds what write_results writes from parts."""
    from attncomm.io.results import build_results, read_part, write_results

    rng = np.random.default_rng(2)
    for p in range(3):
        firings = {}
        for i in range(1 + p):
            key = (p, 2 + i, i, 5 + i, i)
            r = _result(rng, torch.float32, i + 1, (2 + i, 6, 6 + i))  # small and big (gzip) arrays
            firings[key] = FiringRecords({key: r})[key]
        status = "traced" if p != 1 else "nonpositive_total"
        write_part(
            tmp_path, PromptRecord(p, status, len(firings) if p != 1 else 0, firings if p != 1 else {})
        )
    copied = build_results(tmp_path / "copied.h5", tmp_path, range(3))
    written = write_results(
        tmp_path / "written.h5", [read_part(tmp_path / "parts" / f"{p}.h5") for p in range(3)]
    )
    a, b = _datasets(copied), _datasets(written)
    assert [x[0] for x in a] == [x[0] for x in b] and len(a) == (1 + 3) * 4 + 3 + 2
    assert a == b
