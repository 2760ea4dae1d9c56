"""The results file: one HDF5 file per run (format "camsweep", version 1, or 2 for runs at
native resolution with ragged maps), and the only module that writes or reads its layout.
The spec is docs/FORMAT.md.

Crash safety comes from the layout, not from luck: the file is built complete (every
dataset at its final shape, storage allocated up front and its disk blocks reserved, no
compression) under a temporary name and renamed into place. During the run, writes touch
raw data only, never HDF5 metadata, and a row's status is set only after its arrays were
flushed without error. A process killed at any moment therefore leaves a file that opens,
whose "done" rows are complete; the rest are recomputed on resume. Ragged maps keep this:
their flat values are sized exactly, and every image's offset fixed, at creation, so a
row's values always go to the same place, whoever writes them and when.

Longer than our other modules on purpose: creating, validating, reading helpers and the
writer of one format belong in one place, the one that docs/FORMAT.md describes.

One writer per file (``pipeline.locks.writer_lock``). Writers open without HDF5's own file
lock, so readers can watch a run that is being written.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError

FORMAT = "camsweep"
FORMAT_VERSION = 2  # the newest version this module reads and writes
# Fixed-size runs are written as version 1 (readable by camsweep before ragged maps);
# ragged runs (data.resize=null) as version 2, which older readers refuse.
FIXED_VERSION, RAGGED_VERSION = 1, 2
RAGGED = "ragged"  # encoding of a ragged map's flat values; group of their row index
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = ("pending", "done", "failed")
ERROR_BYTES = 256
STR = h5py.string_dtype("utf-8")
ERROR_STR = h5py.string_dtype("utf-8", ERROR_BYTES)  # fixed size: preallocated, written in place
CHUNK_BYTES = 1 << 20
INPUT_SIZE = "images/input_size"  # ragged runs: each image's model input (h, w)
IMAGE_TABLES = ("images", "targets", "predictions")
REQUIRED = ("images/path", "images/label", "images/status", "images/error", "images/size",
            "targets/class", "targets/score", "predictions/class", "predictions/prob")

# What a map dataset holds, stored as its ``kind`` attribute: readers (render, report,
# evaluate) decide how to use it without importing the methods.
LAYER_MAP, INPUT_MAP, ACTIVATIONS = "layer_map", "input_map", "activations"
WEIGHTS, ATTRIBUTION = "weights", "attribution"
MAP_KINDS = (LAYER_MAP, INPUT_MAP, ACTIVATIONS)
# Files written before datasets carried ``kind``: the group name says it.
_KIND_OF_GROUP = {
    **{g: LAYER_MAP for g in ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam",
                              "scorecam", "eigencam")},
    **{g: INPUT_MAP for g in ("saliency", "smoothgrad", "integrated_gradients",
                              "guided_backprop", "guided_gradcam")},
    "activations": ACTIVATIONS,
}

# Dimension names per dataset group, so readers without our code know the axes.
DIMS = {
    "images/path": ["image"], "images/label": ["image"], "images/status": ["image"],
    "images/error": ["image"], "images/size": ["image", "hw"], "images/input_size": ["image", "hw"],
    "images/box": ["image", "y0x0y1x1"],
    "images/index": ["image"], "images/nonfinite": ["image"],
    "images/content_hash": ["image"], "images/file_size": ["image"], "images/mtime_ns": ["image"],
    "targets/class": ["image", "class"], "targets/score": ["image", "class"],
    "predictions/class": ["image", "rank"], "predictions/prob": ["image", "rank"],
    LAYER_MAP: ["image", "h", "w"], WEIGHTS: ["image", "channel"],
    INPUT_MAP: ["image", "height", "width"], ATTRIBUTION: ["image", "channel", "height", "width"],
    ACTIVATIONS: ["image", "channel", "h", "w"],
}


def kind_of(key: str, method_kind: str | None = None) -> str | None:
    """The ``kind`` of dataset ``group/name``: a map kind, weights, attribution, or None for
    the per-image tables. ``method_kind`` is the producing method's ("cam", "input",
    "activations"); without it the group name decides (files of before the attribute)."""
    group = key.split("/")[0]
    if group in IMAGE_TABLES:
        return None
    if group.endswith("_weights"):
        return WEIGHTS
    if group.endswith("_attribution"):
        return ATTRIBUTION
    if method_kind is not None:
        return {"cam": LAYER_MAP, "input": INPUT_MAP, "activations": ACTIVATIONS}[method_kind]
    return _KIND_OF_GROUP.get(group)


def _dims(key: str, kind: str | None, ndim: int) -> list[str]:
    dims = DIMS.get(key) or DIMS.get(kind or "", [])
    if kind is not None and "/" in key and len(dims) + 1 == ndim:  # target=topk: class axis
        dims = [dims[0], "class", *dims[1:]]
    if len(dims) != ndim:  # e.g. pooled activations (image, channel)
        extra = [f"d{i}" for i in range(len(dims), ndim)]
        dims = dims[:ndim] if len(dims) > ndim else dims + extra
    return dims


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


def _ragged_values(f: h5py.File, key: str, shapes: np.ndarray, dtype: Any) -> h5py.Dataset:
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
    return ds


def _jsonable(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else value


def _no_space(e: BaseException) -> bool:
    text = str(e)
    return (getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            or "No space left" in text or "errno = 28" in text or "File too large" in text
            or "errno = 27" in text or "Disk quota" in text)


def write_error(path: Path, e: BaseException, hint: str = "") -> StoreError:
    """One line for a failed write of ``path``: a full disk says so; ``hint`` is appended
    to any other failure."""
    if _no_space(e):
        return _space_error(Path(path), None, e)
    reason = str(e).splitlines()[0][:200] if str(e) else repr(e)
    return StoreError(f"cannot write {path}: {reason}{hint}")


def _space_error(path: Path, need: int | None, e: BaseException) -> StoreError:
    free = shutil.disk_usage(path.parent).free
    need_text = f"needs {need / 1e6:.1f} MB, " if need else ""
    return StoreError(f"not enough disk space for {path} ({need_text}{free / 1e6:.1f} MB free; "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:120]}); free space or "
                      "use another run_dir")


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.tmp-*`` left by a creation that was killed. Call with the file's
    writer lock held: no live process is writing one then."""
    for tmp in Path(path).parent.glob(f".{Path(path).name}.tmp-*"):
        tmp.unlink(missing_ok=True)


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = len(paths)
    run_id = uuid.uuid4().hex
    method = attrs.get("method")
    size = None
    ragged = dict(ragged or {})
    try:
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
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
                    ds = _ragged_values(f, key, ragged[key], dtype)
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
                        _dims(key, ds.attrs.get("kind"), ndim)[1:])
                    dims = ["value"]
                elif key.startswith(f"{RAGGED}/"):
                    dims = ["image"] if ds.ndim == 1 else ["image", "axis"]
                else:
                    dims = _dims(key, ds.attrs.get("kind"), ds.ndim)
                ds.attrs["dims"] = json.dumps(dims)
            attach_dims(f, paths)
            f["images/error"].attrs["encoding"] = "utf-8, fixed 256 bytes, empty when ok"
            f["images/status"].attrs["meaning"] = "0 pending, 1 done, 2 failed"
        size = tmp.stat().st_size
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)  # reserve the blocks the run will write
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if _no_space(e):
            raise _space_error(path, size, e) from e
        raise StoreError(f"cannot create {path}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return run_id


LAYOUTS_ATTR = "layer_layouts"


def layouts_attr(layouts: Mapping[str, Any]) -> dict[str, str]:
    """The root attribute ``layer_layouts`` for ``create_results``'s attrs: JSON of
    {layer: how its output became (C, h, w)} (``pipeline.layouts.Layout.as_dict``)."""
    return {LAYOUTS_ATTR: json.dumps({str(k): v.as_dict() if hasattr(v, "as_dict") else v
                                      for k, v in layouts.items()})}


def read_layouts(f: h5py.File) -> dict[str, dict[str, Any]]:
    """{layer: layout} as stored at creation; empty for files of before the attribute."""
    text = f.attrs.get(LAYOUTS_ATTR)
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError) as e:
        raise StoreError(f"{f.filename} is damaged: {LAYOUTS_ATTR} is not JSON") from e
    if not isinstance(value, dict):
        raise StoreError(f"{f.filename} is damaged: {LAYOUTS_ATTR} is not a mapping")
    return value


