"""The notebook API: one session on toy-ioi, every analysis callable, ``import attncomm`` stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT


def test_import_is_cheap() -> None:
    heavy = "('torch', 'transformer_lens', 'hydra')"
    code = f"import sys, attncomm; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_session_on_toy_ioi() -> None:
    import attncomm

    s = attncomm.load("toy-ioi", task="ioi", n_prompts=4, dtype="float64")
    assert s.bridge is s.model.bridge and s.corrupted.shape == s.prompts.tokens.shape
    metric = s.metric()
    assert metric.shape == (4,) and (metric - s.metric(s.corrupted)).abs().max() > 0.1
    dla = s.dla()
    total = dla.table[dla.table.kind.isin(["embed", "pos_embed", "attn", "mlp", "unembed_bias"])]
    torch.testing.assert_close(
        torch.tensor(total.groupby("prompt")["value"].sum().to_numpy()), metric, rtol=0, atol=1e-9
    )
    assert "heads" in dla.figures
    ap = s.act_patch(kinds=["resid_pre"])
    assert set(ap.table["grid"]) == {"layer_pos"} and ap.figures
    pp = s.path_patch(receivers=[["logits"]], senders=[[2, 0]])
    assert len(pp.table) == 1
    assert len(s.qk_ov([[2, 0]], top_k=3).table) == 2 * 3 * len(set(s.prompts.correct[:3].tolist()))
