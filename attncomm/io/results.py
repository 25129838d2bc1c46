"""HDF5 storage of per-firing tracing results, resumable and shardable.

Each traced prompt first gets a *part* file, ``tracing_results/parts/{prompt}.h5``, written
atomically after its graph: the part is the commit marker of that prompt, so a job killed at any
moment resumes by skipping prompts whose part exists and redoing the rest. A shard's result file
(``..._shard{i}.h5``) and the merged file (``{model}_{task}_n{N}_{seed}.h5``) are built from parts,
so a sharded trace merged is the same as one unsharded trace.

Dataset names are the published ones (docs/METHOD.md section 4.5), one per firing ``(p, l, h, d, s)``:
``svs_used_decomp_i_(p, l, h, d, s)`` dest-side selected terms (selection order),
``svs_used_decomp_j_(p, l, h, d, s)`` source-side selected terms (empty when that side is not traced),
``contrib_sv_dest_(p, l, h, d, s)`` / ``contrib_sv_src_(p, l, h, d, s)`` upstream contributions of
shape ``(l, H+2, d+1)`` (layer, component, source token; component ``0..H-1`` heads, ``H`` MLP,
``H+1`` AH bias; the Embedding term is not stored). A ``prompts`` table records every prompt's
status (traced, or why it was skipped) and firing count. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from attncomm.core.types import FiringKey, FiringRecord
from attncomm.errors import AttncommError
from attncomm.io.artifacts import atomic_path

#: prompt status codes stored in the ``prompts`` table
STATUSES: tuple[str, ...] = ("traced", "incorrect", "nonpositive_total", "no_head_seed")

_KINDS = ("svs_used_decomp_i", "svs_used_decomp_j", "contrib_sv_dest", "contrib_sv_src")
_NAME = re.compile(r"^(" + "|".join(_KINDS) + r")_\((\d+), (\d+), (\d+), (\d+), (\d+)\)$")
_DIMS = {
    "svs_used_decomp_i": "term",
    "svs_used_decomp_j": "term",
    "contrib_sv_dest": "layer,component,src_pos",
    "contrib_sv_src": "layer,component,src_pos",
}


@dataclass
class PromptRecord:
    """One prompt's outcome: its status, number of firings traced and per-firing results."""

    prompt: int
    status: str
    n_firings: int
    firings: dict[FiringKey, FiringRecord]


class DamagedResultsError(AttncommError, ValueError):
    """A tracing-result file (part, shard or merged) cannot be read: empty, truncated or not HDF5."""


def _damaged(path: Path | str, err: BaseException) -> DamagedResultsError:
    path = Path(str(path))
    if path.parent.name == "parts":
        fix = f"delete it and run trace again with the same settings (it retraces prompt {path.stem})"
    else:
        fix = "delete it and rebuild it (stage=trace resumes from its part files, stage=trace_merge merges)"
    return DamagedResultsError(f"tracing-result file {path} is damaged or not HDF5 ({err}); {fix}")


@contextlib.contextmanager
def open_results(path: Path | str) -> Iterator[h5py.File]:
    """Open a tracing-result file for reading; any damage is one :class:`DamagedResultsError`."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise _damaged(path, err) from err
    try:
        yield f
    except (OSError, KeyError, TypeError) as err:
        raise _damaged(path, err) from err
    finally:
        f.close()


def read_prompt_table(path: Path | str) -> dict[int, tuple[str, int]]:
    """prompt id -> (status, n_firings) of a shard or merged result file."""
    with open_results(path) as f:
        ids, codes, counts = f["prompts/prompt"][()], f["prompts/status"][()], f["prompts/n_firings"][()]
    try:
        return {int(p): (STATUSES[int(c)], int(n)) for p, c, n in zip(ids, codes, counts, strict=True)}
    except (IndexError, ValueError) as err:
        raise _damaged(path, err) from err


def dataset_name(kind: str, key: FiringKey) -> str:
    """Published dataset name, e.g. ``contrib_sv_dest_(3, 9, 6, 14, 2)``."""
    return f"{kind}_({', '.join(str(int(k)) for k in key)})"


def parse_dataset_name(name: str) -> tuple[str, FiringKey]:
    """Inverse of :func:`dataset_name`; a clear error for anything else."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"not a tracing-result dataset name: {name!r}")
    kind, *nums = m.groups()
    return kind, tuple(int(x) for x in nums)  # type: ignore[return-value]


