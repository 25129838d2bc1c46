"""Cache of processed model weights: skip TransformerLens's weight processing on every later load.

Loading a model boots a ``TransformerBridge`` and runs ``enable_compatibility_mode()``, whose weight
processing (``fold_ln``, ``center_writing_weights``, ``center_unembed``, ``fold_value_biases``) takes
most of the load time (about 7 s of a 10 s load of a 124M-parameter GPT-2 on a CPU). That processing
is a pure function of the checkpoint: TransformerLens 4.3 computes it in
``ProcessWeights.process_weights(state_dict, cfg, ...)`` and hands the result to the bridge's
components. :func:`processed_weights_cache` wraps exactly that call while the bridge is processed:

* first load: the real function runs and its result is written to
  ``{cache_dir}/weights/{model}-{key16}.safetensors`` (atomically);
* later loads: the stored result is returned instead (read with ``safetensors``), so the bridge
  receives the same tensors without recomputing them; everything else the bridge does is unchanged.

The key (:func:`cache_key`) is the checkpoint's content hash (the weight files, as the provenance keys
hash them, remembered per file by path, size and modification time so that a warm load does not re-read
gigabytes, and ``config.json``), the TransformerLens, transformers, torch and attncomm versions, the
dtype and the processing options. Any change gives another file name, so a changed checkpoint, dtype or
version is processed again. A cache file that cannot be read (truncated, garbage, wrong metadata or key,
a different input state dict) is reported with one warning, deleted and rebuilt -- never used. The data
bytes carry no checksum (hashing the file would cost as much as the load saves), so a bit flip inside a
tensor that leaves the file structurally valid is not detected.

Switch: ``model.weight_cache=false`` processes the weights every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from attncomm.io.provenance import config_hash, weight_files, weights_hash

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "cache_file",
    "cache_key",
    "checkpoint_files",
    "checkpoint_hash",
    "processed_weights_cache",
    "read_tensors",
    "save_tensors",
    "versions",
]

#: bump when the file layout or the key changes
CACHE_FORMAT = 1
#: the processing attncomm asks of TransformerLens (models.load_model: enable_compatibility_mode())
RECIPE = "fold_ln,center_writing_weights,center_unembed,fold_value_biases"


def versions() -> dict[str, str]:
    """Versions of the packages whose code produces the processed weights."""
    out = {}
    for pkg in ("transformer_lens", "transformers", "torch", "attncomm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    if out["attncomm"] == "unknown":
        from attncomm import __version__

        out["attncomm"] = __version__
    return out


def checkpoint_files(source: Path) -> list[Path]:
    """The files that define a checkpoint directory's weights: ``config.json`` and the weight files."""
    files = weight_files(source)
    if not files:
        raise FileNotFoundError(f"no weight files in {source}")
    config = Path(source) / "config.json"
    return [config, *files] if config.is_file() else files


