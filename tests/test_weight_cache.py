"""The processed-weight cache (models/weight_cache.py): served on a warm load, rebuilt on any key change.

A copy of the tiny GPT-2 checkpoint is loaded through the real ``load_model`` path with
``model.path`` pointing at the copy and a private cache directory. TransformerLens's
``ProcessWeights.process_weights`` is wrapped by a counter, so "processed again" and "served from the
cache" are observed directly.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import attncomm.models.weight_cache as wc
from attncomm.models.adapter import load_model
from attncomm.models.random_models import build_model_dir
from attncomm.runtime.config import ModelConfig
from tests.models_fixtures import test_cache_dir


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from transformer_lens.weight_processing import ProcessWeights

    ckpt = tmp_path / "ckpt"
    shutil.copytree(build_model_dir("tiny-gpt2", test_cache_dir()), ckpt)
    calls: list[int] = []
    real = ProcessWeights.process_weights

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ProcessWeights, "process_weights", staticmethod(counting))
    cfg = ModelConfig(name="ckpt", short_name="ckpt", family="gpt2", path=str(ckpt), tokenizer="gpt2-offline")
    return {"ckpt": ckpt, "cache": tmp_path / "cache", "cfg": cfg, "calls": calls}


def _load(s: dict, dtype: torch.dtype = torch.float32, cfg: ModelConfig | None = None):
    return load_model(cfg or s["cfg"], dtype=dtype, cache_dir=s["cache"])


def _files(s: dict) -> list[Path]:
    return sorted((s["cache"] / "weights").glob("*.safetensors"))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.bridge.state_dict().items()}


TOKENS = torch.tensor([[50256, 464, 3290, 373, 257, 922, 1110, 13]])


@pytest.mark.slow
def test_warm_load_is_served_from_the_cache_and_identical(setup: dict) -> None:
    cold = _load(setup)
    assert len(setup["calls"]) == 1 and len(_files(setup)) == 1
    warm = _load(setup)
    assert len(setup["calls"]) == 1, "the warm load processed the weights again"
    a, b = _state(cold), _state(warm)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for field in ("W_Q", "W_K", "W_O", "b_O", "W_U", "W_E"):
        assert torch.equal(getattr(cold.weights, field), getattr(warm.weights, field)), field
    names = [cold.ln1_scale(1), cold.pattern(2)]
    logits_c, cache_c = cold.run_with_cache(TOKENS, names)
    logits_w, cache_w = warm.run_with_cache(TOKENS, names)
    assert torch.equal(logits_c, logits_w)
    assert all(torch.equal(cache_c[n], cache_w[n]) for n in names)


@pytest.mark.slow
def test_changed_checkpoint_is_processed_again(setup: dict) -> None:
    first = _load(setup)
    weights = setup["ckpt"] / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("attn.c_attn.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    second = _load(setup)
    assert len(setup["calls"]) == 2 and len(_files(setup)) == 2
    assert not torch.equal(first.weights.W_Q, second.weights.W_Q)
    _load(setup)  # the new checkpoint is now cached
    assert len(setup["calls"]) == 2


@pytest.mark.slow
def test_dtype_and_versions_are_part_of_the_key(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _load(setup)
    model64 = _load(setup, torch.float64)
    assert len(setup["calls"]) == 2 and model64.weights.W_Q.dtype == torch.float64
    _load(setup, torch.float64)
    assert len(setup["calls"]) == 2
    real = wc.versions()
    for pkg in ("transformer_lens", "attncomm"):
        monkeypatch.setattr(wc, "versions", lambda pkg=pkg: {**real, pkg: real[pkg] + ".post1"})
        before = len(setup["calls"])
        _load(setup)
        assert len(setup["calls"]) == before + 1, f"a new {pkg} version did not rebuild the cache"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-key"])
def test_corrupt_cache_file_is_rebuilt_with_one_warning(
    setup: dict, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = _state(_load(setup))
    (path,) = _files(setup)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 100)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # a structurally valid file written for another key: must not be used either
        tensors = load_file(path)
        tensors = {k: torch.zeros_like(v) for k, v in tensors.items()}
        save_file(tensors, path, metadata={"key": "{}", "input_signature": "x", "names": "[]"})
    with caplog.at_level(logging.WARNING, logger="attncomm.models.weight_cache"):
        rebuilt = _load(setup)
    warnings = [
        r for r in caplog.records if r.name == "attncomm.models.weight_cache" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert len(setup["calls"]) == 2, "the damaged file was used instead of processing again"
    after = _state(rebuilt)
    assert all(torch.equal(good[k], after[k]) for k in good)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attncomm.models.weight_cache"):
        _load(setup)  # the rebuilt file is valid again
    assert len(setup["calls"]) == 2 and not caplog.records


@pytest.mark.slow
def test_switch_off_processes_every_time(setup: dict) -> None:
    cfg = ModelConfig(**{**setup["cfg"].__dict__, "weight_cache": False})
    _load(setup, cfg=cfg)
    _load(setup, cfg=cfg)
    assert len(setup["calls"]) == 2 and not _files(setup)


def test_checkpoint_hash_changes_with_content(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"a" * 100)
    memo = tmp_path / "memo"
    h1 = wc.checkpoint_hash(ckpt, memo)
    assert wc.checkpoint_hash(ckpt, memo) == h1 == wc.checkpoint_hash(ckpt, None)
    weights = ckpt / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"b" * 100)  # same size, new content (and a surely different mtime)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert wc.checkpoint_hash(ckpt, memo) != h1
