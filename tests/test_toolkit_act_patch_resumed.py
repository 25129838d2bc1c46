"""Head-output patching on the resumed path (plain forward from the cached base run) against the
one-hook-per-cell reference, and the fall-back to the hook path where the resumed path is not exact."""

from __future__ import annotations

import pytest
import torch

from attncomm.analyses import resumable_forward as rf
from attncomm.analyses.activation_patching import (
    Cell,
    grid_cells,
    hooked_metrics,
    patched_metrics,
    resumed_weights,
)
from attncomm.tasks import get_task
from attncomm.tasks.induction import InductionTask
from tests.models_fixtures import load_tiny
from tests.test_toolkit_act_patch import _loop
from tests.toolkit_helpers import induction_setup, load_toy


def test_resumed_z_equals_one_hook_per_cell_loop() -> None:
    """Every grid of head outputs (by position, all positions, all heads) on the resumed path."""
    model = load_toy("toy-induction")
    task, prompts, corrupted = induction_setup(model, n=3)
    w, why = resumed_weights(model, task, prompts, corrupted, prompts.tokens)
    assert w is not None, why
    n_pos = prompts.tokens.shape[1]
    cells = grid_cells(model, "z", n_pos, "layer_head_pos")[::2] + grid_cells(model, "z", n_pos, "layer_head")
    cells += [Cell(0, None, 5), Cell(1, None, None)]
    for base, source in ((corrupted, prompts.tokens), (prompts.tokens, corrupted)):
        resumed = patched_metrics(model, task, prompts, base, source, "z", cells, max_batch=8)
        loop = _loop(model, task, prompts, base, source, "z", cells)
        assert (loop - loop[0]).abs().max() > 1e-3  # the cells differ
        torch.testing.assert_close(resumed, loop, rtol=0, atol=1e-9)


def test_resumed_z_with_prompts_of_different_ends() -> None:
    """IOI prompts of several lengths (right padded): cells after a prompt's ``end`` leave it unchanged."""
    model = load_tiny("tiny-gpt2", torch.float64)
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 4, seed=3)
    corrupted = prompts.require_corrupted("test")
    assert prompts.end.unique().numel() > 1
    w, why = resumed_weights(model, task, prompts, corrupted, prompts.tokens)
    assert w is not None, why
    cells = grid_cells(model, "z", prompts.tokens.shape[1], "layer_head_pos")[::4]
    resumed = patched_metrics(model, task, prompts, corrupted, prompts.tokens, "z", cells, max_batch=16)
    hooked = hooked_metrics(model, task, prompts, corrupted, prompts.tokens, "z", cells)
    assert (hooked - hooked[0]).abs().max() > 1e-6
    torch.testing.assert_close(resumed, hooked, rtol=0, atol=1e-9)


def test_plain_forward_resumes_where_the_full_run_is() -> None:
    model = load_tiny("tiny-gpt2", torch.float64)
    w = rf.stack_weights(model)
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = rf.forward_cache(w, tokens)
    torch.testing.assert_close(
        rf.unembed(w, cache.resid[-1]), model.run_with_hooks(tokens, []), rtol=0, atol=1e-9
    )
    # runs entering at layers 1 and 2 (and after the last block), from position 4, rows swapped
    rows, at = torch.tensor([1, 0]), torch.tensor([4, 1])
    entries = [(start, cache.resid[start][rows, 4:], rows, at) for start in (1, 2, w.n_layers)]
    resumed = rf.resume(w, cache, 4, entries)
    expected = cache.resid[-1][rows, 4 + at].repeat(3, 1)
    torch.testing.assert_close(resumed, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("tiny-pythia", "parallel attention"), ("tiny-gemma2", "RMS"), ("tiny-llama", "grouped keys/values")],
)
def test_other_families_take_the_hook_path(name: str, reason: str) -> None:
    model = load_tiny(name, torch.float64)
    assert reason in (rf.unsupported_reason(model) or "")
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 2, seed=0)
    corrupted = prompts.require_corrupted("test")
    w, why = resumed_weights(model, task, prompts, corrupted, prompts.tokens)
    assert w is None and reason in why
    with pytest.raises(ValueError, match="not covered"):
        rf.stack_weights(model)


class _FirstPositionTask(InductionTask):
    """A metric that reads the logits at position 0 as well as at ``end``."""

    def metric(self, logits, prompts):  # type: ignore[no-untyped-def]
        return super().metric(logits, prompts) + logits[:, 0, 0]


def test_metric_reading_other_positions_takes_the_hook_path() -> None:
    model = load_toy("toy-induction")
    _, prompts, corrupted = induction_setup(model, n=2)
    task = _FirstPositionTask(seq_len=8)
    w, why = resumed_weights(model, task, prompts, corrupted, prompts.tokens)
    assert w is None and "outside `end`" in why
    cells = grid_cells(model, "z", prompts.tokens.shape[1], "layer_head_pos")[::5]
    torch.testing.assert_close(
        patched_metrics(model, task, prompts, corrupted, prompts.tokens, "z", cells),
        _loop(model, task, prompts, corrupted, prompts.tokens, "z", cells),
        rtol=0,
        atol=1e-9,
    )
