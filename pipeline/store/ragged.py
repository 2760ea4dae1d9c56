"""Ragged maps (runs at native resolution, format version 2): each map's values stored flat,
one image after another, with a row index (offset, shape) fixed at creation."""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np
import xxhash

from ..errors import StoreError
from .format import CHUNK_BYTES, INPUT_SIZE, RAGGED, RAGGED_VERSION, attr_list


def ragged_keys(f: h5py.File) -> list[str]:
    """The map datasets stored ragged (flat values + row index): root ``ragged_maps``."""
    return [str(k) for k in attr_list(f.attrs.get("ragged_maps"))]


DIGEST = "index_xxh3"  # attribute of /ragged/<map>: the index as written at creation or merge


def index_digest(offsets: np.ndarray, shapes: np.ndarray) -> str:
    """xxh3_64 (hex) of a ragged map's row index (offsets int64, shapes int32, little
    endian): the index never changes after creation, so any edit of it (a 3x4 map made
    4x3, same number of values) shows."""
    h = xxhash.xxh3_64()
    h.update(np.ascontiguousarray(offsets, "<i8").tobytes())
    h.update(np.ascontiguousarray(shapes, "<i4").tobytes())
    return h.hexdigest()


def create_ragged(f: h5py.File, key: str, shapes: np.ndarray, dtype: Any) -> h5py.Dataset:
    """The flat values of ragged map ``key`` and its row index, sized exactly for
    ``shapes`` ((N, ndim): each image's map shape). Offsets are fixed here, in row order,
    so a row's place never depends on when or by whom it is written."""
    shapes = np.asarray(shapes, dtype=np.int64).reshape(len(shapes), -1)
    sizes = shapes.prod(axis=1) if len(shapes) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)[:len(shapes)]
    total = int(sizes.sum())
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dt = np.dtype(dtype)
    # No image has values (all failed at creation): HDF5 takes no chunks for 0 elements.
    chunks = (min(total, CHUNK_BYTES // dt.itemsize),) if total else None
    group_name, _, name = key.partition("/")
    ds = f.require_group(group_name).create_dataset(name, shape=(total,), dtype=dt,
                                                   chunks=chunks, dcpl=dcpl)
    ds.attrs["encoding"] = RAGGED
    index = f.require_group(f"{RAGGED}/{key}")
    index.create_dataset("offset", data=offsets)
    index.create_dataset("shape", data=shapes.astype(np.int32))
    index.attrs[DIGEST] = index_digest(offsets, shapes)
    return ds


def check_ragged(f: h5py.File, key: str, n: int | None, path: str | os.PathLike) -> None:
    """A ragged map's values and index agree: a version 2 file, one offset and shape per
    image, and every image's values inside the flat dataset."""
    if int(f.attrs.get("format_version", 0)) < RAGGED_VERSION:
        raise StoreError(f"{path} is damaged: ragged maps in a format_version "
                         f"{int(f.attrs.get('format_version', 0))} file")
    where = f"{RAGGED}/{key}"
    for part in (key, f"{where}/offset", f"{where}/shape", INPUT_SIZE):
        if part not in f or not isinstance(f[part], h5py.Dataset):
            raise StoreError(f"{path} is damaged: ragged map {key} lacks /{part}")
    values, offsets, shapes = f[key], f[f"{where}/offset"][:], f[f"{where}/shape"][:]
    if (values.ndim != 1 or values.attrs.get("encoding") != RAGGED or offsets.shape != (n,)
            or shapes.ndim != 2 or shapes.shape[0] != n):
        raise StoreError(f"{path} is damaged: ragged map {key} has values {values.shape}, "
                         f"offsets {offsets.shape}, shapes {shapes.shape} for {n} images")
    ends = offsets + shapes.astype(np.int64).prod(axis=1)
    if (shapes < 0).any() or (offsets < 0).any() or (ends > values.shape[0]).any():
        raise StoreError(f"{path} is damaged: the index of ragged map {key} points outside "
                         f"its {values.shape[0]} values")
    # Creation (and merge, shard after shard) lays the images out back to back in row order:
    # any other index (overlapping or shuffled places) would give rows each other's values.
    packed = np.concatenate([[0], ends[:-1]]) if n else offsets
    if n and (offsets != packed).any():
        row = int(np.flatnonzero(offsets != packed)[0])
        raise StoreError(f"{path} is damaged: the index of ragged map {key} is not laid out "
                         f"image after image (row {row} at {int(offsets[row])}, expected "
                         f"{int(packed[row])})")
    stored = f[where].attrs.get(DIGEST)
    if stored is not None and stored != index_digest(offsets, shapes):
        raise StoreError(f"{path} is damaged: the index of ragged map {key} (/{where}) was "
                         "changed since the file was written (its index_xxh3 differs)")


def is_ragged(f: h5py.File, key: str) -> bool:
    """Whether dataset ``key`` holds flat values of a ragged map."""
    return f[key].attrs.get("encoding") == RAGGED


def map_ndim(f: h5py.File, key: str) -> int:
    """``ndim`` of the map dataset as if it were one (N, ...) array: 1 + one image's ndim."""
    if is_ragged(f, key):
        return 1 + int(f[f"{RAGGED}/{key}/shape"].shape[1])
    return int(f[key].ndim)


def row_shape(f: h5py.File, key: str, row: int) -> tuple[int, ...]:
    """Shape of image ``row``'s map in dataset ``key`` (fixed or ragged)."""
    if is_ragged(f, key):
        return tuple(int(v) for v in f[f"{RAGGED}/{key}/shape"][row])
    return tuple(f[key].shape[1:])
