"""Content identity of a run's images: what each done row was computed from.

When the loader reads an image it hashes the very bytes it decodes (xxh3_64) and notes the
file's size and mtime; the row stores them with its arrays (``/images/content_hash``,
``/images/file_size``, ``/images/mtime_ns``). A resume compares every done row's file by a
stat (no reads); a file whose size or mtime differ is read and hashed once, so a file that
was only touched or copied is no change. Rows whose content did change are refused in one
line, or with ``resume_changed=recompute`` marked pending and computed again: a results
file never mixes the maps of two versions of one image.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunRefused, printable
from .images import CONTENT_HASH, read_file
from .store import DONE, mark_pending, open_results, read_column

CONTENT_KEYS = ("images/content_hash", "images/file_size", "images/mtime_ns")


def has_content(f: Any) -> bool:
    """Whether a results file records its rows' content (files of before it do not)."""
    return all(key in f for key in CONTENT_KEYS)


def content_arrays(content: np.ndarray) -> dict[str, np.ndarray]:
    """A batch's (n, 3) uint64 hash, size, mtime (the loader's ``content``) as the arrays
    the results file stores."""
    content = np.asarray(content, np.uint64).reshape(-1, 3)
    return {"images/content_hash": content[:, 0],
            "images/file_size": content[:, 1].astype(np.int64),
            "images/mtime_ns": content[:, 2].astype(np.int64)}


def _why_changed(path: str, content_hash: int, size: int, mtime_ns: int) -> str | None:
    """Why the file at ``path`` is not what a row was computed from, or None."""
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or type(e).__name__
    if st.st_size == size and st.st_mtime_ns == mtime_ns:
        return None
    try:
        _, facts = read_file(path)  # size or mtime differ: the bytes decide
    except (OSError, ValueError) as e:
        return str(e) if isinstance(e, ValueError) else (e.strerror or type(e).__name__)
    if facts.content_hash == content_hash:
        return None  # touched or copied, same bytes
    if facts.size != size:
        return f"{size} -> {facts.size} bytes"
    return f"same size, other content ({CONTENT_HASH} {content_hash:016x} -> " \
           f"{facts.content_hash:016x})"


def changed_rows(f: Any, threads: int = 16) -> dict[int, str]:
    """Done rows of the open results file ``f`` whose image changed since: row -> why.

    One stat per done row (a few threads: a network file system answers in parallel);
    only files whose size or mtime differ are read. Rows without a stored hash (0) are
    not judged.
    """
    if not has_content(f):
        return {}
    done = np.flatnonzero(read_column(f, "images/status") == DONE)
    hashes = read_column(f, "images/content_hash")
    done = done[hashes[done] != 0]
    if not len(done):
        return {}
    paths = read_column(f, "images/path")
    sizes, mtimes = read_column(f, "images/file_size"), read_column(f, "images/mtime_ns")

    def one(row: int) -> str | None:
        return _why_changed(paths[row], int(hashes[row]), int(sizes[row]), int(mtimes[row]))

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(done)))) as pool:
        found = list(pool.map(one, done.tolist()))
    return {int(r): why for r, why in zip(done, found, strict=True) if why is not None}


def describe(f: Any, changed: dict[int, str], show: int = 3) -> str:
    """The first few changed files with why, and how many in all, for one line."""
    rows = sorted(changed)
    named = ", ".join(f"{printable(read_column(f, 'images/path', r))} ({changed[r]})"
                      for r in rows[:show])
    more = f" and {len(rows) - show} more" if len(rows) > show else ""
    return f"{len(rows)} image(s) changed since their rows were done: {named}{more}"


def check_resume(path: Path, how: str) -> int:
    """Compare the done rows of ``path`` with their files before a resume (call with the
    writer lock held). ``how``: ``refuse`` raises :class:`RunRefused` naming the changed
    files; ``recompute`` marks exactly those rows pending. Returns how many were marked."""
    with open_results(path) as f:
        changed = changed_rows(f)
        if not changed:
            return 0
        line = describe(f, changed)
    if how != "recompute":
        raise RunRefused(f"{path}: {line}. Rerun with resume_changed=recompute to compute "
                         "exactly those rows again, or overwrite=true to start over")
    mark_pending(path, np.array(sorted(changed), dtype=np.int64))
    return len(changed)