def _write_firings(f: h5py.File, firings: dict[FiringKey, FiringRecord]) -> None:
    for key in sorted(firings):
        rec = firings[key]
        arrays = {
            "svs_used_decomp_i": np.asarray(rec.dest_terms, dtype=np.int64),
            "svs_used_decomp_j": np.asarray(rec.src_terms, dtype=np.int64),
            "contrib_sv_dest": np.asarray(rec.contrib_dest),
            "contrib_sv_src": np.asarray(rec.contrib_src),
        }
        for kind, arr in arrays.items():
            big = arr.size > 64
            ds = f.create_dataset(
                dataset_name(kind, key), data=arr, compression="gzip" if big else None, track_times=False
            )
            ds.attrs["dims"] = _DIMS[kind]


def _write_prompt_table(f: h5py.File, prompts: Sequence[PromptRecord]) -> None:
    ordered = sorted(prompts, key=lambda r: r.prompt)
    f.create_dataset(
        "prompts/prompt", data=np.array([r.prompt for r in ordered], dtype=np.int64), track_times=False
    )
    f.create_dataset(
        "prompts/status",
        data=np.array([STATUSES.index(r.status) for r in ordered], dtype=np.int8),
        track_times=False,
    )
    f.create_dataset(
        "prompts/n_firings", data=np.array([r.n_firings for r in ordered], dtype=np.int64), track_times=False
    )
    f["prompts"].attrs["status_codes"] = ",".join(STATUSES)


def part_path(results_dir: Path, prompt: int) -> Path:
    return results_dir / "parts" / f"{prompt}.h5"


def write_part(results_dir: Path, record: PromptRecord) -> Path:
    """Atomically write one prompt's part file (its commit marker)."""
    if record.status not in STATUSES:
        raise ValueError(f"unknown prompt status {record.status!r}; expected one of {STATUSES}")
    path = part_path(results_dir, record.prompt)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.attrs["prompt"] = record.prompt
        f.attrs["status"] = record.status
        f.attrs["n_firings"] = record.n_firings
        _write_firings(f, record.firings)
    return path


def read_part(path: Path) -> PromptRecord:
    """Read a part file back (a clear error names a damaged file)."""
    try:
        with open_results(path) as f:
            firings = _read_firings(f, f.keys())
            return PromptRecord(
                int(f.attrs["prompt"]), str(f.attrs["status"]), int(f.attrs["n_firings"]), firings
            )
    except ValueError as err:
        if isinstance(err, DamagedResultsError):
            raise
        raise _damaged(path, err) from err


def done_prompts(results_dir: Path) -> set[int]:
    """Prompts whose part file exists (already traced or already skipped)."""
    parts = results_dir / "parts"
    if not parts.is_dir():
        return set()
    return {int(p.stem) for p in parts.glob("*.h5") if p.stem.isdigit()}


def _read_firings(f: h5py.File, names: Iterable[str]) -> dict[FiringKey, FiringRecord]:
    found: dict[FiringKey, dict[str, np.ndarray]] = {}
    for name in names:
        if name == "prompts":
            continue
        kind, key = parse_dataset_name(name)
        found.setdefault(key, {})[kind] = f[name][()]
    out: dict[FiringKey, FiringRecord] = {}
    for key, arrays in found.items():
        missing = [k for k in _KINDS if k not in arrays]
        if missing:
            raise ValueError(f"firing {key} lacks datasets {missing} in {f.filename}")
        out[key] = FiringRecord(
            arrays["svs_used_decomp_i"],
            arrays["svs_used_decomp_j"],
            arrays["contrib_sv_dest"],
            arrays["contrib_sv_src"],
        )
    return out


def write_results(path: Path, parts: Sequence[PromptRecord]) -> Path:
    """Write a result file (shard or merged) from prompt records, atomically, in prompt order."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for rec in sorted(parts, key=lambda r: r.prompt):
            _write_firings(f, rec.firings)
        _write_prompt_table(f, parts)
    return path


def build_results(path: Path, results_dir: Path, prompts: Iterable[int]) -> Path:
    """Collect the part files of ``prompts`` into the result file ``path``."""
    records = [read_part(part_path(results_dir, p)) for p in sorted(prompts)]
    return write_results(path, records)


@dataclass
class TracingResults:
    """Read access to a result file: prompt statuses and per-firing records."""

    path: Path

    def prompts(self) -> dict[int, tuple[str, int]]:
        """prompt id -> (status, n_firings)."""
        return read_prompt_table(self.path)

    def firings(self, prompt: int | None = None) -> dict[FiringKey, FiringRecord]:
        """Every firing's record, or only those of one prompt."""
        with open_results(self.path) as f:
            names = [n for n in f.keys() if n != "prompts"]
            if prompt is not None:
                names = [n for n in names if n.split("_(", 1)[1].startswith(f"{prompt},")]
            return _read_firings(f, names)

    def iter_keys(self) -> Iterator[FiringKey]:
        with open_results(self.path) as f:
            for name in f.keys():
                if name.startswith("svs_used_decomp_i_"):
                    yield parse_dataset_name(name)[1]
