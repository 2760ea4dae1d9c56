"""Run an HDF5 write that may hit a full disk or a file-size limit in a forked child.

HDF5 reports a failed metadata write at a close it cannot complete, then fails again when
h5py drops its objects, and may crash the process (SIGSEGV) on the way. The child builds
the temporary file and exits; its stderr goes nowhere, its HDF5 state dies with it. The
parent sees a clean exit, or gets one exception: the child's error (as ``OSError`` with its
errno, or ``RuntimeError``), or the signal that ended it. Before growing a file, callers
check the room anyway (``space.check_room``): this is what keeps a disk filled by another
program meanwhile from crashing the run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable

from h5py._objects import phil

_SEP = "\x1f"


def run_isolated(write: Callable[[], None], what: str) -> None:
    """Call ``write()`` in a forked child; raise its error (or its death) here."""
    read_end, write_end = os.pipe()
    with phil:  # no other thread is inside h5py at the fork: the child cannot inherit its lock
        pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, not a kill
            write()
        except BaseException as e:
            code = 1
            text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e))
            text = text.replace("\n", " ")[:2000] or type(e).__name__
            number = getattr(e, "errno", None) or ""
            with contextlib.suppress(OSError):
                os.write(write_end, f"{type(e).__name__}{_SEP}{number}{_SEP}{text}".encode())
        finally:
            os._exit(code)  # no atexit: HDF5 must not flush (or crash) again
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        raise RuntimeError(f"the HDF5 library crashed (signal {signal.Signals(number).name}) "
                           f"while writing {what}")
    if os.WEXITSTATUS(status) == 0:
        return
    kind, number, text = (b"".join(chunks).decode("utf-8", "replace").split(_SEP, 2) + ["", ""]
                          )[:3]
    if number.isdigit():
        raise OSError(int(number), text)
    if "errno = 28" in text or "No space left" in text:
        raise OSError(errno.ENOSPC, text)
    if "errno = 27" in text or "too large" in text:
        raise OSError(errno.EFBIG, text)
    raise RuntimeError(f"{kind}: {text}" if kind else f"writing {what} failed")
