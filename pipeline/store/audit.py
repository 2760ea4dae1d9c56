"""Re-reading a whole results file against its row checksums (``stage=verify``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .checksums import CHECKSUMS, checksummed, damaged_rows
from .ragged import is_ragged
from .read import open_results, read_map

BLOCK_BYTES = 64 << 20  # read this much per call: bounded memory, few HDF5 calls


@dataclass
class FileCheck:
    """What verifying one file found. ``damaged``: (row, dataset, reason) per bad row."""

    path: Path
    rows: int = 0  # done rows checked
    nbytes: int = 0  # bytes of stored values read and checked
    unchecked: int = 0  # (done row, dataset) pairs without a checksum (0: none written)
    damaged: list[tuple[int, str, str]] = field(default_factory=list)
    note: str = ""  # why nothing could be checked row by row (a file of before checksums)
    error: str = ""  # the file does not open or is refused: one line

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.error


def verify_results(path: str | os.PathLike) -> FileCheck:
    """Read every done row of every checksummed dataset of ``path`` and compare; a file
    that does not open (or that the format's checks refuse) is reported, not raised."""
    check = FileCheck(Path(path))
    try:
        f = open_results(path)
    except StoreError as e:
        check.error = str(e)
        return check
    with f:
        keys = checksummed(f)
        if not keys:
            check.note = ("no checksums (written before camsweep had them): only its "
                          "structure was checked")
            return check
        status = f["images/status"][:]
        n = len(status)
        check.rows = int((status == 1).sum())
        for key, column in keys.items():
            ds = f[key]
            sums = f[CHECKSUMS][:, column]  # read before the data, like status
            check.unchecked += int(((status == 1) & (sums == 0)).sum())
            ragged = is_ragged(f, key)
            total = ds.shape[0] * ds.dtype.itemsize * (1 if ragged else
                                                      int(np.prod(ds.shape[1:], dtype=np.int64)))
            step = max(1, int(BLOCK_BYTES * n // max(total, 1))) if n else 1
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                rows = np.arange(lo, hi)
                if not (status[lo:hi] == 1).any():
                    continue
                try:
                    values = read_map(f, key, slice(lo, hi))
                except (OSError, RuntimeError, ValueError) as e:  # a damaged chunk
                    reason = f"unreadable: {str(e).splitlines()[0][:120] if str(e) else e!r}"
                    check.damaged += [(int(r), key, reason) for r in rows[status[lo:hi] == 1]]
                    continue
                check.nbytes += int(sum(v.nbytes for v in values) if ragged else values.nbytes)
                check.damaged += [(row, key, reason) for row, reason in
                                  damaged_rows(f, key, rows, values, status[lo:hi], sums[lo:hi])]
    check.damaged.sort()
    if check.unchecked:
        check.note = (f"{check.unchecked} done rows (counted per dataset) carry no checksum "
                      "(not written by camsweep's writer): not checked")
    return check
