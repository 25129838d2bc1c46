"""The toolkit on tiny random models of each family (GPT-2, NeoX parallel attention, Gemma-2 with
grouped-query attention, rotary positions, post-norms and softcaps)."""

from __future__ import annotations

import pytest
import torch

from attncomm.analyses.activation_patching import Cell, base_metrics, patched_metrics
from attncomm.analyses.attribution_patching import attribution_patching
from attncomm.analyses.head_detection import head_scores
from attncomm.analyses.path_patching import path_patching
from attncomm.analyses.qk_ov_circuits import qk_ov_tables
from attncomm.tasks import get_task
from tests.models_fixtures import load_tiny


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-pythia", "tiny-gemma2"])
def test_patching_identities_on_every_family(name: str) -> None:
    model = load_tiny(name, torch.float64)
    task = get_task("ioi")
    prompts = task.make_prompts(model.tokenizer, 2, seed=0)
    corrupted = prompts.require_corrupted("test")
    clean_m, corr_m = base_metrics(model, task, prompts, prompts.tokens, corrupted)
    everything = patched_metrics(model, task, prompts, corrupted, prompts.tokens, "resid_pre", [Cell(0)])[0]
    torch.testing.assert_close(everything, clean_m, rtol=0, atol=1e-9)
    # last-layer senders to the logits are exactly activation patching of their outputs
    last = model.arch.n_layers - 1
    senders = [[last, h] for h in range(model.arch.n_heads)]
    pp = path_patching(model, task, prompts, corrupted, [["logits"]], senders=senders)
    cells = [Cell(last, h) for h in range(model.arch.n_heads)]
    act = patched_metrics(model, task, prompts, corrupted, prompts.tokens, "z", cells).mean(1)
    torch.testing.assert_close(torch.tensor(pp["value"].to_numpy()), act, rtol=0, atol=1e-9)
    # receivers of every kind (k/v heads are key/value heads for grouped-query models)
    kv = model.arch.n_kv_heads - 1
    recv = [[last, model.arch.n_heads - 1, "q"], [last, kv, "k"], [last, kv, "v"], ["logits"]]
    assert len(path_patching(model, task, prompts, corrupted, recv, senders=[[0, 0]])) == 1
    attr = attribution_patching(model, task, prompts, corrupted, kinds=["z", "k", "mlp_out"])
    n_k = attr[(attr.kind == "k") & (attr.grid == "layer_head")]
    assert len(n_k) == model.arch.n_layers * model.arch.n_kv_heads
    assert attr["value"].abs().max() > 0
    scores = head_scores(model, prompts, seq_len=5, n_sequences=2)
    assert len(scores) == 4 * model.arch.n_layers * model.arch.n_heads
    tables = qk_ov_tables(model, [[0, 0]], [int(prompts.correct[0])], top_k=3)
    assert len(tables["top_k"]) == 6
    assert tables["positional"].empty == model.arch.rotary
