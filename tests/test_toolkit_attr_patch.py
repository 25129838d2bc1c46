"""Attribution patching: exact where the metric is linear in the activation, close on toy-ioi heads."""

from __future__ import annotations

import torch

from attncomm.analyses.attribution_patching import (
    attribution_patching,
    compare_with_activation_patching,
    correlations,
)
from tests.toolkit_helpers import induction_setup, ioi_setup, load_toy


def test_exact_when_the_metric_is_linear() -> None:
    """Last-layer head outputs with the final norm's scale frozen at the base run's: the metric is affine in
    them, so the first-order estimate is exact, per head and position and summed."""
    model = load_toy("toy-induction")
    task, prompts, corrupted = induction_setup(model, n=3)
    n = len(prompts)
    _, cache = model.run_with_cache(corrupted, ["ln_final.hook_scale"])
    frozen = cache["ln_final.hook_scale"]

    def freeze(act, hook):
        return frozen.repeat(act.shape[0] // n, 1, 1).to(act.dtype)

    extra = [("ln_final.hook_scale", freeze)]
    attr = attribution_patching(model, task, prompts, corrupted, kinds=["z"], extra_hooks=extra)
    attr = attr[attr.layer == 1]
    both = compare_with_activation_patching(model, task, prompts, corrupted, attr, extra_hooks=extra)
    assert both["act_value"].abs().max() > 1e-2
    torch.testing.assert_close(
        torch.tensor(both["value"].to_numpy()), torch.tensor(both["act_value"].to_numpy()), rtol=0, atol=1e-9
    )


def test_correlates_with_activation_patching_on_toy_ioi() -> None:
    model = load_toy("toy-ioi")
    task, prompts, corrupted = ioi_setup(model, n=8, mode="abc")
    attr = attribution_patching(model, task, prompts, corrupted, kinds=["z"])
    both = compare_with_activation_patching(model, task, prompts, corrupted, attr)
    corr = correlations(both).set_index("grid")
    assert corr.loc["layer_head", "n_cells"] == 12 and corr.loc["layer_head_pos", "n_cells"] == 12 * 20
    assert (corr["pearson"] > 0.9).all(), corr
