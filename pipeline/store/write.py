"""Writing batches into an existing results file, in place, and the background thread that
overlaps those writes with the next batch."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from .checksums import CHECKSUMS, checksummed, row_digests
from .format import DONE, ERROR_BYTES, FAILED, PENDING, RAGGED
from .ragged import ragged_keys
from .read import open_results
from .space import write_error


def _runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted rows into contiguous runs: (position in rows, first row, length)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(s), int(rows[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def mark_pending(path: str | os.PathLike, rows: np.ndarray) -> None:
    """Set ``rows`` of results file ``path`` pending, to be computed again by the next run
    (call with the writer lock held). Only their status changes: a done row's arrays and
    checksums stay as they were until it is written again."""
    try:
        with open_results(path, "r+") as f:
            status = f["images/status"]
            for row in np.asarray(rows, dtype=np.int64).tolist():  # few rows: one write each
                status[row] = PENDING
    except OSError as e:
        raise StoreError(f"cannot mark rows of {path} pending: {e}") from e


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
        self._checksummed = checksummed(self.file)  # none in files of before checksums

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
        sums: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            ds = self._ds(key)
            # Cast here, not in HDF5: the checksum is then of the very bytes stored.
            if key in self._ragged:
                value = [np.ascontiguousarray(v, dtype=ds.dtype) for v in value]
                self._write_ragged(key, ds, rows, value)
            else:
                value = np.ascontiguousarray(value, dtype=ds.dtype)
                for pos, first, length in runs:
                    ds[first:first + length] = value[pos:pos + length]
            if key in self._checksummed:
                sums[key] = row_digests(value[:len(rows)])
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
        if sums:  # then their checksums (one write per run of rows), then the status
            table = np.zeros((len(rows), len(self._checksummed)), np.uint64)
            for key, digests in sums.items():
                table[:, self._checksummed[key]] = digests
            target = self._ds(CHECKSUMS)
            for pos, first, length in runs:
                target[first:first + length] = table[pos:pos + length]
            target.flush()
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
            except (OSError, RuntimeError) as e:
                if not self.failed:  # a failed write was reported already
                    raise write_error(self.path, e, "; rows done so far are kept, rerun to "
                                      "resume") from e

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
