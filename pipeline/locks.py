"""One writer per results file and per run directory: locks that die with their holder.

Two levels: :func:`writer_lock` guards one results file (a shard file, the merged file);
:func:`run_dir_lock` guards the whole run directory, so that a stage of one run cannot
write while another stage (or another config) writes beside it. Readers take neither."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import RunRefused, StoreError

# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = "hhqqi4x"
log = logging.getLogger("camsweep")
# Byte ranges of a lock file: the lock proper, and a byte that serialises taking the lock
# with writing who holds it, so a refused process never reads the note before the holder
# has written it (it would say "?" and could not tell a report to wait from an extract).
_LOCK, _NOTE = 0, 1
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
    with _hold(path.with_name(f".{path.name}.lock"), what, fcntl.LOCK_EX,
               already=f"{path}", refused=f"holds {path}",
               wait_for=_ANY if wait else None):
        yield


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
        answer = fcntl.fcntl(fd, fcntl.F_GETLK,
                             struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _LOCK, 1, 0))
    finally:
        os.close(fd)
    return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK


RUN_DIR_LOCK = ".camsweep.lock"


def _open_lock(lock_path: Path) -> int:
    """The lock file's descriptor (created if need be). Taking a lock needs no disk space;
    creating the file may: a full disk or a read-only folder is one line."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StoreError(f"cannot create the lock file {lock_path}: {e.strerror or e}; free "
                         "space or fix permissions and rerun") from None


def _note_holder(fd: int, what: str) -> None:
    """Write who holds the lock, for the refusal others see. Only a courtesy: on a full
    disk (the lock holds all the same) the note is left out."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, {what}".encode(), 0)
    except OSError:
        pass


@contextmanager
def run_dir_lock(run_dir: str | os.PathLike, what: str, shared: bool = False,
                 wait_for: str | None = None) -> Iterator[None]:
    """Hold the lock of a whole run directory (``run_dir/.camsweep.lock``) while writing in it.

    Every stage that writes in a run directory holds it: extract, merge, evaluate and report
    exclusively, so that two writers (two configs, or extract while evaluate runs) never
    meet; the second fails at once with one line. The shards of one run, written at the same
    time by srun's tasks, hold it ``shared`` (each also holds its own file's
    :func:`writer_lock`, and a shard of another config is refused by the shard files' own
    identity), as does the merge that the last shard makes. Readers take no lock.

    Like :func:`writer_lock`, a POSIX record lock: dropped by the kernel when its holder
    exits or is killed, never inherited by DataLoader workers. ``wait_for``: when the holder
    is doing that (e.g. another report), wait for it instead of failing.
    """
    with _hold(Path(run_dir) / RUN_DIR_LOCK, what,
               fcntl.LOCK_SH if shared else fcntl.LOCK_EX, already=f"in {run_dir}",
               refused=f"is writing in {run_dir}", wait_for=wait_for):
        yield


_ANY = ""  # wait_for: wait whatever the holder does


def _try_take(fd: int, mode: int, what: str) -> str | None:
    """Take the lock without waiting and note ``what`` this process does: None, or (when
    another process holds it) that holder's note."""
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, _NOTE)  # held for a write of a few bytes
    try:
        try:
            fcntl.lockf(fd, mode | fcntl.LOCK_NB, 1, _LOCK)
        except OSError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
        _note_holder(fd, what)
        return None
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, _NOTE)


@contextmanager
def _hold(lock_path: Path, what: str, mode: int, already: str, refused: str,
          wait_for: str | None) -> Iterator[None]:
    """Take the POSIX lock of ``lock_path`` in ``mode`` and note ``what`` this process does.
    A holder elsewhere refuses it in one line (``another camsweep process (<holder>)
    <refused>``), unless ``wait_for`` matches what the holder does (``_ANY``: anything):
    then it waits, saying so, and tries again once that holder is done (whoever holds it
    then decides again). POSIX locks do not see their own process: a second hold here is
    refused too, never a silent pass."""
    key = str(lock_path.resolve())
    if key in _HELD:
        raise RunRefused(f"this process is already {_HELD[key]} {already}")
    fd = _open_lock(lock_path)
    try:
        said = False
        while (holder := _try_take(fd, mode, what)) is not None:
            if wait_for is None or not holder.endswith(f", {wait_for}" if wait_for else ""):
                raise RunRefused(f"another camsweep process ({holder}) {refused}; wait for "
                                 "it to finish, or use another run_dir")
            if wait_for and not said:
                log.info("another process (%s) is %s %s; waiting for it", holder, wait_for,
                         already)
                said = True
            fcntl.lockf(fd, mode, 1, _LOCK)  # until that holder is done
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _LOCK)
        _HELD[key] = what
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the lock
