"""Activation patching: limits (nothing / everything patched) and the batched implementation against a
plain one-forward-per-cell loop."""

from __future__ import annotations

import pytest
import torch

from attncomm.analyses.activation_patching import (
    KINDS,
    Cell,
    activation_patching,
    base_metrics,
    grid_cells,
    hook_name,
    patched_metrics,
)
from attncomm.analyses.common import AnalysisInputError
from tests.models_fixtures import load_tiny
from tests.toolkit_helpers import induction_setup, ioi_setup, load_toy


def test_patch_all_or_nothing_gives_the_other_or_own_run() -> None:
    model = load_toy("toy-ioi")
    task, prompts, corrupted = ioi_setup(model)
    clean_m, corr_m = base_metrics(model, task, prompts, prompts.tokens, corrupted)
    assert (clean_m - corr_m).abs().min() > 0.1
    everything = [Cell(0, None, None)]
    den = patched_metrics(model, task, prompts, corrupted, prompts.tokens, "resid_pre", everything)[0]
    noi = patched_metrics(model, task, prompts, prompts.tokens, corrupted, "resid_pre", everything)[0]
    torch.testing.assert_close(den, clean_m, rtol=0, atol=1e-9)
    torch.testing.assert_close(noi, corr_m, rtol=0, atol=1e-9)
    # patching a position with identical tokens in both runs changes nothing (position 0 is never S2)
    nothing = patched_metrics(
        model, task, prompts, corrupted, prompts.tokens, "resid_pre", [Cell(0, None, 0)]
    )[0]
    torch.testing.assert_close(nothing, corr_m, rtol=0, atol=1e-9)


def _loop(model, task, prompts, base, source, kind, cells):
    """One forward per cell, one hook, straightforward indexing: the reference."""
    out = []
    for cell in cells:
        name = hook_name(kind, cell.layer)
        _, cache = model.run_with_cache(source, [name])
        src = cache[name]

        def hook(act, hook, cell=cell, src=src):
            act = act.clone()
            h = slice(None) if cell.head is None else cell.head
            p = slice(None) if cell.pos is None else cell.pos
            if KINDS[kind][1] == "bhqk":
                act[:, h, p] = src[:, h, p]
            elif KINDS[kind][1] == "bphd":
                act[:, p, h] = src[:, p, h]
            else:
                act[:, p] = src[:, p]
            return act

        out.append(task.metric(model.run_with_hooks(base, [(name, hook)]), prompts))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("kind", "axes"),
    [
        ("resid_pre", "layer_pos"),
        ("z", "layer_head_pos"),
        ("k", "layer_head"),
        ("pattern", "layer_head_pos"),
        ("attn_out", "layer_pos"),
    ],
)
def test_batched_equals_loop(kind: str, axes: str) -> None:
    model = load_toy("toy-induction")
    task, prompts, corrupted = induction_setup(model, n=3)
    cells = grid_cells(model, kind, prompts.tokens.shape[1], axes)[::3]
    batched = patched_metrics(model, task, prompts, corrupted, prompts.tokens, kind, cells, max_batch=16)
    loop = _loop(model, task, prompts, corrupted, prompts.tokens, kind, cells)
    assert (loop - loop[0]).abs().max() > 1e-3  # the cells differ
    torch.testing.assert_close(batched, loop, rtol=0, atol=1e-9)


def test_gqa_key_value_heads_are_patchable() -> None:
    """Grouped-query keys/values: one cell per key/value head, equal to the plain loop."""
    model = load_tiny("tiny-gemma2", torch.float64)
    assert model.arch.n_kv_heads < model.arch.n_heads
    from attncomm.tasks import get_task

    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 2, seed=0)
    corrupted = prompts.tokens.flip(0)
    cells = grid_cells(model, "v", prompts.tokens.shape[1], "layer_head")
    assert len(cells) == model.arch.n_layers * model.arch.n_kv_heads
    batched = patched_metrics(model, task, prompts, corrupted, prompts.tokens, "v", cells)
    torch.testing.assert_close(
        batched, _loop(model, task, prompts, corrupted, prompts.tokens, "v", cells), rtol=0, atol=1e-9
    )


def test_table_and_bad_inputs() -> None:
    model = load_toy("toy-induction")
    task, prompts, corrupted = induction_setup(model, n=2)
    df = activation_patching(
        model, task, prompts, corrupted, kinds=["resid_pre", "z"], directions=["denoising", "noising"]
    )
    assert set(df["grid"]) == {"layer_pos", "layer_head", "layer_head_pos"}
    last = df[(df.kind == "resid_pre") & (df.layer == 0) & (df.direction == "noising")]
    assert len(last) == prompts.tokens.shape[1] and last.token.str.len().min() > 0
    with pytest.raises(AnalysisInputError, match="corrupted"):
        activation_patching(model, task, prompts, None)
    with pytest.raises(AnalysisInputError, match="valid kinds"):
        activation_patching(model, task, prompts, corrupted, kinds=["nope"])
