"""`python run.py` with no overrides: the whole pipeline on the shipped toy-ioi, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from attncomm.core.circuit_overlap import circuit_components
from attncomm.io.graphml import read_graph
from attncomm.runtime.tracking import find_offline_runs, read_offline_run
from tests.conftest import REPO_ROOT


def reference_top_heads(k: int) -> set[tuple[int, int]]:
    """The k heads whose mean-ablation lowers toy-ioi's logit difference most (from the shipped reference)."""
    ref = json.loads(resources.files("attncomm").joinpath("toys/toy-ioi/reference_circuit.json").read_text())
    drops = ref["logit_diff_drop_share"]
    ranked = sorted(
        ((d, (layer, head)) for layer, row in enumerate(drops) for head, d in enumerate(row)), reverse=True
    )
    top = {head for _, head in ranked[:k]}
    assert top <= {tuple(h) for h in ref["heads"]}
    return top


@pytest.mark.cli
@pytest.mark.slow
def test_default_run_is_the_toy_ioi_pipeline(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", ATTNCOMM_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run.py"), f"paths.root={tmp_path / 'out'}", "task.n_prompts=64"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    text = out.stdout + out.stderr
    assert "== attncomm pipeline: toy-ioi / ioi, N=64 ==" in text
    assert "prompts traced:" in text and "vs Toy reference: precision" in text and "wandb offline run" in text
    run_dir = tmp_path / "out" / "toy-ioi" / "ioi" / "n64_seed0"
    for rel in [
        "traced_graphs/toy-ioi_ioi_n64_0_0.graphml",
        "tracing_results/toy-ioi_ioi_n64_0.h5",
        "combined_graphs/toy-ioi_ioi_n64_combined_0.01.graphml",
        "interventions_graph_toy-ioi_ioi_n64_0_combined_0.01.graphml",
        "pruned_graphs/toy-ioi_ioi_n64_0.2.graphml",
        "circuit_comparison/toy-ioi_ioi_0.2.csv",
        "export/pruned_graphs/toy-ioi_ioi_n64_0.2.html",
        "manifest.json",
    ]:
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "figures").glob("circuit_comparison_*.png"))
    circuit = circuit_components(read_graph(run_dir / "pruned_graphs" / "toy-ioi_ioi_n64_0.2.graphml"))
    assert reference_top_heads(3) <= circuit
    runs = find_offline_runs(tmp_path / "out")
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run.job_type == "pipeline" and run.config["model"]["name"] == "toy-ioi"
    assert 0.0 <= run.summary["compare/recall"] <= 1.0
