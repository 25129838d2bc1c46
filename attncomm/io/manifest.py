"""The run directory's manifest: an append-only journal plus a readable summary.

``manifest.jsonl`` is the journal: one JSON line per finished job (stage, time, git sha, versions,
config, files, extra), appended under a lock with a single ``write`` and ``fsync``, so concurrent
jobs of a sweep never overwrite each other and a crash can at worst leave one incomplete last line
(skipped, with a warning, when read). ``manifest.json`` is the summary rebuilt from the journal
after every append: ``stages`` maps each stage to its latest entry (what the pipeline's up-to-date
check reads) and ``jobs`` maps each job (``{stage}@{hash8 of the stage's own settings}``) to its
latest entry, so e.g. ``compare`` at two thresholds keeps both records.

A ``manifest.json`` that cannot be parsed is never silently replaced: it is moved aside to
``manifest.json.corrupt-{time}`` with a warning naming both files, and the summary is rebuilt from the
journal. A run directory from before the journal (only ``manifest.json``) is migrated on the first
append: its entries seed the journal.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL = "manifest.jsonl"
SUMMARY = "manifest.json"
LOCK = ".manifest.lock"


def job_id(stage: str, config: dict[str, Any]) -> str:
    """``{stage}@{hash8}`` of the stage's own config section (``compare@1a2b3c4d``), else the bare stage."""
    section = config.get(stage.split("_shard")[0]) if isinstance(config, dict) else None
    if section is None:
        return stage
    digest = hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()
    return f"{stage}@{digest[:8]}"


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_journal(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete entry of ``manifest.jsonl`` in order (a damaged line is skipped with a warning)."""
    path = Path(run_dir) / JOURNAL
    if not path.is_file():
        return []
    entries = []
    for i, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("manifest journal %s: line %d is incomplete or damaged; skipped", path, i)
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``manifest.json`` summary of journal entries: latest entry per stage and per job."""
    stages: dict[str, Any] = {}
    jobs: dict[str, Any] = {}
    for entry in entries:
        stage = str(entry.get("stage"))
        stages[stage] = entry
        jobs[str(entry.get("job", stage))] = entry
    return {"journal": JOURNAL, "stages": stages, "jobs": jobs}


def _move_aside(path: Path, why: str) -> Path:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    os.replace(path, aside)
    log.warning(
        "manifest %s could not be read (%s); moved it aside to %s and rebuilt the manifest from the "
        "journal %s",
        path,
        why,
        aside,
        path.with_name(JOURNAL),
    )
    return aside


def _load_summary_file(path: Path) -> dict[str, Any] | None:
    """The parsed ``manifest.json``, None when absent; a corrupt one is moved aside (None)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise ValueError("not a manifest object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        _move_aside(path, f"{type(err).__name__}: {err}")
        return None
    return data


def _write_summary(run_dir: Path, entries: list[dict[str, Any]]) -> None:
    from attncomm.io.artifacts import atomic_write_text

    text = json.dumps(summarize(entries), indent=2, sort_keys=True, default=str)
    atomic_write_text(Path(run_dir) / SUMMARY, text)


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        # a crash before a previous append finished leaves a line without its newline: start afresh
        if os.fstat(fd).st_size and not path.read_bytes().endswith(b"\n"):
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def append_entry(run_dir: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to the journal and rebuild the summary, under the run directory's lock."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        journal = run_dir / JOURNAL
        current = _load_summary_file(run_dir / SUMMARY)  # a corrupt one is moved aside, not overwritten
        if not journal.is_file():  # a run directory from before the journal: its entries seed it
            for old in (current or {}).get("stages", {}).values():
                if isinstance(old, dict):
                    _append_line(journal, old)
        _append_line(journal, entry)
        _write_summary(run_dir, read_journal(run_dir))


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest summary of a run directory (``{}`` when it has none).

    A corrupt ``manifest.json`` is moved aside with a warning and rebuilt from the journal.
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / SUMMARY
    if not summary_path.exists() and not (run_dir / JOURNAL).exists():
        return {}
    with _locked(run_dir):
        data = _load_summary_file(summary_path)
        if data is not None:
            return data
        entries = read_journal(run_dir)
        if entries:
            _write_summary(run_dir, entries)
        return summarize(entries)
