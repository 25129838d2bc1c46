"""A 512-token prompt traces in bounded memory: chunked firings, no tensor quadratic in T per firing.

A tiny random GPT-2 with 640 positions (built here, saved with ``save_pretrained`` and loaded through
``load_model``) traces induction prompts of 511 tokens. Every large intermediate tensor of
:mod:`attncomm.core.contributions` is reported through ``ALLOCATION_PROBES``; the test asserts that

* each per-firing-batch tensor stays within the memory budget and is linear in ``T`` per firing
  (at most ``chunk x layers x (heads + 3) x T`` entries), far below what one residual vector per
  (firing, source position) would need (``firings x T x d_model`` for the projection alone);
* the only quadratic tensor (the pattern prefix sums) has the per-prompt size ``layers x heads x T^2``,
  whatever the number of firings;
* chunking does not change the results: the same prompt traced with no budget gives the same graph
  and per-firing results.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from attncomm.core import contributions
from attncomm.core.prompt_graph import firing_bytes
from attncomm.methods.acc_tracing import trace_prompts
from attncomm.models.adapter import ModelAdapter, load_model
from attncomm.models.gpt2_tokenizer import save_gpt2_tokenizer
from attncomm.models.random_models import GPT2_EOT, GPT2_VOCAB
from attncomm.runtime.config import ModelConfig
from attncomm.tasks import get_task

N_POS = 640
SEQ_LEN = 255  # BOS + 2 x 255 = 511 tokens
BUDGET_GB = 0.002


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> ModelAdapter:
    root = tmp_path_factory.mktemp("long")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(
        n_layer=3,
        n_embd=64,
        n_head=4,
        n_positions=N_POS,
        vocab_size=GPT2_VOCAB,
        initializer_range=0.8 / 64**0.5,
        bos_token_id=GPT2_EOT,
        eos_token_id=GPT2_EOT,
        pad_token_id=GPT2_EOT,
    )
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for block in hf.transformer.h:
            block.attn.c_attn.weight[:, :64].mul_(3.0)  # sharper attention: fewer, clearer firings
    hf.save_pretrained(root / "model")
    save_gpt2_tokenizer(str(root / "model"))
    mc = ModelConfig(
        name="long", short_name="long", family="gpt2", path=str(root / "model"), tokenizer="gpt2-offline"
    )
    return load_model(mc, cache_dir=root / "cache")


def _trace(model: ModelAdapter, max_memory_gb: float | None, probe=None):
    task = get_task("induction", seq_len=SEQ_LEN)
    prompts = task.make_prompts(model.tokenizer, 4, seed=0, prepend_bos=True)
    if probe is not None:
        contributions.ALLOCATION_PROBES.append(probe)
    try:
        return list(
            trace_prompts(
                model,
                task,
                prompts,
                skip_incorrect=False,
                progress=False,
                batch_size=1,
                max_memory_gb=max_memory_gb,
            )
        ), int(prompts.lengths.max())
    finally:
        if probe is not None:
            contributions.ALLOCATION_PROBES.remove(probe)


def test_long_prompt_memory_is_bounded_and_chunking_changes_nothing(long_model: ModelAdapter) -> None:
    a = long_model.arch
    seen: list[tuple[str, tuple[int, ...]]] = []
    traces, T = _trace(long_model, BUDGET_GB, lambda name, shape: seen.append((name, shape)))
    assert T == 2 * SEQ_LEN + 1
    traced = [t for t in traces if t.graph is not None]
    assert traced, "no 511-token prompt was traced; pick another seed"
    firings = max(t.n_firings for t in traced)
    assert firings > 0 and seen

    itemsize = 4
    budget = BUDGET_GB * 2**30
    # the largest chunk any layer may use (layer 1 has the fewest upstream layers per firing)
    chunk = max(1, int(budget // firing_bytes(1, a.n_heads, T, a.d_head, False, itemsize)))
    n_chunks = sum(n == "out" for n, _ in seen) // 2  # two sides per chunk
    assert n_chunks > a.n_layers - 1, "the budget should force several chunks per layer in this test"
    batch = [(n, s) for n, s in seen if n != "prefix"]
    assert batch
    largest = max(int(torch.tensor(s).prod()) for _, s in batch)
    # linear in T per firing, within the budget ...
    assert largest <= chunk * a.n_layers * (a.n_heads + 3) * T
    assert largest * itemsize <= budget
    # ... and far below a residual vector per (firing, source position)
    assert largest < firings * T * a.d_model / 8
    for name, shape in batch:
        assert shape[0] <= chunk, (name, shape)
    # the one quadratic tensor is per prompt and layer, not per firing
    prefix = [s for n, s in seen if n == "prefix"]
    assert prefix and all(s[0] < a.n_layers and s[1] == a.n_heads and s[2] == s[3] <= T for s in prefix)

    unchunked, _ = _trace(long_model, None)
    for chunked_t, plain_t in zip(traces, unchunked, strict=True):
        assert chunked_t.skip_reason == plain_t.skip_reason
        assert chunked_t.results.keys() == plain_t.results.keys()
        for key, r in chunked_t.results.items():
            p = plain_t.results[key]
            assert torch.equal(r.dest_terms, p.dest_terms) and torch.equal(r.src_terms, p.src_terms)
            torch.testing.assert_close(r.contrib_dest, p.contrib_dest, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(r.contrib_src, p.contrib_src, rtol=1e-4, atol=1e-6)
        if chunked_t.graph is not None:
            assert set(chunked_t.graph.edges()) == set(plain_t.graph.edges())
