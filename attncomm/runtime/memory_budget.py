"""Memory budgets for chunked computations: ``trace.max_memory_gb`` or a safe fraction of what is free.

:func:`memory_budget_bytes` turns the configured limit (GiB, ``None`` = automatic) into bytes. The
automatic budget is :data:`AUTO_FRACTION` of the memory available now, at most :data:`AUTO_CAP` --
``MemAvailable`` of ``/proc/meminfo`` (``psutil`` elsewhere) for the CPU, ``torch.cuda.mem_get_info``
for a CUDA device -- so a job on a shared machine leaves room for its neighbours and for the
per-prompt tensors that are not chunked (the attention patterns).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from attncomm.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["AUTO_CAP", "AUTO_FRACTION", "available_bytes", "memory_budget_bytes"]

#: share of the available memory an automatic budget takes ...
AUTO_FRACTION = 0.25
#: ... but never more than this: larger chunks gain little speed and crowd a shared machine
AUTO_CAP = 2**30
#: the budget never goes below this (one firing at a time still works below it)
MIN_BUDGET = 2**20


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory available to a new allocation now on ``device`` (bytes)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import psutil

    return int(psutil.virtual_memory().available)


def memory_budget_bytes(max_memory_gb: float | None, device: str | torch.device = "cpu") -> int:
    """The budget in bytes: ``max_memory_gb`` GiB, or the automatic budget (see the module docstring)."""
    if max_memory_gb is not None:
        if not max_memory_gb > 0:
            raise ConfigError(
                f"trace.max_memory_gb={max_memory_gb}: must be a positive number of GiB "
                "(or null for an automatic budget)"
            )
        return max(MIN_BUDGET, int(max_memory_gb * 2**30))
    budget = max(MIN_BUDGET, min(AUTO_CAP, int(AUTO_FRACTION * available_bytes(device))))
    logger.debug("automatic memory budget: %.2f GiB", budget / 2**30)
    return budget
