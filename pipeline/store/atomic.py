"""Write a temporary beside the target, then replace it: the one way every stage publishes a
file, so readers see the old file or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this process and call:
    ``.<name>.<tag>-<pid>-<random>`` (``remove_temporaries`` finds it by that pattern)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_temporaries(path: str | os.PathLike, tag: str = "tmp") -> None:
    """Delete temporaries of ``path`` left by a writer that was killed (call while holding
    the writer lock, so none of them is in use)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.{tag}-*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str | os.PathLike, directory: bool = False,
                  durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` (a file,
    or with ``directory=True`` a folder, whose old copy is removed after the swap); on an
    exception it is removed and ``path`` is untouched. ``durable`` fsyncs the file first, so
    a crash after the rename never leaves an empty file under the final name."""
    path = Path(path)
    tmp = temporary_name(path)
    if directory:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if durable and not directory and tmp.exists():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if directory and path.is_dir() and not path.is_symlink():
            old = temporary_name(path, "old")
            os.replace(path, old)  # a folder cannot replace a non-empty folder in one call
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``path.write_text(text)`` that readers never see half-written."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
