"""Checks before wandb starts: which mode applies, and whether online logging can work at all.

``WANDB_MODE`` in the environment is honoured (with a logged note when it differs from
``logger.mode``), except that ``logger.mode=disabled`` always wins. ``logger.mode=online`` needs an
API key and a reachable server; both are checked within a few seconds so that an offline machine
gets one message suggesting ``logger.mode=offline`` instead of a long hang and a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from attncomm.errors import ConfigError

log = logging.getLogger(__name__)

#: WANDB_MODE values wandb accepts, and the logger.mode each means
ENV_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}

#: seconds to wait for the wandb server before calling it unreachable
CONNECT_TIMEOUT_S = 4.0


class WandbUnavailableError(ConfigError):
    """Online logging was asked for but cannot work here (no key, no network, or wandb failed to start)."""


def effective_mode(mode: str) -> str:
    """``logger.mode`` after honouring ``WANDB_MODE``; an invalid ``WANDB_MODE`` is a :class:`ConfigError`."""
    env = os.environ.get("WANDB_MODE")
    if env is None or env == "":
        return mode
    if env not in ENV_MODES:
        raise ConfigError(
            f"WANDB_MODE={env!r} in the environment is not a wandb mode; valid: {', '.join(ENV_MODES)}. "
            f"Unset it (`unset WANDB_MODE`) and choose with logger.mode=offline|online|disabled"
        )
    wanted = ENV_MODES[env]
    if mode == "disabled" or wanted == mode:
        return mode
    log.warning("WANDB_MODE=%s in the environment overrides logger.mode=%s", env, mode)
    # wandb itself reads WANDB_MODE; keep it consistent with the mode we pass
    return wanted


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def check_online_reachable(timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`WandbUnavailableError` when online logging cannot work (no key or no server)."""
    url = urlparse(_base_url())
    host = url.hostname or "api.wandb.ai"
    port = url.port or (443 if url.scheme == "https" else 80)
    fix = "use logger.mode=offline (and `wandb sync` the run later) or logger.mode=disabled"
    if not _has_api_key(host):
        raise WandbUnavailableError(
            f"logger.mode=online needs a wandb API key for {host} (WANDB_API_KEY or `wandb login`); {fix}"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise WandbUnavailableError(
            f"logger.mode=online: the wandb server {host}:{port} is not reachable ({err}); {fix}"
        ) from err


@contextlib.contextmanager
def wandb_init_errors(mode: str) -> Iterator[None]:
    """Turn a failure of ``wandb.init`` into one :class:`WandbUnavailableError` message."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - wandb raises many unrelated types; all mean "cannot log"
        if isinstance(err, ConfigError):
            raise
        raise WandbUnavailableError(
            f"wandb could not start a {mode} run ({type(err).__name__}: {err}); use logger.mode=offline "
            "or logger.mode=disabled"
        ) from err
