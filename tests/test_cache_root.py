"""The cache root rule is stated once (attncomm.runtime.cache_root) and the configs agree with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attncomm.runtime.cache_root import CACHE_ENV, HYDRA_CACHE_DIR, default_cache_dir
from attncomm.runtime.config import PathsConfig

ROOT = Path(__file__).resolve().parents[1]


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "attncomm"


def test_hydra_configs_state_the_same_rule() -> None:
    assert HYDRA_CACHE_DIR == "${oc.env:ATTNCOMM_CACHE,${oc.env:HOME}/.cache/attncomm}"
    conf = yaml.safe_load((ROOT / "conf" / "paths" / "default.yaml").read_text())
    assert conf["cache_dir"] == HYDRA_CACHE_DIR
    assert PathsConfig().cache_dir == HYDRA_CACHE_DIR
