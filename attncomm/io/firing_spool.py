"""A disk spool of one prompt's per-firing results, so that tracing a long prompt keeps none in memory.

Each firing's result (selected terms of both sides, both contribution tensors ``[l, H+2, d+1]``) is
appended to an anonymous temporary file as raw bytes as soon as its chunk is traced; only a small
index (offset, shapes, dtypes per firing) stays in memory. The spool is a read-only
``Mapping[FiringKey, FiringResult]`` afterwards: each lookup reads that firing back (tensors on the
CPU), so a writer (:func:`attncomm.io.results.write_part`) can go through the firings one at a time
and the part file is byte for byte the one an in-memory dict would give. The file is deleted when the
spool is closed or garbage collected (it has no name on disk).

Size on disk: ``2 x l x (H + 2) x (d + 1)`` values per firing (about 0.7 MB for a late firing of a
1023-token prompt on a 12-layer GPT-2 small in float32).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from attncomm.core.prompt_graph import FiringResult

__all__ = ["FiringSpool"]

#: the four arrays of a firing, in file order
_FIELDS = ("dest_terms", "src_terms", "contrib_dest", "contrib_src")


class FiringSpool(Mapping[tuple[int, ...], FiringResult]):
    """Per-firing results appended to an anonymous temporary file in ``directory`` (default: the
    system's temporary directory), readable back as a mapping. Keys are kept as given."""

    def __init__(self, directory: str | Path | None = None) -> None:
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory)
        self._end = 0
        self._dirty = False
        self._index: dict[tuple[int, ...], list[tuple[int, tuple[int, ...], np.dtype]]] = {}

    def add(self, key: tuple[int, ...], result: FiringResult) -> None:
        """Append ``result`` under ``key`` (a repeated key keeps the last result)."""
        entries = []
        for name in _FIELDS:
            arr = np.ascontiguousarray(getattr(result, name).detach().cpu().numpy())
            data = arr.tobytes()
            self._file.write(data)
            entries.append((self._end, tuple(arr.shape), arr.dtype))
            self._end += len(data)
        self._dirty = True
        self._index[tuple(key)] = entries

    def prefixed_sink(self, *prefix: int) -> Callable[[tuple[int, ...], FiringResult], None]:
        """A sink for :func:`~attncomm.core.prompt_graph.trace_prompt` storing ``(*prefix, *key)``."""

        def sink(key: tuple[int, ...], result: FiringResult) -> None:
            self.add((*prefix, *key), result)

        return sink

    def __getitem__(self, key: tuple[int, ...]) -> FiringResult:
        entries = self._index[tuple(key)]
        if self._dirty:
            self._file.flush()
            self._dirty = False
        arrays = []
        for offset, shape, dtype in entries:
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            buf = os.pread(self._file.fileno(), n, offset) if n else b""
            arrays.append(torch.from_numpy(np.frombuffer(buf, dtype=dtype).reshape(shape).copy()))
        return FiringResult(*arrays)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        """Bytes written to the spool file."""
        return self._end

    def close(self) -> None:
        """Delete the spool file (the mapping is empty afterwards)."""
        self._index.clear()
        self._file.close()

    def __del__(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
