"""The silent wrong results of the reliability work, met as a user meets them: on the command line.

Item 1: ``model.path`` to other weights under the configured model's name gets its own run directory
(nothing of the named model's run is reused); item 4: an Omega cache left by other weights in the run
directory is recomputed; item 5: a corrupt ``manifest.json`` is moved aside with a warning naming it and
no record is lost. The in-process versions are in tests/test_provenance.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attncomm.runtime.config import package_path
from tests.test_framework import run_cli
from tests.test_provenance import perturbed_copy

TOY = "toy-ioi"  # the shipped model: no build needed
BASE = ["model=toy-ioi", "task=ioi", "task.n_prompts=2", "logger.mode=disabled"]


def other_weights(tmp_path: Path) -> Path:
    """toy-ioi's directory with perturbed weights (same architecture, same config)."""
    return perturbed_copy(tmp_path, "other-weights", package_path(f"toys/{TOY}"), seed=7)


def ok(out: object) -> str:
    text = out.stdout + out.stderr  # type: ignore[attr-defined]
    assert out.returncode == 0, text[-3000:]  # type: ignore[attr-defined]
    assert "Traceback" not in text
    return text


@pytest.mark.cli
@pytest.mark.slow
def test_model_path_with_other_weights_traces_in_its_own_run_directory(tmp_path: Path) -> None:
    root = tmp_path / "out"
    ok(run_cli([*BASE, "stage=trace", f"paths.root={root}"], tmp_path))
    other = other_weights(tmp_path)
    ok(run_cli([*BASE, "stage=trace", f"paths.root={root}", f"model.path={other}"], tmp_path))
    records = sorted(root.glob("**/tracing_results/provenance.json"))
    assert len(records) == 2, records  # two run directories, none reused
    keys = [json.loads(p.read_text()) for p in records]
    assert keys[0]["model.weights"] != keys[1]["model.weights"]
    folders = sorted(p.relative_to(root).parts[0] for p in records)
    assert folders[0] == TOY and folders[1].startswith(f"{TOY}-"), folders


@pytest.mark.cli
@pytest.mark.slow
def test_omega_cache_of_other_weights_in_the_run_directory_is_recomputed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    other = other_weights(tmp_path)
    first = ok(run_cli([*BASE, "stage=omega", f"paths.run_dir={run_dir}", f"model.path={other}"], tmp_path))
    assert "omega: 0 SVDs added" not in first
    mine = ok(run_cli([*BASE, "stage=omega", f"paths.run_dir={run_dir}"], tmp_path))
    assert "omega: 0 SVDs added" not in mine  # the other weights' SVDs are not kept
    again = ok(run_cli([*BASE, "stage=omega", f"paths.run_dir={run_dir}"], tmp_path))
    assert "omega: 0 SVDs added" in again  # its own cache is reused


@pytest.mark.cli
@pytest.mark.slow
def test_corrupt_manifest_is_moved_aside_and_no_record_is_lost(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ok(run_cli([*BASE, "stage=omega", f"paths.run_dir={run_dir}"], tmp_path))
    manifest = run_dir / "manifest.json"
    manifest.write_text('{"stages": {"omega": ')
    text = ok(run_cli([*BASE, "stage=heads", f"paths.run_dir={run_dir}"], tmp_path))
    aside = list(run_dir.glob("manifest.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"stages": {"omega": '
    assert aside[0].name in text  # the warning names it
    assert {"omega", "heads"} <= set(json.loads(manifest.read_text())["stages"])
