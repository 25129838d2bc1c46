"""Weights & Biases run context: one run per stage job, offline by default.

``Tracker`` wraps ``wandb`` so stages log scalars, tables, figures and artifacts without caring
whether logging is offline, online or disabled. ``read_offline_run`` reads an offline run's
``.wandb`` record log back (config, history, summary) without network or account, for tests and
for users who want to inspect a run before syncing it.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attncomm.errors import ConfigError
from attncomm.runtime.config import LoggerConfig

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")


class Tracker:
    """Log metrics/tables/figures/artifacts of one stage job to wandb (a no-op when disabled)."""

    def __init__(
        self,
        cfg: LoggerConfig,
        *,
        name: str | None = None,
        job_type: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if cfg.mode not in MODES:
            raise ConfigError(f"logger.mode={cfg.mode!r} is not one of {', '.join(MODES)}")
        from dataclasses import replace

        from attncomm.runtime.wandb_checks import check_online_reachable, effective_mode

        cfg = replace(cfg, mode=effective_mode(cfg.mode))
        if cfg.mode == "online":
            check_online_reachable()
        self.cfg = cfg
        self.run: Any = None
        self.run_path: Path | None = None
        if cfg.mode == "disabled":
            return
        import wandb

        directory = Path(cfg.dir)
        directory.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        from attncomm.runtime.wandb_checks import wandb_init_errors

        with wandb_init_errors(cfg.mode):
            self.run = self._init(wandb, cfg, name, job_type, config, directory)
        self.run_path = Path(self.run.dir).parent
        log.info("wandb %s run %s in %s", cfg.mode, self.run.id, self.run_path)

    @staticmethod
    def _init(
        wandb: Any,
        cfg: LoggerConfig,
        name: str | None,
        job_type: str | None,
        config: dict[str, Any] | None,
        directory: Path,
    ) -> Any:
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            job_type=job_type,
            name=name,
            tags=list(cfg.tags),
            config=config or {},
            mode=cfg.mode,
            dir=str(directory),
            reinit="create_new",
            settings=wandb.Settings(
                console="off", x_disable_stats=True, x_disable_meta=True, init_timeout=30
            ),
        )

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def _guard(self, what: str, call: Callable[[Any], None]) -> None:
        """Run one wandb call; if wandb fails (e.g. its service process was killed by the signal that
        preempts a SLURM job), warn once and stop logging for this job instead of failing the work."""
        run = self.run
        if run is None:
            return
        try:
            call(run)
        except Exception as err:  # noqa: BLE001 - any wandb failure must not cost the computation
            log.warning(
                "wandb logging stopped for this job: %s failed (%s: %s)", what, type(err).__name__, err
            )
            self.run = None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log scalar metrics (also written to the run summary)."""
        clean = {k: _plain(v) for k, v in metrics.items()}
        self._guard("log", lambda run: run.log(clean, step=step))

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary values (the numbers a dashboard shows for the run)."""

        def put(run: Any) -> None:
            for key, value in values.items():
                run.summary[key] = _plain(value)

        self._guard("summary", put)

    def log_table(self, key: str, df: Any) -> None:
        """Log a pandas DataFrame as a ``wandb.Table``."""
        if self.run is None:
            return
        import wandb

        self._guard("log_table", lambda run: run.log({key: wandb.Table(dataframe=df)}))

    def log_figure(self, key: str, fig: Any) -> None:
        """Log a matplotlib figure, or an image file's path, as an image.

        Figures are rendered to PNG here: wandb's own figure path needs pyplot, which we never import.
        """
        if self.run is None:
            return
        import io
        import warnings

        import wandb
        from PIL import Image

        if isinstance(fig, str | os.PathLike):
            self._guard("log_figure", lambda run: run.log({key: wandb.Image(str(fig))}))
            return
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # layout-engine notes on small figures
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        buf.seek(0)
        with Image.open(buf) as img:
            image = wandb.Image(img.convert("RGB"))
        self._guard("log_figure", lambda run: run.log({key: image}))

    def log_html(self, key: str, path: str | os.PathLike[str]) -> None:
        """Log a self-contained HTML page (e.g. a circuit viewer) as a wandb HTML panel."""
        if self.run is None:
            return
        import wandb

        page = wandb.Html(Path(path).read_text(encoding="utf-8"))
        self._guard("log_html", lambda run: run.log({key: page}))

    def log_artifact(self, path: str | os.PathLike[str], name: str, type: str) -> None:
        """Attach a file or directory of the run directory as a wandb artifact."""
        if self.run is None or not self.cfg.log_artifacts:
            return
        import wandb

        art = wandb.Artifact(name=_artifact_name(name), type=type)
        p = Path(path)
        if p.is_dir():
            art.add_dir(str(p))
        elif p.is_file():
            art.add_file(str(p))
        else:
            return
        self._guard("log_artifact", lambda run: run.log_artifact(art))

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run (never raises: an interrupted job's own exit must win); offline, also wait
        until its record log is complete on disk."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            log.warning("wandb run not finished cleanly (%s: %s)", type(err).__name__, err)
            return
        if self.cfg.mode == "offline" and self.run_path is not None:
            wait_for_offline_run(self.run_path)


def _plain(value: Any) -> Any:
    """Turn tensors/numpy scalars into Python numbers so wandb and JSON accept them."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:128]


