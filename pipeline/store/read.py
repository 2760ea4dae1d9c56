"""Opening a results file (checked) and reading its rows and maps, fixed or ragged, with a
missing or unreadable dataset as one :class:`StoreError`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from .format import CHUNK_BYTES, RAGGED
from .validate import check_format, validate


def read_map(f: h5py.File, key: str, rows: Any = slice(None)) -> np.ndarray | list[np.ndarray]:
    """Rows of map dataset ``key``. A fixed-size dataset reads as ``f[key][rows]``. A
    ragged one gives each image's map in its own shape: one array for an integer row, a
    list of arrays for a slice, a list of rows or a boolean mask."""
    ds = f[key]
    if ds.attrs.get("encoding") != RAGGED:
        return ds[rows]
    index = f[f"{RAGGED}/{key}"]
    if isinstance(rows, (int, np.integer)):
        offset, shape = int(index["offset"][rows]), tuple(index["shape"][rows].tolist())
        size = int(np.prod(shape, dtype=np.int64))
        return ds[offset:offset + size].reshape(shape) if size else np.zeros(shape, ds.dtype)
    picked = np.arange(index["offset"].shape[0])[rows]
    offsets = index["offset"][:][picked]
    shapes = index["shape"][:][picked]
    sizes = shapes.astype(np.int64).prod(axis=1)
    if not len(picked):
        return []
    lo, hi = int(offsets.min()), int((offsets + sizes).max())
    if hi - lo <= 2 * int(sizes.sum()) + CHUNK_BYTES:  # one read covers them (a run of rows)
        span = ds[lo:hi]
        return [span[o - lo:o - lo + z].reshape(tuple(sh)) for o, z, sh in
                zip(offsets.tolist(), sizes.tolist(), shapes, strict=True)]
    return [ds[o:o + z].reshape(tuple(sh)) for o, z, sh in
            zip(offsets.tolist(), sizes.tolist(), shapes, strict=True)]


def open_results(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> h5py.File:
    """Open a results file after checking that it is one, that we know its version and
    that its structure is sound. Readers see a consistent "done" set while a run writes.
    ``kwargs`` go to ``h5py.File``."""
    if not Path(path).is_file():
        raise StoreError(f"no results file at {path}")
    # Writers take no HDF5 file lock (our own writer_lock guards them; HDF5's exclusive one
    # would keep every reader out during a run). Readers keep HDF5's default, so that a
    # user's plain h5py.File(path) in the same process opens beside a Run.
    kwargs.setdefault("locking", None if mode == "r" else False)
    try:
        try:
            f = h5py.File(path, mode, **kwargs)
        except OSError as e:
            if mode != "r" or kwargs["locking"] is False or "lock" not in str(e):
                raise
            # Another program writes it holding HDF5's exclusive lock (camsweep's writers
            # take none): read it without, as one reads a run in progress.
            f = h5py.File(path, mode, **{**kwargs, "locking": False})
    except OSError as e:
        raise StoreError(f"cannot open {path} as HDF5: {str(e).splitlines()[0]}") from e
    try:
        check_format(f, path)
        validate(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _damaged(path: str | os.PathLike, key: str, e: BaseException) -> StoreError:
    return StoreError(f"{path} is damaged: cannot read /{key}: "
                      f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")


def read_rows(f: h5py.File, key: str, path: str | os.PathLike,
              rows: Any = slice(None)) -> np.ndarray:
    """``f[key][rows]``, with a missing or unreadable dataset as one :class:`StoreError`."""
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise StoreError(f"{path} is damaged: /{key} is missing")
    try:
        return f[key][rows]
    except (OSError, ValueError) as e:  # a corrupted chunk, a wrong shape
        raise _damaged(path, key, e) from e


def read_map_rows(f: h5py.File, key: str, path: str | os.PathLike,
                  rows: Any) -> np.ndarray | list[np.ndarray]:
    """:func:`read_map` (fixed or ragged maps), with a missing or unreadable dataset as one
    :class:`StoreError`."""
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise StoreError(f"{path} is damaged: /{key} is missing")
    try:
        return read_map(f, key, rows)
    except (OSError, ValueError, KeyError) as e:  # a corrupted chunk, a wrong shape
        raise _damaged(path, key, e) from e
