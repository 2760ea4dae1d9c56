"""Row checksums: what makes a done row's bytes checkable later (``stage=verify``) and by any
reader (``read_map(..., verify=True)``).

``/checksums/rows`` (N, D) uint64 holds, for each image and each of the D datasets the
writer fills row by row (named in order by its ``datasets`` attribute, JSON), xxh3_64 of
the row's values as stored (the dataset's dtype, C order; a ragged map: the row's span of
flat values). The writer computes it from the very array it writes and stores a batch's
checksums in one write, after the data is flushed and before the status, so every done row
carries proof of what was written. 0 means "none written" (pending or failed rows, or a
row stored by other means than the writer): not checked. Files written before checksums
have no ``/checksums`` group; they stay readable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import h5py
import numpy as np
import xxhash

from ..errors import StoreError
from .format import DONE

CHECKSUMS = "checksums/rows"
ROW_DATASETS = ("images/size", "images/box", "images/nonfinite")  # written per row with maps


def digest(row: np.ndarray) -> int:
    """xxh3_64 of one row's bytes (C order, as stored)."""
    if isinstance(row, np.ndarray) and row.flags.c_contiguous:
        return xxhash.xxh3_64_intdigest(row)  # its buffer: the raw bytes, no copy
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(row).tobytes())


def row_digests(rows: Iterable[np.ndarray]) -> np.ndarray:
    """(n,) uint64 checksums of ``rows`` (the first axis of an array, or a list of rows)."""
    return np.fromiter((digest(r) for r in rows), dtype=np.uint64)


def create_checksums(f: h5py.File, keys: Iterable[str], n: int) -> None:
    """At creation: a zero (none written) checksum per row of every dataset in ``keys``."""
    keys = list(keys)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    chunks = (min(max(n, 1), max(1, (1 << 20) // (8 * len(keys)))), len(keys))
    ds = f.create_dataset(CHECKSUMS, shape=(n, len(keys)), dtype=np.uint64, chunks=chunks,
                          dcpl=dcpl)
    ds.attrs["datasets"] = json.dumps(keys)
    ds.attrs["checksum"] = "xxh3_64 of each row as stored; 0: none written"
    ds.attrs["dims"] = json.dumps(["image", "dataset"])


def checksummed(f: h5py.File) -> dict[str, int]:
    """{dataset: column of /checksums/rows} (empty for files of before checksums)."""
    ds = f.get(CHECKSUMS)
    if not isinstance(ds, h5py.Dataset):
        return {}
    try:
        keys = json.loads(ds.attrs.get("datasets", "[]"))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{f.filename} is damaged: /{CHECKSUMS} names no datasets") from e
    if (ds.ndim != 2 or ds.dtype != np.uint64 or not isinstance(keys, list)
            or len(keys) != ds.shape[1]):
        raise StoreError(f"{f.filename} is damaged: /{CHECKSUMS} has shape {ds.shape} "
                         f"{ds.dtype} for {len(keys) if isinstance(keys, list) else '?'} "
                         "datasets")
    return {str(k): i for i, k in enumerate(keys) if str(k) in f}


def sums_of(f: h5py.File, key: str, rows: slice | np.ndarray) -> np.ndarray | None:
    """The checksums of ``key`` at ``rows`` (a slice, or sorted row numbers), or None when
    it has none."""
    column = checksummed(f).get(key)
    if column is None:
        return None
    ds = f[CHECKSUMS]
    if isinstance(rows, slice):
        return ds[rows, column]
    if not len(rows):
        return np.zeros(0, np.uint64)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return ds[lo:hi, column][rows - lo]


def damaged_rows(f: h5py.File, key: str, rows: np.ndarray, values: Any,
                 status: np.ndarray, sums: np.ndarray) -> list[tuple[int, str]]:
    """(row, reason) of the done rows among ``rows`` whose ``values`` (one per row, read
    after ``status`` and ``sums``) do not match their checksum."""
    bad = []
    for pos, row in enumerate(rows.tolist()):
        # 0: none written (a row stored by other means than the writer): nothing to check.
        if status[pos] == DONE and sums[pos] != 0 and digest(values[pos]) != int(sums[pos]):
            bad.append((row, "checksum mismatch"))
    return bad


def check_rows(f: h5py.File, key: str, path: str | os.PathLike, rows: np.ndarray,
               values: Any, status: np.ndarray, sums: np.ndarray) -> None:
    """Raise one :class:`StoreError` line for the first damaged row read."""
    bad = damaged_rows(f, key, rows, values, status, sums)
    if bad:
        row, reason = bad[0]
        more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
        raise StoreError(f"{path} is damaged: row {row} of /{key}: {reason}{more}; run "
                         "stage=verify to list every damaged row")
