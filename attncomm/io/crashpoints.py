"""Deterministic crash points for testing resumability (stdlib only; called by the atomic writer).

With ``ATTNCOMM_CRASH_AT_WRITE=N`` in the environment, the process kills itself with SIGKILL in the
middle of its N-th atomic file write: the temporary file is written, the rename onto the final name
has not happened. Tests use it to check that a rerun after a crash at any write gives the artifacts
of an uninterrupted run, without racing a timer against the job. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_ENV = "ATTNCOMM_CRASH_AT_WRITE"
_count = 0


def before_commit() -> None:
    """Call between writing a temporary file and renaming it into place."""
    global _count
    target = os.environ.get(_ENV)
    if not target:
        return
    _count += 1
    if _count == int(target):
        os.kill(os.getpid(), signal.SIGKILL)
