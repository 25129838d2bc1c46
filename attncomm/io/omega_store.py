"""HDF5 cache of Omega SVDs: one file per layer, datasets named as the reference's Pythia cache.

``omega/layer_{l}.h5`` holds, for each head ``h``, side ``d`` (dest, ``Omega_d``) or ``s`` (source,
``Omega_s``) and rotary offset ``delta`` (always 0 for non-rotary models), the datasets
``U_{side}_{l}_{h}_{delta}`` ``[d_a d_head]``, ``S_{side}_{l}_{h}_{delta}`` ``[d_head]`` and
``VT_{side}_{l}_{h}_{delta}`` ``[d_head d_b]``, each with a ``dims`` attribute naming its dimensions
(``d_a``/``d_b`` are ``d_model`` or ``d_model+1`` for the bias-augmented side). Entries are only ever
added: a later run that needs more offsets computes and appends just those.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np
import torch

from attncomm.core.omega_factors import OmegaCache
from attncomm.io.artifacts import atomic_path

_KEY = re.compile(r"^S_([ds])_(\d+)_(\d+)_(\d+)$")


def layer_file(directory: Path, layer: int) -> Path:
    return directory / f"layer_{layer}.h5"


def stored_keys(directory: Path, layer: int) -> set[tuple[str, int, int]]:
    """``(side, head, delta)`` entries already in the layer's file."""
    path = layer_file(directory, layer)
    if not path.is_file():
        return set()
    with h5py.File(path, "r") as f:
        found = set()
        for name in f.keys():
            m = _KEY.match(name)
            if m:
                found.add((m.group(1), int(m.group(3)), int(m.group(4))))
        return found


def _dims(side: str, augmented: bool) -> tuple[str, str]:
    aug = "d_model+1" if augmented else "d_model"
    # Omega_d = [W_Q W_K^T | W_Q b_K^T] is D x (D+1); Omega_s = [W_Q W_K^T ; b_Q W_K^T] is (D+1) x D
    return ("d_model", aug) if side == "d" else (aug, "d_model")


def update_layer(
    directory: Path, cache: OmegaCache, layer: int, sides: Iterable[str], deltas: Iterable[int]
) -> int:
    """Add the missing ``(side, head, delta)`` SVDs of ``layer`` to its file; returns how many were added."""
    have = stored_keys(directory, layer)
    want = [(side, h, d) for side in sides for d in deltas for h in range(cache.n_heads)]
    missing = [k for k in want if k not in have]
    if not missing:
        return 0
    path = layer_file(directory, layer)
    with atomic_path(path) as tmp:
        if path.is_file():
            tmp.write_bytes(path.read_bytes())
        with h5py.File(tmp, "a") as f:
            f.attrs["layer"] = layer
            f.attrs["augmented"] = cache.augmented
            for side, head, delta in missing:
                U, S, V = cache.get(layer, head, delta, side)  # type: ignore[arg-type]
                rows, cols = _dims(side, cache.augmented)
                for name, arr, dims in (
                    ("U", U, f"{rows},d_head"),
                    ("S", S, "d_head"),
                    ("VT", V.transpose(0, 1), f"d_head,{cols}"),
                ):
                    ds = f.create_dataset(
                        f"{name}_{side}_{layer}_{head}_{delta}",
                        data=arr.detach().cpu().numpy(),
                        track_times=False,
                    )
                    ds.attrs["dims"] = dims
    return len(missing)


def read_svd(directory: Path, layer: int, head: int, side: str, delta: int) -> tuple[torch.Tensor, ...]:
    """``(U, S, V)`` of one head from the cache (V, not V^T), as float tensors."""
    path = layer_file(directory, layer)
    key = f"{side}_{layer}_{head}_{delta}"
    with h5py.File(path, "r") as f:
        if f"S_{key}" not in f:
            raise KeyError(f"{path} has no Omega SVD for side={side} head={head} delta={delta}")
        U, S, VT = (np.asarray(f[f"{n}_{key}"]) for n in ("U", "S", "VT"))
    return torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(VT).transpose(0, 1).contiguous()