# --- reading offline runs back -------------------------------------------------------------------

_BLOCK = 32768
_HEADER = 7  # crc32 (4) + length (2, little endian) + record type (1)


def _records(path: Path) -> Iterator[bytes]:
    """Yield the payloads of a ``.wandb`` file (LevelDB log format behind a 7-byte W&B header)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file (bad header)")
    pos, pending = 7, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    """What an offline run recorded: run metadata, config, every history row and the summary."""

    path: Path
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _has_exit_record(path: Path) -> bool:
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        payloads = list(_records(path))
    except (OSError, ValueError, struct.error):
        return False
    from google.protobuf.message import DecodeError

    for payload in reversed(payloads):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except DecodeError:
            return False  # a record still being written
        if rec.WhichOneof("record_type") == "exit":
            return True
    return False


def wait_for_offline_run(run_dir: str | os.PathLike[str], timeout: float = 60.0) -> bool:
    """Wait until the run's record log holds its exit record (wandb's service writes it asynchronously
    after ``finish()`` returns); returns whether it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_dir).glob("run-*.wandb"))
        if files and _has_exit_record(files[0]):
            return True
        if time.monotonic() > deadline:
            log.warning("wandb offline run %s is still incomplete after %.0fs", run_dir, timeout)
            return False
        time.sleep(0.1)


def read_offline_run(run_dir: str | os.PathLike[str]) -> OfflineRun:
    """Parse ``run-*.wandb`` inside an offline run directory (``wandb/offline-run-*``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    wait_for_offline_run(run_dir, timeout=30.0)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    out = OfflineRun(path=run_dir)

    def items(updates: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for item in updates:
            key = item.key or "/".join(item.nested_key)
            found[key] = json.loads(item.value_json)
        return found

    for payload in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            # a run may be recorded more than once (updates); keep the fields that were set
            out.group = rec.run.run_group or out.group
            out.job_type = rec.run.job_type or out.job_type
            out.config.update(items(rec.run.config.update))
        elif kind == "config":
            out.config.update(items(rec.config.update))
        elif kind == "history":
            out.history.append(items(rec.history.item))
        elif kind == "summary":
            out.summary.update(items(rec.summary.update))
    for key, value in list(out.config.items()):
        if isinstance(value, dict) and set(value) == {"value"}:
            out.config[key] = value["value"]
    return out


def find_offline_runs(directory: str | os.PathLike[str]) -> list[Path]:
    """Offline run directories under ``directory`` (searching ``wandb/`` below it), oldest first."""
    return sorted(Path(directory).glob("**/wandb/offline-run-*"))


class PrefixedTracker(Tracker):
    """A view of a tracker that prefixes every metric and table key with ``{prefix}/``.

    The pipeline runs several stages inside one wandb run; prefixes keep their metrics apart. The view
    shares the base tracker's run: if logging stops on one, it stops on both.
    """

    def __init__(self, base: Tracker, prefix: str) -> None:  # noqa: D107 - no wandb.init here
        self._base = base
        self._prefix = prefix
        self.cfg = base.cfg

    @property  # type: ignore[override]
    def run(self) -> Any:
        return self._base.run

    @run.setter
    def run(self, value: Any) -> None:
        self._base.run = value

    @property  # type: ignore[override]
    def run_path(self) -> Path | None:
        return self._base.run_path

    def _key(self, key: str) -> str:
        return key if key.startswith(f"{self._prefix}/") else f"{self._prefix}/{key}"

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics({self._key(k): v for k, v in metrics.items()}, step=None)

    def summary(self, values: dict[str, Any]) -> None:
        super().summary({self._key(k): v for k, v in values.items()})

    def log_table(self, key: str, df: Any) -> None:
        super().log_table(self._key(key), df)

    def log_figure(self, key: str, fig: Any) -> None:
        super().log_figure(self._key(key), fig)

    def log_html(self, key: str, path: str | os.PathLike[str]) -> None:
        super().log_html(self._key(key), path)

    def finish(self, exit_code: int = 0) -> None:
        """The pipeline's own tracker finishes the run, not a stage's view of it."""
