"""The base of every user-facing error, defined in core so that the mathematics can raise it.

``run.py`` turns any :class:`AttncommError` into a one-line message and exit code 2;
:mod:`attncomm.errors` re-exports it with the framework's other error types.
"""

from __future__ import annotations


class AttncommError(Exception):
    """An error caused by input or environment that the user can fix; the message says what and how."""
