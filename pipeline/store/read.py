"""Opening a results file (checked) and reading its rows and maps, fixed or ragged, with a
missing or unreadable dataset as one :class:`StoreError`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from .checksums import check_rows, sums_of
from .format import CHUNK_BYTES, IMAGE_TABLES, RAGGED, is_scale
from .validate import check_format, validate


def read_map(f: h5py.File, key: str, rows: Any = slice(None),
             verify: bool = False) -> np.ndarray | list[np.ndarray]:
    """Rows of map dataset ``key``. A fixed-size dataset reads as ``f[key][rows]``. A
    ragged one gives each image's map in its own shape: one array for an integer row, a
    list of arrays for a slice, a list of rows or a boolean mask.

    ``verify``: check the done rows read against their checksums (one :class:`StoreError`
    line for a damaged row); a no-op for datasets without checksums."""
    picked = _picked(f, rows) if verify else None
    # Status and checksums before the data: a row done by then was final when read.
    sums = sums_of(f, key, picked) if picked is not None else None
    if sums is not None:
        status = _at(f["images/status"], picked)
        values = _read_map(f, key, rows)
        one = isinstance(rows, (int, np.integer))
        check_rows(f, key, f.filename, picked, [values] if one else values, status, sums)
        return values
    return _read_map(f, key, rows)


def _picked(f: h5py.File, rows: Any) -> np.ndarray:
    """The row numbers ``rows`` selects, in order."""
    return np.atleast_1d(np.arange(f["images/status"].shape[0])[rows])


def _at(ds: h5py.Dataset, picked: np.ndarray) -> np.ndarray:
    """``ds[picked]`` in one read of the span they cover (h5py wants increasing indices)."""
    if not len(picked):
        return np.zeros(0, ds.dtype)
    lo, hi = int(picked.min()), int(picked.max()) + 1
    return ds[lo:hi][picked - lo]


def _read_map(f: h5py.File, key: str, rows: Any) -> np.ndarray | list[np.ndarray]:
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
              rows: Any = slice(None), verify: bool = True) -> np.ndarray:
    """``f[key][rows]``, with a missing or unreadable dataset, or (``verify``) a done row
    that fails its checksum, as one :class:`StoreError`. Only whole rows can be checked:
    a selection within rows (a tuple) is read unchecked."""
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise StoreError(f"{path} is damaged: /{key} is missing")
    try:
        if verify and not isinstance(rows, tuple):
            return read_map(f, key, rows, verify=True)
        return f[key][rows]
    except (OSError, ValueError) as e:  # a corrupted chunk, a wrong shape
        raise _damaged(path, key, e) from e


def read_map_rows(f: h5py.File, key: str, path: str | os.PathLike,
                  rows: Any, verify: bool = True) -> np.ndarray | list[np.ndarray]:
    """:func:`read_map` (fixed or ragged maps), with a missing or unreadable dataset, or
    (``verify``) a done row that fails its checksum, as one :class:`StoreError`."""
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise StoreError(f"{path} is damaged: /{key} is missing")
    try:
        return read_map(f, key, rows, verify=verify)
    except (OSError, ValueError, KeyError) as e:  # a corrupted chunk, a wrong shape
        raise _damaged(path, key, e) from e


def read_column(f: h5py.File, key: str, rows: Any = slice(None),
                verify: bool = True) -> np.ndarray:
    """Rows of one per-image column (``images/path``, ``targets/class``, ...): strings
    decoded to ``str`` (an object array, or one ``str`` for an integer row), numbers through
    :func:`read_rows` (done rows checked against their checksums with ``verify``); a
    missing or unreadable column is one :class:`StoreError`."""
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise StoreError(f"{f.filename} is damaged: /{key} is missing")
    ds = f[key]
    if ds.dtype.kind not in "OS":
        return read_rows(f, key, f.filename, rows, verify)
    try:
        values = ds.asstr()[rows]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _damaged(f.filename, key, e) from e
    return values if isinstance(values, str) else np.asarray(values, dtype=object)


def read_table(f: h5py.File, group: str, rows: Any = slice(None),
               verify: bool = True) -> dict[str, np.ndarray]:
    """A per-image table (``images``, ``targets`` or ``predictions``) as {name: rows}, each
    column read by :func:`read_column`. Dimension scales are left out."""
    if group not in IMAGE_TABLES:
        raise StoreError(f"{group!r} is not a per-image table (one of {', '.join(IMAGE_TABLES)})")
    if group not in f or not isinstance(f[group], h5py.Group):
        raise StoreError(f"{f.filename} is damaged: /{group} is missing")
    return {name: read_column(f, f"{group}/{name}", rows, verify)
            for name, ds in f[group].items()
            if isinstance(ds, h5py.Dataset) and not is_scale(ds)}
