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

Readers for later stages: :class:`TracingResults` (prompt table, per-firing records),
:func:`read_term_lengths` (selected-term counts and the head count from dataset shapes alone, for
``sparsity``), :func:`result_files` (merged file, else shards) and :class:`SelectedTerms` (the
``terms(firing, side)`` lookup of the intervention stages).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from h5py import h5a, h5d, h5o, h5p, h5s, h5t
from h5py._hl import base as h5py_base
from h5py._hl import filters as h5py_filters
from tqdm.auto import tqdm

from attncomm.core.types import FiringKey, FiringRecord
from attncomm.errors import AttncommError
from attncomm.io.artifacts import RunArtifacts, atomic_path

logger = logging.getLogger(__name__)


#: prompt status codes stored in the ``prompts`` table (new ones are appended: a code never changes)
STATUSES: tuple[str, ...] = ("traced", "incorrect", "nonpositive_total", "no_head_seed", "firing_budget")

#: dataset kinds (name prefixes) of one firing: selected terms of each side, contributions of each side
DEST_TERMS, SRC_TERMS = "svs_used_decomp_i", "svs_used_decomp_j"
CONTRIB_DEST, CONTRIB_SRC = "contrib_sv_dest", "contrib_sv_src"
#: the group holding the prompt table (``prompt``, ``status``, ``n_firings`` datasets)
PROMPT_TABLE = "prompts"
#: components stored after the ``H`` heads on a contribution's component axis (MLP, AH bias)
EXTRA_COMPONENTS = 2

_KINDS = (DEST_TERMS, SRC_TERMS, CONTRIB_DEST, CONTRIB_SRC)
_NAME = re.compile(r"^(" + "|".join(_KINDS) + r")_\((\d+), (\d+), (\d+), (\d+), (\d+)\)$")
_DIMS = {
    DEST_TERMS: "term",
    SRC_TERMS: "term",
    CONTRIB_DEST: "layer,component,src_pos",
    CONTRIB_SRC: "layer,component,src_pos",
}


@dataclass
class PromptRecord:
    """One prompt's outcome: its status, number of firings traced and per-firing results."""

    prompt: int
    status: str
    n_firings: int
    firings: Mapping[FiringKey, FiringRecord]


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


class _DatasetWriter:
    """Writes datasets as ``group.create_dataset(name, data=arr, compression="gzip" if big else None,
    track_times=False)`` then ``ds.attrs["dims"] = text`` would, through h5py's low-level API.

    The same HDF5 calls with the same property lists, types, dataspaces and values, and the datasets
    closed in the same order (each one once the next is written: the high-level code closes a dataset
    when its variable is rebound), so the file bytes are those of the high-level code. Only the
    per-dataset Python work goes: the creation property list (chunk shape, gzip), datatype and
    dataspace are made once per shape and dtype, the ``dims`` attribute value once per text.
    """

    def __init__(self, group: h5py.Group) -> None:
        self._loc = group.id
        self._dcpl: dict[tuple[tuple[int, ...], np.dtype, bool], h5p.PropDCID] = {}
        self._types: dict[np.dtype, h5t.TypeID] = {}
        self._spaces: dict[tuple[int, ...], h5s.SpaceID] = {}
        self._dims: dict[str, tuple[h5t.TypeID, h5t.TypeID, h5s.SpaceID, np.ndarray]] = {}
        self._current: h5d.DatasetID | None = None

    def write(self, name: str, arr: np.ndarray, compress: bool, dims: str) -> None:
        arr = np.asarray(arr, order="C")
        spec = (arr.shape, arr.dtype, compress)
        dcpl = self._dcpl.get(spec)
        if dcpl is None:  # h5py's own builder, as create_dataset calls it (chunk shape guessed alike)
            dcpl = h5py_filters.fill_dcpl(
                h5p.create(h5p.DATASET_CREATE), arr.shape, arr.dtype, None,
                "gzip" if compress else None, None, None, None, None, None, None,
            )  # fmt: skip
            dcpl.set_obj_track_times(False)
            dcpl.set_attr_creation_order(0)  # create_dataset's track_order=False default
            self._dcpl[spec] = dcpl
        tid = self._types.get(arr.dtype)
        if tid is None:
            tid = self._types[arr.dtype] = h5t.py_create(arr.dtype, logical=1)
        space = self._spaces.get(arr.shape)
        if space is None:
            space = self._spaces[arr.shape] = h5s.create_simple(arr.shape, None)
        dsid = h5d.create(self._loc, name.encode("utf-8"), tid, space, dcpl=dcpl)
        dsid.write(h5s.ALL, h5s.ALL, arr)
        self._current = dsid  # closes the previous dataset now, as rebinding ``ds`` would
        attr = self._dims.get(dims)
        if attr is None:
            text_type = h5t.string_dtype()
            value = np.asarray(dims, order="C", dtype=text_type).view(dtype=text_type)
            attr = (
                h5t.py_create(text_type, logical=True),
                h5t.py_create(text_type),
                h5s.create_simple(()),
                value,
            )
            self._dims[dims] = attr
        htype, mtype, attr_space, value = attr
        aid = h5a.create(dsid, b"dims", htype, attr_space)
        aid.write(value, mtype=mtype)
        aid.close()

    def close(self) -> None:
        """Close the last dataset (as the high-level code does when its function returns)."""
        self._current = None


