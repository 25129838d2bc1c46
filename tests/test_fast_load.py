"""Loading reads the tokenizer once: the bridge gets a BOS twin of attncomm's tokenizer, not a reload.

The twin must be what TransformerLens would have loaded itself (``from_pretrained(..., add_bos_token=
True)``): same backend, same ``init_kwargs``, same encodings; attncomm's own tokenizer still adds no BOS.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from attncomm.models.adapter import _with_bos, load_model
from attncomm.models.gpt2_tokenizer import gpt2_tokenizer
from tests.models_fixtures import load_tiny, test_cache_dir, tiny_model_config

TEXTS = ["When Mary and John went to the store,", " John gave a drink to<|endoftext|> Mary"]


def test_bos_twin_equals_a_reload_with_add_bos_token(tmp_path) -> None:
    gpt2_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    twin = _with_bos(tok)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), add_bos_token=True)
    assert twin is not tok
    assert twin(TEXTS)["input_ids"] == reloaded(TEXTS)["input_ids"]
    assert twin(TEXTS)["input_ids"][0][0] == tok.bos_token_id
    assert tok(TEXTS)["input_ids"] == gpt2_tokenizer()(TEXTS)["input_ids"]  # the original is untouched
    assert twin.init_kwargs == reloaded.init_kwargs
    assert twin.backend_tokenizer.to_str() == reloaded.backend_tokenizer.to_str()
    twin.pad_token = twin.eos_token  # what the bridge does to its tokenizer
    assert tok.pad_token is None
    assert _with_bos(twin) is twin  # already prepends BOS: kept as it is


@pytest.mark.parametrize("builder", ["tiny-gpt2", "tiny-pythia"])
def test_load_reads_the_tokenizer_once(builder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    original = AutoTokenizer.from_pretrained.__func__  # type: ignore[attr-defined]

    def counting(cls, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append((args, kwargs))
        return original(cls, *args, **kwargs)

    load_tiny(builder)  # the model dir exists afterwards (the process-wide adapter: usually no load)
    calls.clear()
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counting))
    model = load_model(tiny_model_config(builder), cache_dir=test_cache_dir())
    assert len(calls) == 1, calls
    tokens = model.to_tokens(TEXTS[0], prepend_bos=True)
    assert int(tokens[0, 0]) == model.tokenizer.bos_token_id
    plain = model.tokenizer(TEXTS[0], add_special_tokens=True)["input_ids"]
    assert tokens[0, 1:].tolist() == plain and plain[0] != model.tokenizer.bos_token_id or len(plain) == 0
    assert torch.equal(model.to_tokens(TEXTS[0], prepend_bos=False)[0], torch.tensor(plain))


def test_stage_catalog_is_what_importing_registers() -> None:
    """The declarations read from source equal the registered stages (names, modules, descriptions,
    inputs, outputs), so starting a job can skip importing the other stage modules."""
    from attncomm.runtime import registry

    catalog = registry.stage_catalog()
    registered = registry.load_stages()
    assert list(catalog) and set(catalog) == set(registered)
    for name, entry in catalog.items():
        spec = registered[name]
        assert entry.module == spec.run.__module__, name
        assert (entry.description, entry.consumes, entry.produces) == (
            spec.description,
            spec.consumes,
            spec.produces,
        ), name
    by_registration: dict[str, str] = {}
    for spec in registered.values():
        for kind in spec.produces:
            if kind not in spec.consumes:
                by_registration.setdefault(kind, spec.name)
    assert registry.producers() == by_registration


def test_starting_a_trace_job_imports_no_other_stage_module() -> None:
    """``run.py stage=trace`` composes the config and finds its stage without importing the plotting
    and clustering stages (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from attncomm.runtime.config import register_configs\n"
        "from attncomm.runtime.registry import get_stage, producers\n"
        "register_configs(); producers(); get_stage('trace')\n"
        "print(sorted(m for m in sys.modules if m.startswith('attncomm.stages.')))\n"
        "print('matplotlib' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    modules, mpl = out.stdout.strip().splitlines()[-2:]
    assert modules == "['attncomm.stages.trace']" and mpl == "False", out.stdout