def is_scale(ds: h5py.Dataset) -> bool:
    """Whether ``ds`` is a dimension scale (an axis name for xarray), not per-image data."""
    return ds.attrs.get("CLASS") == b"DIMENSION_SCALE"


def walk(f: h5py.File | h5py.Group) -> list[tuple[str, h5py.Dataset]]:
    """(path, dataset) of every per-image dataset under ``f`` (dimension scales left out)."""
    out: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda k, v: out.append((k, v))
                 if isinstance(v, h5py.Dataset) and not is_scale(v) else None)
    return out


SCALE_ATTRS = ("CLASS", "NAME", "DIMENSION_LIST", "REFERENCE_LIST", "_Netcdf4Dimid")
_NO_VARIABLE = "This is a netCDF dimension but not a netCDF variable.%10d"


def attach_dims(f: h5py.File, paths: list[str] | np.ndarray) -> None:
    """Name every axis with an HDF5 dimension scale (netCDF-4 conventions), so that
    ``xarray.open_dataset(path, engine="h5netcdf", group=G)`` shows named dims and the image
    paths as the ``image`` coordinate.

    Scales live in the group of the datasets they label: an ``image`` coordinate (the paths)
    and one axis per other dim name. Axes of one name but different sizes within a group
    (``h`` of layer3 and of layer4) get the dataset's name as a suffix: ``h_layer4``.
    Called when a file is created or merged, never during a run.
    """
    paths = np.asarray(paths, dtype=object)
    groups: dict[str, list[tuple[str, h5py.Dataset, list[str]]]] = {}
    for key, ds in walk(f):
        if "/" not in key or ds.attrs.get("encoding") == RAGGED:  # no per-image axis
            continue
        group, name = key.rsplit("/", 1)
        dims = json.loads(ds.attrs["dims"])
        groups.setdefault(group, []).append((name, ds, dims))
    for group, members in groups.items():
        g = f[group]
        sizes: dict[str, set[int]] = {}
        for _, ds, dims in members:
            for dim, size in zip(dims[1:], ds.shape[1:], strict=True):
                sizes.setdefault(dim, set()).add(size)
        image = g.create_dataset("image", data=paths, dtype=STR)
        image.make_scale("image")
        scales: dict[str, h5py.Dataset] = {}
        for name, ds, dims in members:
            named = ["image"]
            ds.dims[0].attach_scale(image)
            for axis, (dim, size) in enumerate(zip(dims[1:], ds.shape[1:], strict=True), 1):
                label = dim if len(sizes[dim]) == 1 else f"{dim}_{name}"
                if label in g and label not in scales:  # a variable of that name (targets/class)
                    label = f"{label}_dim"
                if label not in scales:
                    scales[label] = g.create_dataset(label, shape=(size,), dtype=np.float32)
                    scales[label].make_scale(_NO_VARIABLE % size)
                ds.dims[axis].attach_scale(scales[label])
                named.append(label)
            ds.attrs["dims"] = json.dumps(named)


_walk = walk  # the name merge used


# -- reading -------------------------------------------------------------------------------

def attr_list(value: Any) -> list[Any]:
    """A list stored as a JSON string attribute (or as an HDF5 array), as a Python list."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return list(json.loads(value)) if value else []
    return [v.decode() if isinstance(v, bytes) else v for v in np.asarray(value).tolist()]


def check_format(f: h5py.File, path: str | os.PathLike) -> None:
    if f.attrs.get("format") != FORMAT:
        fmt = f.attrs.get("format")
        raise StoreError(f"{path} is not a camsweep results file (format={fmt!r})")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} has format_version {version}, newer than this camsweep reads "
            f"({FORMAT_VERSION}); upgrade camsweep"
        )
    if version < 1:
        raise StoreError(f"{path} has an invalid format_version {version}")


def validate(f: h5py.File, path: str | os.PathLike) -> None:
    """Check what every reader relies on; a damaged or forged file is one clear error.

    The per-image tables exist with one row per image, every dataset has that many rows,
    status bytes are 0, 1 or 2, the layer list parses, and a merged file still finds the
    very shard files it was merged from.
    """
    try:
        n = f["images/status"].shape[0] if "images/status" in f else None
        missing = [k for k in REQUIRED if k not in f or not isinstance(f[k], h5py.Dataset)]
        if missing:
            raise StoreError(f"{path} is damaged: missing {', '.join(missing)}")
        if "merged_from" in f.attrs:
            check_shards(f, path)  # before reading rows: a missing source reads as zeros
        ragged = ragged_keys(f)
        for key in ragged:
            check_ragged(f, key, n, path)
        for key, ds in walk(f):
            if key.split("/")[0] == "metrics":  # files of before the metrics file
                continue
            if ds.attrs.get("encoding") == RAGGED:
                if key not in ragged:
                    raise StoreError(f"{path} is damaged: {key} is ragged but not listed in "
                                     "the root attribute ragged_maps")
                continue
            if not ds.shape or ds.shape[0] != n:
                raise StoreError(f"{path} is damaged: {key} has shape {ds.shape}, expected "
                                 f"{n} rows")
        status = f["images/status"][:]
        if status.dtype != np.uint8 or (status > FAILED).any():
            bad = int(np.flatnonzero(status > FAILED)[0]) if (status > FAILED).any() else 0
            raise StoreError(f"{path} is damaged: /images/status holds {int(status[bad])} at row "
                             f"{bad} (valid: 0 pending, 1 done, 2 failed)")
        check_own_maps(f, path)
    except StoreError:
        raise
    except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:
        raise StoreError(f"{path} is damaged: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e


def ragged_keys(f: h5py.File) -> list[str]:
    """The map datasets stored ragged (flat values + row index): root ``ragged_maps``."""
    return [str(k) for k in attr_list(f.attrs.get("ragged_maps"))]


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


def check_own_maps(f: h5py.File, path: str | os.PathLike) -> None:
    """The run's own maps are all there: one per target layer (or its input map), so a
    deleted dataset is an error, not a picture or a metric quietly missing."""
    method = str(f.attrs.get("method", ""))
    own = [m for m in stored_maps(f) if m.group == method]
    names = {m.layer for m in own} | {m.key.split("/", 1)[1] for m in own}
    layers = [str(name) for name in attr_list(f.attrs.get("target_layers"))]
    missing = [name for name in layers if name not in names]
    if missing or not own:
        what = ", ".join(f"/{method}/{name}" for name in missing) or f"every /{method}/ map"
        raise StoreError(f"{path} is damaged: {what} missing (target_layers: {layers or '[]'}); "
                         "rerun the extraction with overwrite=true")


def check_shards(f: h5py.File, path: str | os.PathLike) -> None:
    """A merged file reads its shards through virtual datasets: each must be there and be
    the file that was merged (its ``run_id``), or the merge would show zeros as results."""
    folder = Path(path).parent
    for entry in attr_list(f.attrs["merged_from"]):
        name, run_id = (entry, None) if isinstance(entry, str) else (entry["file"],
                                                                    entry.get("run_id"))
        shard = folder / name
        hint = "restore it, or rerun the shards and stage=merge"
        if not shard.is_file():
            raise StoreError(f"{path} is a merge of shards, but {name} is missing; {hint}")
        if run_id is not None:
            try:
                with h5py.File(shard, "r") as s:
                    found = s.attrs.get("run_id")
            except OSError as e:
                raise StoreError(f"{path}: shard {name} does not open ({e}); {hint}") from e
            if found != run_id:
                raise StoreError(f"{path}: shard {name} was replaced since the merge (run_id "
                                 f"{found} != {run_id}); run stage=merge again")


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


@dataclass(frozen=True)
class MapInfo:
    """One stored map dataset: ``key`` is ``group/name`` (the HDF5 path)."""

    key: str
    group: str
    layer: str  # the layer as configured, or "input" for input-resolution maps
    kind: str  # LAYER_MAP | INPUT_MAP | ACTIVATIONS
    method: str


def stored_maps(f: h5py.File, kinds: tuple[str, ...] = MAP_KINDS) -> list[MapInfo]:
    """The map datasets of an open results file, in the run's layer order."""
    order = {name: i for i, name in enumerate(attr_list(f.attrs.get("target_layers", "[]")))}
    found = []
    for key, ds in walk(f):
        if key.count("/") != 1 or key.split("/")[0] in IMAGE_TABLES + ("metrics",):
            continue
        kind = ds.attrs.get("kind") or kind_of(key)
        if kind not in kinds:
            continue
        group, name = key.split("/")
        found.append(MapInfo(key=key, group=group, layer=str(ds.attrs.get("layer", name)),
                             kind=str(kind), method=str(ds.attrs.get("method", group))))
    return sorted(found, key=lambda m: (m.group != f.attrs.get("method"), m.group,
                                        order.get(m.layer, len(order)), m.layer))


