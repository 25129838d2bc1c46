"""attncomm: attention-causal communication (ACC) circuit discovery for transformer language models.

``attncomm.load(model, task=..., n_prompts=...)`` opens a notebook session (see :mod:`attncomm.api`);
it is imported lazily so that ``import attncomm`` stays cheap.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from attncomm.api import load

        return load
    raise AttributeError(f"module 'attncomm' has no attribute {name!r}")
