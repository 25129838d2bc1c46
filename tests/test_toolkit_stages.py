"""The toolkit stages end to end: files in the run directory, wandb logging, and clear CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from attncomm.runtime.config import AppConfig
from attncomm.runtime.registry import RunContext, get_stage
from tests.conftest import REPO_ROOT, compose_app
from tests.fakes import RecordingTracker as _Recording

STAGES = ["dla", "logit_lens", "act_patch", "path_patch", "attr_patch", "ablate", "heads", "qk_ov"]


class RecordingTracker(_Recording):
    def log_html(self, key: str, path: object) -> None:
        self.logged[key] = path


def app(overrides: list[str]) -> AppConfig:
    return compose_app(overrides)


@pytest.mark.slow
def test_every_stage_writes_tables_figures_and_html(tmp_path: Path) -> None:
    cfg = app(
        [
            "model=toy-induction",
            "task=induction",
            "task.n_prompts=3",
            "stage=pipeline",
            "act_patch.kinds=[resid_pre,z]",
            "attr_patch.kinds=[z]",
            "ablate.heads=[[1,1]]",
            "path_patch.receivers=[[1,1,k],[logits]]",
            "heads.n_sequences=2",
            "qk_ov.heads=[[1,1]]",
        ]
    )
    ctx = RunContext.for_tests(cfg, tmp_path)
    ctx.tracker = RecordingTracker()
    assert ctx.prompts.corrupted_tokens is not None  # the task's own corrupted counterparts
    for name in STAGES:
        metrics = get_stage(name).run(cfg, ctx)
        assert metrics, name
        table = tmp_path / "analyses" / name / "toy-induction_induction.parquet"
        assert table.is_file() and table.with_suffix(".csv").is_file(), name
        assert list((tmp_path / "figures").glob(f"{name}_*.png")), name
    for name in ("dla", "act_patch", "path_patch", "attr_patch", "heads", "qk_ov"):
        pages = list((tmp_path / "analyses" / name).glob("*.html"))
        assert pages, name
        text = pages[0].read_text()
        assert "http" not in text and "value:" in text  # self-contained, hover text present
    logged = ctx.tracker.logged
    for name in STAGES:
        assert f"{name}/table" in logged, name
        assert any(k.startswith(f"{name}/") and k.endswith("_figure") for k in logged), name
    assert "attr_patch/correlation" in logged and "dla/heads_html" in logged


@pytest.mark.cli
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["stage=ablate", "ablate.heads=[[5,0]]"],
            "ablate.heads: layer 5 is out of range; valid layers are 0..1",
        ),
        (["stage=qk_ov", "qk_ov.heads=[[0,9]]"], "qk_ov.heads: head 9 is out of range; valid heads are 0..1"),
        (["stage=ablate", "ablate.heads=[[0,0]]", "ablate.positions=[99]"], "valid positions are 0..15"),
        (["stage=path_patch", "path_patch.receivers=[[1,0,x]]"], "path_patch.receivers: malformed receiver"),
        (["stage=act_patch", "task=file", "task.path={file}"], "act_patch needs a corrupted counterpart"),
    ],
)
def test_bad_input_exits_2_with_one_message(tmp_path: Path, overrides: list[str], message: str) -> None:
    prompts = tmp_path / "prompts.jsonl"  # a prompt file without corrupted prompts
    prompts.write_text(
        '{"prompt": "t001 t002 t003 t001 t002", "answer": " t003"}\n'
        '{"prompt": "t005 t006 t005", "answer": " t006"}\n'
    )
    overrides = [o.replace("{file}", str(prompts)) for o in overrides]
    cmd = [
        sys.executable,
        "run.py",
        "model=toy-induction",
        "task=induction",
        "task.n_prompts=2",
        "logger.mode=disabled",
        f"paths.root={tmp_path}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
