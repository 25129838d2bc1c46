"""User-facing errors: ``run.py`` turns any :class:`AttncommError` into a clear message and exit code 2."""

from __future__ import annotations

from attncomm.core.user_error import AttncommError

__all__ = ["AttncommError", "ConfigError", "MissingArtifactError"]


class ConfigError(AttncommError, ValueError):
    """An invalid configuration value (e.g. ``task.n_prompts<=0``)."""


class MissingArtifactError(AttncommError, FileNotFoundError):
    """A stage needs an artifact that an earlier stage produces."""

    def __init__(self, path: str, producer: str, command: str) -> None:
        self.path, self.producer, self.command = path, producer, command
        super().__init__(
            f"missing artifact: {path}\n"
            f"  it is produced by the '{producer}' stage; run it first, e.g.\n"
            f"    {command}\n"
            f"  or point paths.run_dir=DIR at a run directory that already holds it."
        )