def categories(f: h5py.File) -> list[str]:
    """Class names stored with the run, index = class (empty when the model has none)."""
    return [str(c) for c in attr_list(f.attrs.get("categories"))]


def stored_config(f: h5py.File, path: str | os.PathLike) -> dict[str, Any]:
    """The run's resolved config (attribute ``config``) as plain data: a safe YAML load,
    which never constructs Python objects, so a crafted file runs no code."""
    import yaml

    text = f.attrs.get("config")
    if not text:
        raise StoreError(f"{path} has no stored config (attribute 'config')")
    try:
        value = yaml.safe_load(str(text))
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StoreError(f"{path} is damaged: its stored config is not plain YAML "
                         f"({first})") from e
    if not isinstance(value, dict):
        raise StoreError(f"{path} is damaged: its stored config is not a mapping")
    return value


def identity(f: h5py.File) -> dict[str, str]:
    """What names one results file for files derived from it (merges, metrics)."""
    return {"run_id": str(f.attrs.get("run_id", "")), "created": str(f.attrs.get("created", ""))}


# -- writing -------------------------------------------------------------------------------

def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted rows into contiguous runs: (position in rows, first row, length)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(s), int(rows[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class ResultsWriter:
    """Writes batches into an existing results file, in place.

    HDF5's chunk cache is off: with chunks allocated up front and no filters, a write then
    goes straight to the rows' bytes in the file (no read-modify-write of a 1 MB chunk per
    batch), and a failed write (a full disk) raises at that very call. With the cache on,
    the error would surface at a later flush or nowhere (h5py ignores errors when a handle
    is dropped), and closing a file with a chunk that cannot be written crashes the process.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file = open_results(self.path, "r+", rdcc_nbytes=0)
        self._datasets: dict[str, h5py.Dataset] = {}
        self.failed = False
        # Ragged maps: row -> (offset, shape), fixed at creation; read once.
        self._ragged = {key: (self.file[f"{RAGGED}/{key}/offset"][:],
                              self.file[f"{RAGGED}/{key}/shape"][:])
                        for key in ragged_keys(self.file)}

    def pending_rows(self) -> np.ndarray:
        """Rows to (re)compute: pending ones and failed ones (a failure may be transient)."""
        return np.flatnonzero(self.file["images/status"][:] != DONE)

    def _ds(self, key: str) -> h5py.Dataset:
        if key not in self._datasets:
            self._datasets[key] = self.file[key]
        return self._datasets[key]

    def write(self, rows: np.ndarray, arrays: Mapping[str, np.ndarray],
              errors: Mapping[int, str]) -> None:
        """Store one batch. ``rows``: file rows of the arrays' first axis, ascending.

        ``errors`` maps file rows to failure reasons; those rows get status failed. A write
        error raises :class:`StoreError`; rows of this batch then stay not done.
        """
        if self.failed:
            raise StoreError(f"{self.path}: an earlier write failed")
        try:
            self._write(np.asarray(rows, dtype=np.int64), arrays, errors)
        except StoreError:
            self.failed = True
            raise
        except (OSError, RuntimeError, ValueError) as e:
            self.failed = True
            raise write_error(self.path, e, "; rows done so far are kept, rerun to resume") from e

    def _write(self, rows: np.ndarray, arrays: Mapping[str, np.ndarray],
               errors: Mapping[int, str]) -> None:
        # ``rows`` are the batch's done rows; failed ones come only in ``errors``.
        runs = _runs(rows) if len(rows) else []
        touched = []
        for key, value in arrays.items():
            ds = self._ds(key)
            if key in self._ragged:
                self._write_ragged(key, ds, rows, value)
            else:
                for pos, first, length in runs:
                    ds[first:first + length] = value[pos:pos + length]
            touched.append(ds)
        error_ds = self._ds("images/error")
        status = self._ds("images/status")
        for row, reason in sorted(errors.items()):
            error_ds[row] = reason.encode("utf-8")[:ERROR_BYTES].decode("utf-8", "ignore")
        for _, first, length in runs:  # a row failed before and done now: no stale reason
            error_ds[first:first + length] = np.array([""] * length, dtype=object)
        touched.append(error_ds)
        for ds in touched:  # arrays reach the disk before the status that vouches for them
            ds.flush()
        self.file.flush()
        for _, first, length in runs:
            status[first:first + length] = DONE
        for row in errors:
            status[row] = FAILED
        status.flush()
        self.file.flush()

    def _write_ragged(self, key: str, ds: h5py.Dataset, rows: np.ndarray,
                      value: np.ndarray) -> None:
        """Each row's map into its own place in the flat values (reserved at creation)."""
        offsets, shapes = self._ragged[key]
        for pos, row in enumerate(rows.tolist()):
            v = value[pos]
            if v.shape != tuple(shapes[row]):
                raise StoreError(f"{self.path}: {key} of row {row} has shape {v.shape}, but "
                                 f"{tuple(shapes[row].tolist())} was reserved at creation")
            if v.size:
                ds[offsets[row]:offsets[row] + v.size] = v.reshape(-1)

    def close(self) -> None:
        self._datasets.clear()
        if self.file.id.valid:
            try:
                self.file.close()
            except (OSError, RuntimeError):
                if not self.failed:  # a failed write was reported already
                    raise

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BackgroundWriter:
    """Runs a :class:`ResultsWriter` on a thread behind a bounded queue.

    The compute loop hands over finished host arrays and goes on; HDF5 writes overlap the
    next batch. A write error is raised in the caller at the next ``put`` or at ``close``.
    """

    def __init__(self, writer: ResultsWriter, depth: int = 4) -> None:
        self.writer = writer
        self.queue: queue.Queue[tuple | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="camsweep-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                rows, arrays, errors, ready = job
                try:
                    if ready is not None:  # device -> host copies still in flight
                        ready.synchronize()
                    self.writer.write(rows, arrays, errors)
                except BaseException as e:  # surfaced in the main thread
                    self.error = e

    def put(self, rows: np.ndarray, arrays: Mapping[str, np.ndarray],
            errors: Mapping[int, str], ready: Any = None) -> None:
        """Queue one batch; ``ready`` (a CUDA event, or None) says when ``arrays`` hold
        their values."""
        if self.error is not None:
            raise self.error
        self.queue.put((rows, arrays, errors, ready))

    def close(self) -> None:
        """Wait for queued batches to be written; re-raise a write error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
