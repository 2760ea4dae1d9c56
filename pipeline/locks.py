"""One writer per results file: an exclusive lock that dies with its holder."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import RunRefused

# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = "hhqqi4x"
_HELD: dict[str, Any] = {}  # locks this process holds: POSIX locks do not see their own


@contextmanager
def writer_lock(path: str | os.PathLike, what: str = "writing",
                wait: bool = False) -> Iterator[None]:
    """Hold the exclusive writer lock of results file ``path`` (``.<name>.lock`` beside it).

    A POSIX record lock (``lockf``: honoured across NFS clients) that the kernel drops when
    its holder exits or is killed, and that forked DataLoader workers do not inherit, so a
    killed run never leaves a stale lock. A second writer fails at once with one line, or
    with ``wait=True`` waits for the first (for short holds, such as a merge).
    """
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    key = str(lock_path.resolve())
    if key in _HELD:
        raise RunRefused(f"this process is already {_HELD[key]} {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
            raise RunRefused(f"another camsweep process ({holder}) holds {path}; wait for it "
                             "to finish, or use another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, {what}".encode(), 0)
        _HELD[key] = what
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the lock


def lock_is_held(path: str | os.PathLike) -> bool:
    """Whether some process holds the writer lock of ``path`` right now. Asks the kernel
    (``F_GETLK``) on a read-only handle, so readers without write access can tell too."""
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    if str(lock_path.resolve()) in _HELD:  # POSIX locks do not report the asker's own
        return True
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
    finally:
        os.close(fd)
    return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK
