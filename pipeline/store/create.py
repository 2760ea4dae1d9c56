"""Creating a results file: complete, every dataset at its final shape and its disk blocks
reserved, built under a temporary name and renamed into place (``atomic.atomic_output``)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .atomic import atomic_output, remove_temporaries
from .checksums import CHECKSUMS, ROW_DATASETS, create_checksums
from .dims import attach_dims, dataset_dims
from .format import (
    CHUNK_BYTES,
    ERROR_BYTES,
    ERROR_STR,
    FAILED,
    FIXED_VERSION,
    FORMAT,
    RAGGED,
    RAGGED_VERSION,
    STR,
    kind_of,
    walk,
)
from .isolate import run_isolated
from .ragged import create_ragged
from .space import check_room, no_space, space_error, write_error


def chunk_rows(row_shape: tuple[int, ...], itemsize: int, n: int) -> int:
    """Rows per chunk: about 1 MB, at least one row, at most all rows."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    return int(min(max(n, 1), max(1, CHUNK_BYTES // row_bytes)))


def _preallocated(group: h5py.Group, name: str, n: int, row_shape: tuple[int, ...],
                  dtype: Any, fill: bool = False) -> h5py.Dataset:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    # Rows count only once their status is done, so most datasets need no fill.
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if fill else h5py.h5d.FILL_TIME_NEVER)
    dt = np.dtype(dtype)
    chunks = (chunk_rows(row_shape, dt.itemsize, n), *row_shape)
    return group.create_dataset(name, shape=(n, *row_shape), dtype=dt, chunks=chunks, dcpl=dcpl)