def _write_firings(f: h5py.File, firings: Mapping[FiringKey, FiringRecord]) -> None:
    """One dataset per firing and kind, in key order; ``firings`` is read one firing at a time."""
    writer = _DatasetWriter(f)
    for key in sorted(firings):
        rec = firings[key]
        arrays = {
            DEST_TERMS: np.asarray(rec.dest_terms, dtype=np.int64),
            SRC_TERMS: np.asarray(rec.src_terms, dtype=np.int64),
            CONTRIB_DEST: np.asarray(rec.contrib_dest),
            CONTRIB_SRC: np.asarray(rec.contrib_src),
        }
        for kind, arr in arrays.items():
            writer.write(dataset_name(kind, key), arr, arr.size > 64, _DIMS[kind])
    writer.close()


def _write_prompt_table(f: h5py.File, prompts: Sequence[PromptRecord]) -> None:
    ordered = sorted(prompts, key=lambda r: r.prompt)
    f.create_dataset(
        f"{PROMPT_TABLE}/prompt",
        data=np.array([r.prompt for r in ordered], dtype=np.int64),
        track_times=False,
    )
    f.create_dataset(
        f"{PROMPT_TABLE}/status",
        data=np.array([STATUSES.index(r.status) for r in ordered], dtype=np.int8),
        track_times=False,
    )
    f.create_dataset(
        f"{PROMPT_TABLE}/n_firings",
        data=np.array([r.n_firings for r in ordered], dtype=np.int64),
        track_times=False,
    )
    f[PROMPT_TABLE].attrs["status_codes"] = ",".join(STATUSES)


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


def _read_prompt_table(f: h5py.File) -> dict[int, tuple[str, int]]:
    """prompt id -> (status, n_firings) from the file's prompt table."""
    ids, codes, counts = (f[f"{PROMPT_TABLE}/{k}"][()] for k in ("prompt", "status", "n_firings"))
    try:
        return {int(p): (STATUSES[int(c)], int(n)) for p, c, n in zip(ids, codes, counts, strict=True)}
    except (IndexError, ValueError) as err:
        raise _damaged(f.filename, err) from err


def read_prompt_table(path: Path | str) -> dict[int, tuple[str, int]]:
    """prompt id -> (status, n_firings) of a shard or merged result file."""
    with open_results(path) as f:
        return _read_prompt_table(f)


def _firing_names(f: h5py.File) -> list[str]:
    """The names of every firing dataset of a result or part file (everything but the prompt table)."""
    return [n for n in f.keys() if n != PROMPT_TABLE]


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
    lazy = _FileFirings(f, names)
    return {key: lazy[key] for key in lazy}


class _FileFirings(Mapping[FiringKey, FiringRecord]):
    """The firings of an open result or part file, each read on lookup (names checked up front)."""

    def __init__(self, f: h5py.File, names: Iterable[str]) -> None:
        self._f = f
        found: dict[FiringKey, dict[str, str]] = {}
        for name in names:
            if name == PROMPT_TABLE:
                continue
            kind, key = parse_dataset_name(name)
            found.setdefault(key, {})[kind] = name
        for key, kinds in found.items():
            missing = [k for k in _KINDS if k not in kinds]
            if missing:
                raise ValueError(f"firing {key} lacks datasets {missing} in {f.filename}")
        self._names = found

    def dataset(self, key: FiringKey, kind: str) -> str:
        """The name of ``key``'s dataset of ``kind``."""
        return self._names[key][kind]

    def __getitem__(self, key: FiringKey) -> FiringRecord:
        names = self._names[key]
        return FiringRecord(*(self._f[names[kind]][()] for kind in _KINDS))

    def __iter__(self) -> Iterator[FiringKey]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def write_results(path: Path, parts: Sequence[PromptRecord]) -> Path:
    """Write a result file (shard or merged) from prompt records, atomically, in prompt order."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for rec in sorted(parts, key=lambda r: r.prompt):
            _write_firings(f, rec.firings)
        _write_prompt_table(f, parts)
    return path


def build_results(path: Path, results_dir: Path, prompts: Iterable[int]) -> Path:
    """Collect the part files of ``prompts`` into the result file ``path``.

    The same datasets, in the same order, as :func:`write_results` of every :func:`read_part` (names,
    dtypes, shapes, values, compression and ``dims`` attributes), but each dataset is copied as stored
    (HDF5 object copy: no decompression and recompression), one at a time, so that the parts of long
    prompts never sit in memory and merging costs a fraction of writing.
    """
    table: list[PromptRecord] = []
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for p in sorted(prompts):
            src = part_path(results_dir, p)
            try:
                with open_results(src) as part:
                    firings = _FileFirings(part, part.keys())
                    status, n = str(part.attrs["status"]), int(part.attrs["n_firings"])
                    for key in sorted(firings):
                        for kind in _KINDS:
                            name = firings.dataset(key, kind).encode("utf-8")
                            # Group.copy's HDF5 call, without opening the dataset first
                            h5o.copy(part.id, name, f.id, name, None, h5py_base.dlcpl)
                    table.append(PromptRecord(int(part.attrs["prompt"]), status, n, {}))
            except ValueError as err:
                if isinstance(err, DamagedResultsError):
                    raise
                raise _damaged(src, err) from err
        _write_prompt_table(f, table)
    return path


def read_part_status(path: Path) -> str:
    """The status a part file records (``traced`` or a skip reason), without reading its firings."""
    try:
        with open_results(path) as f:
            return str(f.attrs["status"])
    except ValueError as err:
        if isinstance(err, DamagedResultsError):
            raise
        raise _damaged(path, err) from err


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
            names = _firing_names(f)
            if prompt is not None:
                names = [n for n in names if parse_dataset_name(n)[1][0] == prompt]
            return _read_firings(f, names)

    def iter_keys(self) -> Iterator[FiringKey]:
        with open_results(self.path) as f:
            for name in f.keys():
                if name.startswith(f"{DEST_TERMS}_("):
                    yield parse_dataset_name(name)[1]


# ----------------------------------------------------------------------------- term lengths


@dataclass
class TermLengths:
    """What the selected-term datasets of result files say without reading any contribution tensor.

    ``rows``: per firing ``(key, n_dest_terms, n_src_terms)`` in key order; ``n_heads``: from the
    contribution shapes ``(layer, H+2, d+1)`` (None without firings); ``term_bound``: the largest
    selected term index + 1 (a lower bound of ``d_head``); ``prompts``: the prompt table.
    """

    rows: list[tuple[FiringKey, int, int]]
    n_heads: int | None
    term_bound: int
    prompts: dict[int, tuple[str, int]]


def read_term_lengths(paths: Sequence[Path]) -> TermLengths:
    """:class:`TermLengths` of one or more result files (merged or shards).

    Reads dataset shapes only, except the term datasets themselves (small) for the index bound.
    """
    lengths: dict[FiringKey, dict[str, int]] = {}
    n_heads: int | None = None
    top = 0
    prompts: dict[int, tuple[str, int]] = {}
    for path in paths:
        with open_results(path) as f:
            if PROMPT_TABLE in f:
                prompts.update(_read_prompt_table(f))
            for name in tqdm(_firing_names(f), desc=f"read {path.name}", leave=False):
                kind, key = parse_dataset_name(name)
                if kind in (DEST_TERMS, SRC_TERMS):
                    ds = f[name]
                    lengths.setdefault(key, {})[kind] = int(ds.shape[0])
                    if ds.shape[0]:
                        top = max(top, int(np.max(ds[()])) + 1)
                elif n_heads is None:
                    n_heads = int(f[name].shape[1]) - EXTRA_COMPONENTS
    rows = [(key, v.get(DEST_TERMS, 0), v.get(SRC_TERMS, 0)) for key, v in sorted(lengths.items())]
    return TermLengths(rows, n_heads, top, prompts)


def result_files(arts: RunArtifacts) -> list[Path]:
    """The run's merged tracing results, else its shard files, else a MissingArtifactError."""
    merged = arts.tracing_results()
    if merged.is_file():
        return [merged]
    shards = arts.tracing_result_shards()
    if shards:
        logger.info("no merged tracing results; reading %d shard files", len(shards))
        return shards
    arts.require(merged, "tracing_results")
    return [merged]  # unreachable: require raised


# ----------------------------------------------------------------------------- selected terms


class MissingFiringError(AttncommError, KeyError):
    """A graph edge whose downstream firing has no record in the tracing results."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SelectedTerms:
    """``terms(firing, side)`` from a tracing result file, loaded one prompt at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._results = TracingResults(path)
        self._by_prompt: dict[int, dict[FiringKey, tuple[list[int], list[int]]]] = {}

    def __call__(self, key: FiringKey, side: str) -> list[int]:
        prompt = int(key[0])
        if prompt not in self._by_prompt:
            self._by_prompt[prompt] = {
                k: (rec.dest_terms.tolist(), rec.src_terms.tolist())
                for k, rec in self._results.firings(prompt).items()
            }
        firing = self._by_prompt[prompt].get(tuple(int(k) for k in key))  # type: ignore[arg-type]
        if firing is None:
            raise MissingFiringError(
                f"{self.path} holds no firing (prompt, layer, head, dest, src) = {key}: the combined graph "
                "and the tracing results come from different runs; re-run stage=trace then stage=unify"
            )
        return firing[0] if side == "d" else firing[1]
