"""Tracing's fast start (models/plain_model.py): a plain GPT-2 forward equal bit for bit to the bridge's,
served warm from its own cache file without transformers or TransformerLens, and rebuilt on any change.

The reference is always the TransformerLens bridge (``load_model``) run in the same test; the plain
model is loaded through the real ``load_tracing_model`` path from a copy of a tiny checkpoint and a
private cache directory.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attncomm.models.plain_model as pm
import attncomm.models.weight_cache as wc
from attncomm.methods.acc_tracing import needed_hooks, trace_prompts
from attncomm.models.adapter import ModelAdapter, load_model
from attncomm.models.random_models import build_model_dir
from attncomm.runtime.config import ModelConfig
from attncomm.tasks import get_task
from tests.models_fixtures import load_tiny, test_cache_dir, tiny_model_config


def _ckpt(tmp_path: Path, builder: str = "tiny-gpt2") -> ModelConfig:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(build_model_dir(builder, test_cache_dir()), ckpt)
    return ModelConfig(name="ckpt", short_name="ckpt", family="gpt2", path=str(ckpt))


def _plain_files(cache: Path) -> list[Path]:
    return sorted((cache / "weights").glob("*.plain.safetensors"))


def _all_hooks(n_layers: int) -> list[str]:
    per_layer = (
        "hook_resid_pre",
        "ln1.hook_normalized",
        "ln1.hook_scale",
        "attn.hook_q",
        "attn.hook_k",
        "attn.hook_v",
        "attn.hook_pattern",
        "attn.hook_z",
        "hook_attn_out",
        "hook_resid_mid",
        "hook_mlp_out",
        "hook_resid_post",
    )
    return [f"blocks.{layer}.{n}" for layer in range(n_layers) for n in per_layer] + ["ln_final.hook_scale"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_forward_equals_the_bridge_bit_for_bit(dtype: torch.dtype) -> None:
    """Every hook the plain forward computes, and the logits, on right-padded IOI prompts (not the
    probes the loader checks) are exactly the bridge's."""
    bridge = load_tiny("tiny-gpt2", dtype)
    source = build_model_dir("tiny-gpt2", test_cache_dir())
    plain, why = pm.plain_from_adapter(bridge, source)
    assert plain is not None, why
    prompts = get_task("ioi").make_prompts(bridge.tokenizer, 6, seed=3, prepend_bos=False)
    names = _all_hooks(bridge.arch.n_layers)
    theirs_logits, theirs = bridge.run_with_cache(prompts.tokens, names)
    ours_logits, ours = plain.run_with_cache(prompts.tokens, names)
    assert sorted(ours) == sorted(names)
    for name in names:
        assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(ours_logits, theirs_logits)


def test_plain_model_refuses_hooks_it_does_not_compute() -> None:
    bridge = load_tiny("tiny-gpt2")
    plain, _ = pm.plain_from_adapter(bridge, build_model_dir("tiny-gpt2", test_cache_dir()))
    assert plain is not None
    with pytest.raises(KeyError, match="does not compute"):
        plain.run_with_cache(torch.zeros(1, 3, dtype=torch.long), ["blocks.0.attn.hook_attn_scores"])
    with pytest.raises(KeyError, match="does not compute"):
        plain.run_with_cache(
            torch.zeros(1, 3, dtype=torch.long), [f"blocks.{bridge.arch.n_layers}.hook_resid_pre"]
        )


def test_traces_with_the_plain_model_equal_the_bridges(tmp_path: Path) -> None:
    """Cold (built from the bridge) and warm (read from the cache file) plain models trace exactly as
    the bridge does: the same firings, per-firing tensors and graph edges."""
    cfg = _ckpt(tmp_path)
    cache = tmp_path / "cache"
    cold = pm.load_tracing_model(cfg, cache_dir=cache)
    warm = pm.load_tracing_model(cfg, cache_dir=cache)
    bridge = load_model(cfg, cache_dir=cache)
    assert isinstance(cold, pm.PlainModel) and isinstance(warm, pm.PlainModel)
    assert len(_plain_files(cache)) == 1
    task = get_task("ioi")
    prompts = task.make_prompts(bridge.tokenizer, 12, seed=0, prepend_bos=False)
    assert torch.equal(
        task.make_prompts(warm.tokenizer, 12, seed=0, prepend_bos=False).tokens, prompts.tokens
    )

    def run(model: object) -> list:
        return list(trace_prompts(model, task, prompts, skip_incorrect=False, progress=False))  # type: ignore[arg-type]

    reference = run(bridge)
    assert any(t.edges is not None for t in reference)
    for traces in (run(cold), run(warm)):
        assert [(t.prompt_id, t.skip_reason, t.n_firings) for t in traces] == [
            (t.prompt_id, t.skip_reason, t.n_firings) for t in reference
        ]
        for ours, theirs in zip(traces, reference, strict=True):
            assert list(ours.results) == list(theirs.results)
            for key in theirs.results:
                a, b = ours.results[key], theirs.results[key]
                for field in ("dest_terms", "src_terms", "contrib_dest", "contrib_src"):
                    assert torch.equal(getattr(a, field), getattr(b, field)), (key, field)
            if theirs.graph is not None:
                assert ours.graph is not None
                edges = list(theirs.graph.edges(keys=True, data=True))
                assert list(ours.graph.edges(keys=True, data=True)) == edges


