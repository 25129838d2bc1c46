"""Direct logit attribution and the logit lens: exact decompositions of the task metric."""

from __future__ import annotations

import pytest
import torch

from attncomm.analyses.logit_attribution import direct_logit_attribution, logit_lens
from attncomm.tasks import get_task
from tests.models_fixtures import load_tiny
from tests.toolkit_helpers import induction_setup, ioi_setup, load_toy


def _setups():
    return {
        "toy-ioi": lambda: (load_toy("toy-ioi"), *ioi_setup(load_toy("toy-ioi"))[:2]),
        "toy-induction": lambda: (load_toy("toy-induction"), *induction_setup(load_toy("toy-induction"))[:2]),
        "tiny-gpt2": lambda: _tiny("tiny-gpt2"),
        "tiny-pythia": lambda: _tiny("tiny-pythia"),
    }


def _tiny(name: str):
    model = load_tiny(name, torch.float64)
    task = get_task("ioi")
    return model, task, task.make_prompts(model.tokenizer, 3, seed=0)


@pytest.mark.parametrize("name", ["toy-ioi", "toy-induction", "tiny-gpt2", "tiny-pythia"])
def test_dla_components_sum_to_metric(name: str) -> None:
    model, task, prompts = _setups()[name]()
    df = direct_logit_attribution(model, task, prompts)
    metric = torch.tensor(df[df.kind == "metric"].sort_values("prompt")["value"].to_numpy())
    parts = df[df.kind.isin(["embed", "pos_embed", "attn", "mlp", "unembed_bias"])]
    total = torch.tensor(parts.groupby("prompt")["value"].sum().sort_index().to_numpy())
    assert metric.abs().max() > 1e-3  # a real metric, not all zeros
    torch.testing.assert_close(total, metric, rtol=0, atol=1e-9)
    # heads plus the output bias make up each layer's attention output
    attn = df[df.kind == "attn"].groupby(["prompt", "layer"])["value"].sum()
    heads = df[df.kind.isin(["head", "attn_bias"])].groupby(["prompt", "layer"])["value"].sum()
    torch.testing.assert_close(
        torch.tensor(heads.to_numpy()), torch.tensor(attn.to_numpy()), rtol=0, atol=1e-9
    )
    assert (df.kind == "head").sum() == len(prompts) * model.arch.n_layers * model.arch.n_heads


@pytest.mark.parametrize("name", ["toy-ioi", "tiny-pythia"])
def test_logit_lens_last_entry_is_the_metric(name: str) -> None:
    model, task, prompts = _setups()[name]()
    df = logit_lens(model, task, prompts)
    logits = model.run_with_hooks(prompts.tokens, [])
    metric = task.metric(logits, prompts)
    last = df[df.step == df.step.max()].sort_values("prompt")
    assert last["label"].iloc[0] == "final_post"
    torch.testing.assert_close(torch.tensor(last["value"].to_numpy()), metric, rtol=0, atol=1e-9)
    first = df[df.step == 0]
    assert not torch.allclose(torch.tensor(first["value"].to_numpy()), metric)  # the lens does move
    mids = df[df.kind == "mid"]
    assert len(mids) == (0 if model.arch.parallel_attn else len(prompts) * model.arch.n_layers)