def _jsonable(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else value


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp-*`` left by a creation that was killed. Call with the file's
    writer lock held: no live process is writing one then."""
    remove_temporaries(path)


def create_results(
    path: Path,
    paths: list[str],
    labels: np.ndarray,
    index: np.ndarray,
    layout: Mapping[str, tuple[tuple[int, ...], Any]],
    attrs: Mapping[str, Any],
    method_kind: str | None = None,
    ragged: Mapping[str, np.ndarray] | None = None,
    input_size: np.ndarray | None = None,
    failed: Mapping[int, str] | None = None,
) -> str:
    """Write a complete, empty results file (all rows pending) and rename it into place.

    ``layout`` maps dataset paths ("gradcam/layer4") to (per-image shape, dtype); layer
    datasets are named by the layer as configured, dots included. The file's disk blocks
    are reserved here, so a full disk shows now, not in the middle of the run.

    A run at native resolution passes ``ragged``: dataset path -> (N, ndim) array of each
    image's map shape (zeros for an image without a reservation); those maps are stored
    as flat values plus a row index (format version 2), the rest as usual. It passes
    ``input_size`` ((N, 2) model input height, width) and ``failed`` (row -> reason, for
    images that cannot be reserved: their status is failed from the start).

    Returns:
        The new file's ``run_id`` (a random identifier that readers of derived files, such
        as a merge or the metrics file, check against).
    """
    path = Path(path)
    run_id = uuid.uuid4().hex
    size = None
    ragged = dict(ragged or {})
    check_room(path, estimated_size(paths, layout, ragged), "needs")
    try:
        with atomic_output(path) as tmp:
            def build() -> None:
                with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
                    _fill(f, run_id, paths, labels, index, layout, attrs, method_kind, ragged,
                          input_size, failed)

            run_isolated(build, str(tmp))  # a full disk must not crash this process
            size = tmp.stat().st_size
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)  # reserve the blocks the run will write
            finally:
                os.close(fd)
    except (OSError, RuntimeError) as e:  # RuntimeError: HDF5 failing to close the file
        if no_space(e):
            raise space_error(path, size, e) from e
        raise write_error(path, e) from e
    return run_id


# HDF5's own bytes: superblock and root, per dataset its header, attributes and dimension
# scale references, per chunk its entry in the chunk index (measured: about 1.5 kB per
# dataset and 50 bytes per chunk). The estimate need not be an exact bound: a write that
# still runs out of room fails in one line (``isolate``); it keeps that rare.
BASE_BYTES, PER_DATASET_BYTES, PER_CHUNK_BYTES = 8 << 10, 1536, 64


def estimated_size(paths: list[str], layout: Mapping[str, tuple[tuple[int, ...], Any]],
                   ragged: Mapping[str, np.ndarray]) -> int:
    """The new file's size, a little over: every dataset at its final shape, the image
    paths (stored once and once more per group as its ``image`` coordinate), checksums and
    HDF5's metadata."""
    n = len(paths)
    data = n * (4 + 8 + 1 + 256 + 8 + 16 + 1 + 8)  # label, index, status, error, size, box...
    chunks = 8 * (n // 1024 + 1)
    for key, (shape, dtype) in layout.items():
        values = (int(np.asarray(ragged[key]).reshape(n, -1).prod(axis=1).sum()) if key in ragged
                  else n * int(np.prod(shape, dtype=np.int64)))
        nbytes = values * np.dtype(dtype).itemsize
        data += nbytes + (n * 12 if key in ragged else 0)
        chunks += nbytes // CHUNK_BYTES + 1
    # Every group of datasets (a ragged map's index too) holds the paths as its coordinate.
    groups = len({key.split("/")[0] for key in layout} | {"images", CHECKSUMS}) + len(ragged)
    path_bytes = sum(len(p.encode("utf-8")) + 40 for p in paths)  # + heap entry, reference
    data += path_bytes * (1 + groups) + n * 8 * (len(layout) + 3)
    datasets = 2 * len(layout) + 8 + 3 * groups  # scales included
    meta = BASE_BYTES + PER_DATASET_BYTES * datasets + PER_CHUNK_BYTES * chunks
    return int(data * 1.05 + meta)


def _fill(f: h5py.File, run_id: str, paths: list[str], labels: np.ndarray, index: np.ndarray,
          layout: Mapping[str, tuple[tuple[int, ...], Any]], attrs: Mapping[str, Any],
          method_kind: str | None, ragged: dict[str, np.ndarray],
          input_size: np.ndarray | None, failed: Mapping[int, str] | None) -> None:
    """Every dataset and attribute of a new results file (see :func:`create_results`)."""
    n = len(paths)
    method = attrs.get("method")
    version = RAGGED_VERSION if ragged else FIXED_VERSION
    f.attrs.update({"format": FORMAT, "format_version": version,
                    "created": datetime.now(timezone.utc).isoformat(), "n_images": n,
                    "run_id": run_id})
    for key, value in attrs.items():
        f.attrs[key] = _jsonable(value)
    if ragged:
        f.attrs["ragged_maps"] = json.dumps(list(ragged))
    img = f.create_group("images")
    img.create_dataset("path", data=np.array(paths, dtype=object), dtype=STR)
    img.create_dataset("label", data=np.asarray(labels, dtype=np.int32))
    img.create_dataset("index", data=np.asarray(index, dtype=np.int64))
    _preallocated(img, "status", n, (), np.uint8, fill=True)  # fill value 0: pending
    _preallocated(img, "error", n, (), ERROR_STR, fill=True)  # fill value: empty
    _preallocated(img, "size", n, (2,), np.int32)
    _preallocated(img, "box", n, (4,), np.float32)
    _preallocated(img, "nonfinite", n, (), np.uint8)
    # Content identity (pipeline/content.py): what each done row was computed from.
    _preallocated(img, "content_hash", n, (), np.uint64, fill=True).attrs[
        "algorithm"] = "xxh3_64 of the file's bytes, 0 = not read"
    _preallocated(img, "file_size", n, (), np.int64)
    _preallocated(img, "mtime_ns", n, (), np.int64)
    if input_size is not None:
        img.create_dataset("input_size", data=np.asarray(input_size, np.int32))
    for row, reason in sorted((failed or {}).items()):
        img["status"][row] = FAILED
        img["error"][row] = reason.encode("utf-8")[:ERROR_BYTES].decode("utf-8",
                                                                       "ignore")
    for key, (shape, dtype) in layout.items():
        group_name, _, name = key.partition("/")
        if key in ragged:
            ds = create_ragged(f, key, ragged[key], dtype)
        else:
            ds = _preallocated(f.require_group(group_name), name, n, tuple(shape),
                               dtype)
        kind = kind_of(key, method_kind)
        if kind is not None:
            ds.attrs["kind"] = kind
            ds.attrs["method"] = str(method)
            if name != "input":
                ds.attrs["layer"] = name
    for key, ds in walk(f):
        if ds.attrs.get("encoding") == RAGGED:  # axes of one image's map, flattened
            ndim = 1 + np.asarray(ragged[key]).reshape(n, -1).shape[1]
            ds.attrs["row_dims"] = json.dumps(
                dataset_dims(key, ds.attrs.get("kind"), ndim)[1:])
            dims = ["value"]
        elif key.startswith(f"{RAGGED}/"):
            dims = ["image"] if ds.ndim == 1 else ["image", "axis"]
        else:
            dims = dataset_dims(key, ds.attrs.get("kind"), ds.ndim)
        ds.attrs["dims"] = json.dumps(dims)
    create_checksums(f, dict.fromkeys([*ROW_DATASETS, *layout]), n)
    attach_dims(f, paths)
    f["images/error"].attrs["encoding"] = "utf-8, fixed 256 bytes, empty when ok"
    f["images/status"].attrs["meaning"] = "0 pending, 1 done, 2 failed"