def test_other_families_and_the_switch_go_through_the_bridge(tmp_path: Path) -> None:
    for builder in ("tiny-pythia", "tiny-gemma2", "tiny-llama"):
        model = pm.load_tracing_model(tiny_model_config(builder), cache_dir=test_cache_dir())
        assert isinstance(model, ModelAdapter), builder
    cfg = _ckpt(tmp_path)
    off = pm.load_tracing_model(
        ModelConfig(**{**cfg.__dict__, "weight_cache": False}), cache_dir=tmp_path / "cache"
    )
    assert isinstance(off, ModelAdapter)
    assert _plain_files(tmp_path / "cache") == []


def test_a_mismatching_forward_is_not_used_or_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain forward that differs from the bridge in the last bit (here: torch's fused tanh GELU for
    GPT-2's five-operation one) falls back to the bridge and writes no cache file."""
    monkeypatch.setitem(pm.ACTIVATIONS, "gelu_new", pm.ACTIVATIONS["gelu_pytorch_tanh"])
    cfg = _ckpt(tmp_path)
    with caplog.at_level(logging.INFO, logger="attncomm.models.plain_model"):
        model = pm.load_tracing_model(cfg, cache_dir=tmp_path / "cache")
    assert isinstance(model, ModelAdapter)
    assert "differ from the bridge" in caplog.text
    assert _plain_files(tmp_path / "cache") == []


def test_changed_checkpoint_dtype_or_version_gets_another_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _ckpt(tmp_path)
    cache = tmp_path / "cache"
    first = pm.load_tracing_model(cfg, cache_dir=cache)
    assert isinstance(first, pm.PlainModel) and len(_plain_files(cache)) == 1
    pm.load_tracing_model(cfg, dtype=torch.float64, cache_dir=cache)
    assert len(_plain_files(cache)) == 2
    real = wc.versions
    monkeypatch.setattr(wc, "versions", lambda: {**real(), "transformer_lens": "9.9.9"})
    pm.load_tracing_model(cfg, cache_dir=cache)
    assert len(_plain_files(cache)) == 3
    monkeypatch.setattr(wc, "versions", real)
    weights = Path(cfg.path) / "model.safetensors"  # type: ignore[arg-type]
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    name = next(k for k in state if k.endswith("mlp.c_fc.weight"))
    state[name] = state[name] * 1.5
    save_file(state, weights, metadata={"format": "pt"})
    changed = pm.load_tracing_model(cfg, cache_dir=cache)
    assert len(_plain_files(cache)) == 4
    assert isinstance(changed, pm.PlainModel)
    assert not torch.equal(changed.mlp["W_in"], first.mlp["W_in"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key"])
def test_corrupt_plain_cache_is_rebuilt_with_one_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _ckpt(tmp_path)
    cache = tmp_path / "cache"
    good = pm.load_tracing_model(cfg, cache_dir=cache)
    (path,) = _plain_files(cache)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    else:  # a valid file whose key is another checkpoint's
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata())
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta["key"] = meta["key"].replace('"checkpoint_sha256": "', '"checkpoint_sha256": "0')
        save_file(tensors, path, metadata=meta)
    with caplog.at_level(logging.WARNING, logger="attncomm.models.plain_model"):
        again = pm.load_tracing_model(cfg, cache_dir=cache)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unusable" in warnings[0].getMessage()
    assert isinstance(again, pm.PlainModel)
    for name, tensor in good.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name
    assert pm.read_plain(
        path, pm.plain_key(Path(cfg.path), torch.float32, cache), cfg, None, "cpu", torch.float32
    )  # type: ignore[arg-type]


def test_warm_start_imports_neither_transformers_nor_transformer_lens(tmp_path: Path) -> None:
    """The point of the fast start: a warm load in a fresh interpreter imports neither package."""
    cfg = _ckpt(tmp_path)
    cache = tmp_path / "cache"
    assert isinstance(pm.load_tracing_model(cfg, cache_dir=cache), pm.PlainModel)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from attncomm.models.plain_model import PlainModel, load_tracing_model\n"
        "from attncomm.runtime.config import ModelConfig\n"
        f"cfg = ModelConfig(name='ckpt', short_name='ckpt', family='gpt2', path={cfg.path!r})\n"
        f"m = load_tracing_model(cfg, cache_dir=Path({str(cache)!r}))\n"
        "from attncomm.tasks import get_task\n"
        "p = get_task('ioi').make_prompts(m.tokenizer, 2, seed=0, prepend_bos=False)\n"
        "print(type(m).__name__, type(m.tokenizer).__name__)\n"
        "print(sorted(k for k in ('transformers', 'transformer_lens') if k in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    kinds, imported = out.stdout.strip().splitlines()[-2:]
    assert kinds == "PlainModel LightTokenizer", out.stdout + out.stderr
    assert imported == "[]", out.stdout


def test_needed_hooks_are_all_computed_by_the_plain_forward() -> None:
    bridge = load_tiny("tiny-gpt2")
    plain, _ = pm.plain_from_adapter(bridge, build_model_dir("tiny-gpt2", test_cache_dir()))
    assert plain is not None
    names = needed_hooks(plain)  # type: ignore[arg-type]
    _, cache = plain.run_with_cache(torch.zeros(1, 4, dtype=torch.long), names)
    assert sorted(cache) == sorted(set(names))
