"""Path patching: equals activation patching where the two must agree, and a hand-built model whose
answer is known by construction."""

from __future__ import annotations

import pytest
import torch

from attncomm.analyses.activation_patching import patched_metrics
from attncomm.analyses.common import AnalysisInputError
from attncomm.analyses.path_patching import path_patching
from tests.toolkit_helpers import induction_setup, load_toy


def _act_patch_z(model, task, prompts, corrupted, heads):
    from attncomm.analyses.activation_patching import Cell

    cells = [Cell(layer, head, None) for layer, head in heads]
    return patched_metrics(model, task, prompts, corrupted, prompts.tokens, "z", cells).mean(1)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_all_downstream_receivers_equal_activation_patching(direction: str) -> None:
    """Attention-only 2-layer toy: a layer-0 sender to every layer-1 head's q/k/v and the logits, and a
    layer-1 sender to the logits, are exactly activation patching of the sender's output."""
    model = load_toy("toy-induction")
    task, prompts, corrupted = induction_setup(model, n=3)
    H = model.arch.n_heads
    receivers = [[1, h, x] for h in range(H) for x in "qkv"] + [["logits"]]
    l0 = [[0, h] for h in range(H)]
    df = path_patching(model, task, prompts, corrupted, receivers, senders=l0, direction=direction)
    base, source = (corrupted, prompts.tokens) if direction == "denoising" else (prompts.tokens, corrupted)
    from attncomm.analyses.activation_patching import Cell

    act = patched_metrics(model, task, prompts, base, source, "z", [Cell(0, h) for h in range(H)]).mean(1)
    torch.testing.assert_close(torch.tensor(df["value"].to_numpy()), act, rtol=0, atol=1e-9)
    l1 = [[1, h] for h in range(H)]
    df1 = path_patching(model, task, prompts, corrupted, [["logits"]], senders=l1, direction=direction)
    act1 = patched_metrics(model, task, prompts, base, source, "z", [Cell(1, h) for h in range(H)]).mean(1)
    torch.testing.assert_close(torch.tensor(df1["value"].to_numpy()), act1, rtol=0, atol=1e-9)
    assert (act - act.mean()).abs().max() > 1e-3 or (act1 - act1.mean()).abs().max() > 1e-3


def test_known_by_construction() -> None:
    """A hand-built variant of the 2-layer attention-only toy whose head L1H1 writes nothing (its rows of
    W_O zeroed): every path into L1H1 has no effect, and a layer-0 sender's paths through L1H0 and the
    logits carry its whole effect (= activation patching of the sender)."""
    from attncomm.models.adapter import load_model
    from attncomm.runtime.config import ModelConfig, package_path

    cfg = ModelConfig(
        name="toy-induction",
        short_name="toy-induction",
        family="gpt2",
        path=package_path("toys/toy-induction"),
    )
    model = load_model(cfg, dtype=torch.float64)  # a private copy: its weights are edited
    dh = model.arch.d_head
    with torch.no_grad():
        model.bridge.blocks[1].attn.o._original_component.weight[dh : 2 * dh, :] = 0
    task, prompts, corrupted = induction_setup(model, n=3)
    from attncomm.analyses.activation_patching import Cell

    dead = patched_metrics(model, task, prompts, corrupted, prompts.tokens, "z", [Cell(1, 1)]).mean(1)
    into_dead = path_patching(
        model, task, prompts, corrupted, [[1, 1, x] for x in "qkv"], senders=[[0, 0], [0, 1]]
    )
    corrupted_metric = into_dead["corrupted"].iloc[0]
    assert abs(float(dead[0]) - corrupted_metric) < 1e-9
    assert (into_dead["value"] - corrupted_metric).abs().max() < 1e-9
    live = path_patching(
        model, task, prompts, corrupted, [[1, 0, x] for x in "qkv"] + [["logits"]], senders=[[0, 0], [0, 1]]
    )
    act = patched_metrics(
        model, task, prompts, corrupted, prompts.tokens, "z", [Cell(0, 0), Cell(0, 1)]
    ).mean(1)
    torch.testing.assert_close(torch.tensor(live["value"].to_numpy()), act, rtol=0, atol=1e-9)
    assert (act - corrupted_metric).abs().max() > 1e-2  # the senders do matter


def test_bad_receivers() -> None:
    model = load_toy("toy-induction")
    task, prompts, corrupted = induction_setup(model, n=2)
    for bad, match in [
        ([[9, 0, "q"]], "valid layers are 0..1"),
        ([[0, 0, "x"]], "malformed receiver"),
        ([[0, 5, "q"]], "valid heads are 0..1"),
    ]:
        with pytest.raises(AnalysisInputError, match=match):
            path_patching(model, task, prompts, corrupted, bad)