def checkpoint_hash(source: Path, memo_dir: Path | None = None) -> str:
    """SHA-256 over the checkpoint's weight files (names and contents) and its ``config.json``.

    The same content hash the provenance keys use (:func:`attncomm.io.provenance.weights_hash`, per-file
    digests remembered in ``memo_dir`` by path, size and ``mtime_ns``), plus the architecture
    (:func:`~attncomm.io.provenance.config_hash`) when the directory has a ``config.json``.
    """
    files = checkpoint_files(source)
    parts = [weights_hash(source, memo_dir)]
    if files[0].name == "config.json":
        parts.append(config_hash(source))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(source: Path, dtype: torch.dtype, memo_dir: Path | None = None) -> dict[str, Any]:
    """Everything the processed weights depend on (see the module docstring)."""
    return {
        "format": CACHE_FORMAT,
        "checkpoint_sha256": checkpoint_hash(source, memo_dir),
        "dtype": str(dtype).replace("torch.", ""),
        "recipe": RECIPE,
        **versions(),
    }


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_file(cache_dir: Path, short_name: str, key: dict[str, Any]) -> Path:
    """``{cache_dir}/weights/{short_name}-{first 16 hex digits of the key's hash}.safetensors``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in short_name)
    return Path(cache_dir) / "weights" / f"{safe}-{_key_digest(key)[:16]}.safetensors"


def _input_signature(state_dict: dict[str, Any]) -> str:
    """Hash of the input state dict's names, shapes and dtypes (not values: those are keyed by content)."""
    parts = [
        f"{k}:{tuple(v.shape)}:{v.dtype}" if isinstance(v, torch.Tensor) else f"{k}:{type(v).__name__}"
        for k, v in sorted(state_dict.items())
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write ``tensors`` (copies: the originals may share storage) atomically, with ``meta`` and the
    tensors' names as metadata (checked by :func:`read_tensors`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        copies = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(copies, tmp, metadata={**meta, "names": json.dumps(sorted(tensors))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_tensors(
    path: Path,
    key: dict[str, Any],
    device: torch.device | str,
    check: Callable[[dict[str, str]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a file :func:`save_tensors` wrote under ``key``; raise ``ValueError``
    for anything that is not exactly what was written (``check`` may raise it for other metadata,
    before any tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as fh:
        meta = fh.metadata() or {}
        if meta.get("key") != json.dumps(key, sort_keys=True):
            raise ValueError("its key does not match")
        if check is not None:
            check(meta)
        names = list(fh.keys())
        if sorted(names) != sorted(json.loads(meta.get("names", "[]"))):
            raise ValueError("its tensor names do not match its metadata")
        return {name: fh.get_tensor(name) for name in names}, meta


def _load(path: Path, key: dict[str, Any], signature: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Read a cache file; raise ``ValueError`` for anything that is not exactly what was written."""

    def same_input(meta: dict[str, str]) -> None:
        if meta.get("input_signature") != signature:
            raise ValueError("it was written for a different input state dict")

    return read_tensors(path, key, device, same_input)[0]


@contextlib.contextmanager
def processed_weights_cache(
    cache_dir: Path, short_name: str, source: Path, dtype: torch.dtype
) -> Iterator[dict[str, Any]]:
    """Serve TransformerLens's ``ProcessWeights.process_weights`` from / into the cache while inside.

    Yields a dict that reports what happened: ``{"path": Path, "hit": bool}`` (``hit`` is set once the
    bridge has asked for its processed weights).
    """
    from transformer_lens.weight_processing import ProcessWeights

    key = cache_key(source, dtype, Path(cache_dir) / "weights")
    path = cache_file(cache_dir, short_name, key)
    report: dict[str, Any] = {"path": path, "hit": None}
    original: Callable[..., dict[str, torch.Tensor]] = ProcessWeights.process_weights
    descriptor = ProcessWeights.__dict__["process_weights"]

    def cached(state_dict: dict[str, torch.Tensor], cfg: Any, *args: Any, **kwargs: Any) -> Any:
        signature = _input_signature(state_dict)
        device = next(
            (v.device for v in state_dict.values() if isinstance(v, torch.Tensor)), torch.device("cpu")
        )
        if path.is_file():
            try:
                out = _load(path, key, signature, device)
                report["hit"] = True
                logger.debug("processed weights of %s read from %s", short_name, path)
                return out
            except Exception as err:  # any unreadable file is rebuilt, never used
                logger.warning("weight cache file %s is unusable (%s); rebuilding it", path, err)
                with contextlib.suppress(OSError):
                    path.unlink()
        report["hit"] = False
        out = original(state_dict, cfg, *args, **kwargs)
        if all(isinstance(v, torch.Tensor) for v in out.values()):
            meta = {"key": json.dumps(key, sort_keys=True), "input_signature": signature}
            try:
                save_tensors(path, out, meta)
                logger.info("processed weights of %s cached in %s", short_name, path)
            except (OSError, RuntimeError, ValueError) as err:
                logger.warning("could not write the weight cache %s (%s); continuing without it", path, err)
        else:
            logger.warning("processed weights of %s hold non-tensor values; not cached", short_name)
        return out

    ProcessWeights.process_weights = staticmethod(cached)  # type: ignore[method-assign]
    try:
        yield report
    finally:
        ProcessWeights.process_weights = descriptor  # type: ignore[method-assign]
