"""Full disks and file-size limits as one line that says what is full and what to free.

A results file is checked before it is created or grown: the disk's free space and the
process's file-size limit (``RLIMIT_FSIZE``, ``ulimit -f``) must hold it. HDF5 writing
into a full disk fails in its metadata cache, at a close that cannot be reported cleanly
(and may crash the process), so the check comes first; a write error that still happens
(another program filled the disk meanwhile) is one :class:`StoreError` line.
"""

from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path

from ..errors import StoreError

MB = 1e6
LIMIT_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e3:.0f} kB" if nbytes < MB else f"{nbytes / MB:.1f} MB"


def no_space(e: BaseException) -> bool:
    text = str(e)
    return (getattr(e, "errno", None) in LIMIT_ERRNOS
            or "No space left" in text or "errno = 28" in text or "File too large" in text
            or "errno = 27" in text or "Disk quota" in text)


def size_limit() -> int | None:
    """The file-size limit of this process in bytes (``ulimit -f``), None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _free(path: Path) -> int:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # a run_dir not made yet
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_room(path: str | Path, need: int, what: str = "") -> None:
    """Refuse, in one line, to write ``need`` bytes as file ``path`` when the disk or the
    file-size limit cannot hold them."""
    path = Path(path)
    limit = size_limit()
    if limit is not None and need > limit:
        raise StoreError(f"{path} {what or 'would be'} {_size(need)}, over this process's "
                         f"file-size limit of {_size(limit)} (ulimit -f); raise the limit "
                         "(ulimit -f unlimited) or make the run smaller; nothing was written")
    free = _free(path)
    if need > free:
        raise StoreError(f"not enough disk space for {path} (needs {_size(need)}, "
                         f"{_size(free)} free on {path.parent}); free space there or use "
                         "another run_dir; nothing was written")


def limits_text(path: str | Path) -> str:
    """Free space beside ``path`` and the file-size limit, for a message."""
    limit = size_limit()
    return (f"{_size(_free(Path(path)))} free on {Path(path).parent}, file-size limit "
            f"{'unlimited' if limit is None else _size(limit)}")


def write_error(path: Path, e: BaseException, hint: str = "") -> StoreError:
    """One line for a failed write of ``path``: a full disk or a file-size limit says so;
    ``hint`` is appended to any other failure."""
    if no_space(e):
        return space_error(Path(path), None, e)
    reason = str(e).splitlines()[0][:200] if str(e) else repr(e)
    if "crashed" in reason:  # the isolated HDF5 write died: most likely a limit
        reason += f" ({limits_text(path)}); free space or raise the limit and rerun"
    return StoreError(f"cannot write {path}: {reason}{hint}")


def space_error(path: Path, need: int | None, e: BaseException) -> StoreError:
    text = str(e)
    reason = f"{type(e).__name__}: {text.splitlines()[0][:120] if text else ''}"
    limit = size_limit()
    if getattr(e, "errno", None) == errno.EFBIG or "File too large" in text or (
            "errno = 27" in text):
        return StoreError(f"{path} reached the file-size limit ({reason}; limit "
                          f"{'unlimited' if limit is None else _size(limit)}, "
                          "ulimit -f); raise it and rerun: finished rows are kept")
    need_text = f"needs {_size(need)}, " if need else ""
    return StoreError(f"not enough disk space for {path} ({need_text}{_size(_free(path))} "
                      f"free; {reason}); free space or use another run_dir: finished rows are "
                      "kept")
