"""Full disks and file-size limits as one line that says what is full and what to free."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from ..errors import StoreError


def no_space(e: BaseException) -> bool:
    text = str(e)
    return (getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            or "No space left" in text or "errno = 28" in text or "File too large" in text
            or "errno = 27" in text or "Disk quota" in text)


def write_error(path: Path, e: BaseException, hint: str = "") -> StoreError:
    """One line for a failed write of ``path``: a full disk says so; ``hint`` is appended
    to any other failure."""
    if no_space(e):
        return space_error(Path(path), None, e)
    reason = str(e).splitlines()[0][:200] if str(e) else repr(e)
    return StoreError(f"cannot write {path}: {reason}{hint}")


def space_error(path: Path, need: int | None, e: BaseException) -> StoreError:
    free = shutil.disk_usage(path.parent).free
    need_text = f"needs {need / 1e6:.1f} MB, " if need else ""
    return StoreError(f"not enough disk space for {path} ({need_text}{free / 1e6:.1f} MB free; "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:120]}); free space or "
                      "use another run_dir")
