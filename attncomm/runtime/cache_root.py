"""attncomm's cache root: where built test models, saved tokenizers and other reusable caches live.

One fact, stated once: ``$ATTNCOMM_CACHE`` when set, else ``~/.cache/attncomm``. Python code calls
:func:`default_cache_dir`; Hydra configs (``paths.cache_dir``, ``conf/paths/default.yaml``) hold the
same rule as the interpolation :data:`HYDRA_CACHE_DIR` (a test checks that they agree).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "DEFAULT_CACHE_DIR", "HYDRA_CACHE_DIR", "built_model_dir", "default_cache_dir"]

#: the environment variable naming the cache root
CACHE_ENV = "ATTNCOMM_CACHE"
#: the cache root when :data:`CACHE_ENV` is not set
DEFAULT_CACHE_DIR = "~/.cache/attncomm"
#: the same rule as an OmegaConf interpolation (``~`` spelled ``${oc.env:HOME}``)
HYDRA_CACHE_DIR = "${oc.env:" + CACHE_ENV + ",${oc.env:HOME}/" + DEFAULT_CACHE_DIR.removeprefix("~/") + "}"


def default_cache_dir() -> Path:
    """``$ATTNCOMM_CACHE``, else ``~/.cache/attncomm`` (user-expanded; not created)."""
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)).expanduser()


def built_model_dir(builder: str, cache_dir: str | Path) -> Path:
    """``{cache_dir}/models/{builder}``: where a built test model (``model.builder``) is saved."""
    return Path(cache_dir) / "models" / builder
