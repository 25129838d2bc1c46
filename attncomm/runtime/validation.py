"""Range checks of a job's configuration, run before any stage touches a file.

Each check names the option, the value given and the valid range, so a typo stops the job at once
(``ConfigError``, exit 2) instead of failing deep inside a stage. Checks that need files (e.g.
``compare.threshold`` among the pruned thresholds actually produced) live in the stage that reads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from attncomm.errors import ConfigError


def _number(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ConfigError(f"{option}={value!r} must be a number")
    return float(value)


def check_fraction(option: str, value: Any, *, open_low: bool) -> None:
    """``value`` in ``(0, 1]`` (``open_low``) or ``[0, 1]``."""
    x = _number(option, value)
    ok = (0 < x <= 1) if open_low else (0 <= x <= 1)
    if not ok:
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ConfigError(f"{option}={value} must be in {interval}")


def check_thresholds(option: str, values: Iterable[Any]) -> None:
    """A non-empty list of thresholds in ``[0, 1]``."""
    values = list(values)
    if not values:
        raise ConfigError(f"{option} is empty; give thresholds in [0, 1], e.g. {option}=[0.2]")
    for v in values:
        x = _number(option, v)
        if not 0 <= x <= 1:
            raise ConfigError(f"{option} contains {v}: every threshold must be in [0, 1]")


def check_prune_step(step: Any) -> None:
    """``prune.step`` in ``(0, 1]`` and dividing 1 (thresholds ``0, step, .., 1``)."""
    x = _number("prune.step", step)
    if not 0 < x <= 1:
        raise ConfigError(f"prune.step={step} must be in (0, 1] (e.g. 0.05 prunes at 0, 0.05, .., 1)")
    n = round(1.0 / x)
    if not math.isclose(n * x, 1.0, rel_tol=0, abs_tol=1e-9):
        raise ConfigError(f"prune.step={step} must divide 1 (e.g. 0.05, 0.1, 0.25)")


def check_max_firings(value: Any) -> None:
    """``trace.max_firings``: null (no limit) or a positive whole number of firings."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"trace.max_firings={value!r} must be a positive number of firings per prompt "
            "(e.g. trace.max_firings=20000), or null for no limit"
        )


def validate_config(cfg: Any) -> None:
    """Every range check of an :class:`AppConfig` that needs no files; raises :class:`ConfigError`."""
    if not isinstance(cfg.task.n_prompts, int) or cfg.task.n_prompts <= 0:
        raise ConfigError(f"task.n_prompts={cfg.task.n_prompts} must be a positive number of prompts")
    if cfg.task.batch_size <= 0:
        raise ConfigError(f"task.batch_size={cfg.task.batch_size} must be at least 1")
    check_fraction("trace.upstream_fraction", cfg.trace.upstream_fraction, open_low=True)
    check_fraction("trace.seed_fraction", cfg.trace.seed_fraction, open_low=True)
    check_max_firings(cfg.trace.max_firings)
    threads = cfg.device.threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"device.threads={threads!r} must be a positive number of threads, or null")
    check_thresholds("unify.thresholds", cfg.unify.thresholds)
    check_fraction("interventions.threshold", cfg.interventions.threshold, open_low=False)
    check_prune_step(cfg.prune.step)
    check_fraction("compare.threshold", cfg.compare.threshold, open_low=False)
    check_fraction("experiments.threshold", cfg.experiments.threshold, open_low=False)
    check_thresholds("export.thresholds", cfg.export.thresholds)
    if cfg.task.name == "ioi":
        from attncomm.tasks.ioi import PROMPT_TYPES

        if cfg.task.prompt_type not in PROMPT_TYPES:
            raise ConfigError(
                f"task.prompt_type={cfg.task.prompt_type!r} is not an IOI prompt type; "
                f"valid: {', '.join(PROMPT_TYPES)}"
            )
