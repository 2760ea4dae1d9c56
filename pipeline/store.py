"""The results file: one HDF5 file per run (format "camsweep", version 1).

Crash safety comes from the layout, not from luck: the file is built complete (every
dataset at its final shape, storage allocated up front, no compression) under a temporary
name and renamed into place. During the run, writes touch raw data only, never HDF5
metadata, and a row's status is set after its arrays are flushed. A process killed at
any moment therefore leaves a file that opens, whose "done" rows are complete; the rest
are recomputed on resume.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import StoreError

FORMAT = "camsweep"
FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
ERROR_BYTES = 256
STR = h5py.string_dtype("utf-8")
ERROR_STR = h5py.string_dtype("utf-8", ERROR_BYTES)  # fixed size: written in place
CHUNK_BYTES = 1 << 20

# Dimension names per dataset group, so readers without our code know the axes.
DIMS = {
    "images/path": ["image"], "images/label": ["image"], "images/status": ["image"],
    "images/error": ["image"], "images/size": ["image", "hw"], "images/box": ["image", "y0x0y1x1"],
    "images/index": ["image"], "images/nonfinite": ["image"],
    "targets/class": ["image"], "targets/score": ["image"],
    "predictions/class": ["image", "rank"], "predictions/prob": ["image", "rank"],
    "gradcam": ["image", "h", "w"], "gradcam_weights": ["image", "channel"],
    "saliency": ["image", "height", "width"], "activations": ["image", "channel", "h", "w"],
    # The method family: CAMs at the layer's resolution, input maps at the input's.
    **{g: ["image", "h", "w"] for g in ("gradcampp", "xgradcam", "layercam", "hirescam",
                                        "scorecam", "eigencam")},
    **{f"{g}_weights": ["image", "channel"] for g in ("gradcampp", "xgradcam", "scorecam",
                                                      "eigencam")},
    **{g: ["image", "height", "width"] for g in ("smoothgrad", "integrated_gradients",
                                                 "guided_backprop", "guided_gradcam")},
    **{f"{g}_attribution": ["image", "channel", "height", "width"]
       for g in ("smoothgrad", "integrated_gradients", "guided_backprop", "guided_gradcam")},
}


def chunk_rows(row_shape: tuple[int, ...], itemsize: int, n: int) -> int:
    """Rows per chunk: about 1 MB, at least one row, at most all rows."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    return int(min(max(n, 1), max(1, CHUNK_BYTES // row_bytes)))


def _preallocated(group: h5py.Group, name: str, n: int, row_shape: tuple[int, ...],
                  dtype: Any) -> h5py.Dataset:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # rows count only once their status is done
    dt = np.dtype(dtype)
    chunks = (chunk_rows(row_shape, dt.itemsize, n), *row_shape)
    return group.create_dataset(name, shape=(n, *row_shape), dtype=dt, chunks=chunks, dcpl=dcpl)


def _dims(path: str, ndim: int) -> list[str]:
    dims = DIMS.get(path) or DIMS.get(path.split("/")[0], [])
    if len(dims) != ndim:  # e.g. pooled activations (image, channel)
        extra = [f"d{i}" for i in range(len(dims), ndim)]
        dims = dims[:ndim] if len(dims) > ndim else dims + extra
    return dims


def create_results(
    path: Path,
    paths: list[str],
    labels: np.ndarray,
    index: np.ndarray,
    layout: Mapping[str, tuple[tuple[int, ...], Any]],
    attrs: Mapping[str, Any],
) -> None:
    """Write a complete, empty results file (all rows pending) and rename it into place.

    ``layout`` maps dataset paths ("gradcam/layer4") to (per-image shape, dtype); layer
    datasets are named by the layer as configured, dots included.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = len(paths)
    try:
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as f:
            f.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                            "created": datetime.now(timezone.utc).isoformat(), "n_images": n})
            for key, value in attrs.items():
                f.attrs[key] = value if not isinstance(value, (list, dict)) else json.dumps(value)
            img = f.create_group("images")
            img.create_dataset("path", data=np.array(paths, dtype=object), dtype=STR)
            img.create_dataset("label", data=np.asarray(labels, dtype=np.int32))
            img.create_dataset("index", data=np.asarray(index, dtype=np.int64))
            _preallocated(img, "status", n, (), np.uint8)
            img["status"][...] = PENDING
            img.create_dataset("error", shape=(n,), dtype=ERROR_STR)
            _preallocated(img, "size", n, (2,), np.int32)
            _preallocated(img, "box", n, (4,), np.float32)
            _preallocated(img, "nonfinite", n, (), np.uint8)
            for key, (shape, dtype) in layout.items():
                group_name, _, name = key.partition("/")
                group = f.require_group(group_name)
                ds = _preallocated(group, name, n, tuple(shape), dtype)
                if group_name not in ("images", "targets", "predictions") and name != "input":
                    ds.attrs["layer"] = name
            for key, ds in _walk(f):
                ds.attrs["dims"] = json.dumps(_dims(key, ds.ndim))
            f["images/error"].attrs["encoding"] = "utf-8, fixed 256 bytes, empty when ok"
            f["images/status"].attrs["meaning"] = "0 pending, 1 done, 2 failed"
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _walk(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    out: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda k, v: out.append((k, v)) if isinstance(v, h5py.Dataset) else None)
    return out


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


def open_results(path: str | os.PathLike, mode: str = "r") -> h5py.File:
    """Open a results file after checking that it is one and that we know its version."""
    if not Path(path).is_file():
        raise StoreError(f"no results file at {path}")
    try:
        f = h5py.File(path, mode)
    except OSError as e:
        raise StoreError(f"cannot open {path} as HDF5: {e}") from e
    try:
        check_format(f, path)
    except StoreError:
        f.close()
        raise
    return f


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted rows into contiguous runs: (position in rows, first row, length)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(s), int(rows[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class ResultsWriter:
    """Writes batches into an existing results file, in place."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file = open_results(self.path, "r+")

    def pending_rows(self) -> np.ndarray:
        return np.flatnonzero(self.file["images/status"][:] == PENDING)

    def write(self, rows: np.ndarray, arrays: Mapping[str, np.ndarray],
              errors: Mapping[int, str]) -> None:
        """Store one batch. ``rows``: file rows of the arrays' first axis, ascending.

        ``errors`` maps file rows to failure reasons; those rows get status failed.
        """
        f = self.file
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            for key, value in arrays.items():
                ds = f[key]
                for pos, first, length in _runs(rows):
                    ds[first:first + length] = value[pos:pos + length]
        for row, reason in errors.items():
            f["images/error"][row] = reason.encode("utf-8")[:ERROR_BYTES].decode("utf-8", "ignore")
        f.flush()  # arrays reach the file before the status that vouches for them
        status = f["images/status"]
        for _, first, length in _runs(rows) if len(rows) else []:
            status[first:first + length] = DONE
        for row in errors:
            status[row] = FAILED
        f.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

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
                try:
                    self.writer.write(*job)
                except BaseException as e:  # surfaced in the main thread
                    self.error = e

    def put(self, rows: np.ndarray, arrays: Mapping[str, np.ndarray],
            errors: Mapping[int, str]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((rows, arrays, errors))

    def close(self) -> None:
        """Wait for queued batches to be written; re-raise a write error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
