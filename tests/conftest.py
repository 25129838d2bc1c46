"""Shared fixtures: the reference directory (../shared beside the checkout) and the tiny test models.

Markers (registered in pyproject.toml): ``slow``, ``cli``, ``browser``, ``slurm``; ``make test`` runs all,
``make test-fast`` none of them.

This module imports no torch, transformers or Hydra at import time: under pytest-xdist the controller
process loads it too but never runs a test, and on a 2-core machine its imports (about 4 s of CPU)
would compete with the workers' start-up. The fixtures and helpers import what they need when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from attncomm.models.adapter import ModelAdapter
    from attncomm.runtime.config import AppConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
CONF = str(REPO_ROOT / "conf")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs one worker per core) each worker computes on one thread,
    so that the workers do not oversubscribe the cores; so do the ``python run.py`` subprocesses they
    start (``OMP_NUM_THREADS``), whose artifacts some tests compare byte for byte with in-process runs
    (float sums depend on the number of threads)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


#: the young-generation threshold of Python's cyclic garbage collector while tests run (default 700)
GC_THRESHOLD0 = 10_000


def pytest_collection_finish(session: pytest.Session) -> None:
    """Make the cyclic garbage collector cheaper in a process that runs tests: the ~500,000 objects of
    torch, transformers and the test modules, alive until the end, are frozen (never scanned again),
    and full collections come less often (the tests' loaded models add as many objects again). The
    collector took 6-7 s of CPU per xdist worker in ``make test-fast`` before. Only collection timing
    changes: garbage is still freed, just in larger batches."""
    import gc

    gc.collect()
    gc.freeze()
    _, t1, t2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, t1, t2)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Freeze what is left at the end: the interpreter's last collections at exit then scan nothing
    (about 1.5 s less before a worker with loaded models has exited)."""
    import gc

    gc.freeze()


#: variants of a family that ``make test-fast`` leaves to the full suite: it tests every family once
#: (GPT-2, NeoX/Pythia, Gemma-2, Llama); Qwen2 (q/k/v biases) and Mistral run in ``make test`` and CI
FULL_SUITE_ONLY = frozenset({"tiny-qwen2", "tiny-mistral"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist with ``--dist loadgroup``, all SLURM tests run on one worker (they share one
    cluster), and so do the browser tests. Tests parametrized with a :data:`FULL_SUITE_ONLY` model are
    marked ``slow``."""
    for item in items:
        for name in ("slurm", "browser"):
            if item.get_closest_marker(name):
                item.add_marker(pytest.mark.xdist_group(name))
        params = getattr(getattr(item, "callspec", None), "params", {})
        values = [x for v in params.values() for x in (v if isinstance(v, tuple) else (v,))]
        if any(isinstance(v, str) and v in FULL_SUITE_ONLY for v in values):
            item.add_marker(pytest.mark.slow)


def shared_path(*parts: str) -> Path:
    """Path under ../shared. Skips outside CI when ../shared is absent; fails in CI (CI has it)."""
    if not SHARED_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DIR} is missing, but CI must have ../shared beside the checkout")
        pytest.skip(f"{SHARED_DIR} is absent (allowed only outside CI)")
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"expected reference file {path} is missing")
    return path


def compose_app(overrides: list[str]) -> AppConfig:
    """The typed config ``python run.py OVERRIDES`` would run with (Hydra's compose API, no job)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from attncomm.runtime.config import AppConfig, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    app = OmegaConf.to_object(cfg)
    assert isinstance(app, AppConfig)
    return app


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return shared_path("reference")


@pytest.fixture(scope="session")
def published_gp_dir() -> Path:
    return shared_path("reference", "published", "gpt2-small", "gp")


@pytest.fixture(scope="session")
def tiny_gpt2() -> ModelAdapter:
    from tests.models_fixtures import load_tiny

    return load_tiny("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_pythia() -> ModelAdapter:
    from tests.models_fixtures import load_tiny

    return load_tiny("tiny-pythia")


@pytest.fixture(scope="session")
def tiny_gemma2() -> ModelAdapter:
    from tests.models_fixtures import load_tiny

    return load_tiny("tiny-gemma2")
