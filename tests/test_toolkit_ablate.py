"""Head ablation: zero ablation removes the heads' direct attribution; the effect matches a hand hook."""

from __future__ import annotations

import pytest

from attncomm.analyses.ablation import ablate_heads
from attncomm.analyses.common import AnalysisInputError
from tests.toolkit_helpers import induction_setup, load_toy


def test_zero_ablation_of_the_induction_heads() -> None:
    model = load_toy("toy-induction")
    task, prompts, corrupted = induction_setup(model, n=4)
    df = ablate_heads(model, task, prompts, [[1, 0], [1, 1]], method="zero")
    after = df[(df.condition == "after") & (df.kind == "head") & (df.layer == 1)]
    assert after["value"].abs().max() < 1e-12  # a zeroed head writes nothing
    metric = df[df.kind == "metric"].groupby("condition")["value"].mean()
    assert metric["after"] < metric["before"] - 1.0  # induction needs the induction heads

    def hook(z, hook):
        z = z.clone()
        z[:, :, :] = 0
        return z

    logits = model.run_with_hooks(prompts.tokens, [("blocks.1.attn.hook_z", hook)])
    by_hand = task.metric(logits, prompts).mean()
    assert abs(float(by_hand) - metric["after"]) < 1e-9


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_mean_and_resample(method: str) -> None:
    model = load_toy("toy-induction")
    task, prompts, corrupted = induction_setup(model, n=4)
    df = ablate_heads(model, task, prompts, [[0, 0]], method=method, corrupted=corrupted, positions=[3, 4])
    metric = df[df.kind == "metric"].groupby("condition")["value"].mean()
    assert metric["after"] != pytest.approx(metric["before"])
    with pytest.raises(AnalysisInputError, match="valid positions are 0..15"):
        ablate_heads(model, task, prompts, [[0, 0]], positions=[99])
    with pytest.raises(AnalysisInputError, match="valid heads are 0..1"):
        ablate_heads(model, task, prompts, [[0, 7]])
