"""``stage=verify``: re-read every results file of a run, a merged run or a sweep folder
against its row checksums, and name each damaged row (file, row, dataset).

Reads only (no torch, no lock): a run being written can be verified; its rows not done yet
are not checked. A virtual merge is verified through the shards it reads, so a damaged row
is named in the file that holds its bytes; the merged file's own structure is checked too.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from .errors import StoreError
from .store import attr_list, open_results
from .store.audit import FileCheck, verify_results

log = logging.getLogger(__name__)
RESULTS_RE = re.compile(r"results(\.shard-\d+-of-\d+)?\.h5$")


def results_files(root: Path) -> list[Path]:
    """Every results file under ``root`` (a run, a merged run or a sweep folder), in path
    order; a virtual merge stands for its shards, which are listed instead of its rows."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise StoreError(f"nothing to verify at {root}: no such folder")
    found = sorted(Path(d) / name for d, _, names in os.walk(root) for name in names
                   if RESULTS_RE.fullmatch(name))
    if not found:
        raise StoreError(f"nothing to verify under {root}: no results.h5 or "
                         "results.shard-<i>-of-<N>.h5")
    return found


def _virtual_merge(path: Path) -> bool:
    if path.name != "results.h5":
        return False
    try:
        with open_results(path) as f:
            return f.attrs.get("merge") == "virtual" and bool(attr_list(f.attrs["merged_from"]))
    except (StoreError, KeyError):
        return False


def verify_stage(cfg: Any, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Verify every results file under ``run_dir``; raise one :class:`StoreError` line (exit
    2) when a row is damaged or a file is refused, after logging each damaged row."""
    root = Path(run_dir)
    start = time.perf_counter()
    checks: list[FileCheck] = []
    for path in results_files(root):
        if _virtual_merge(path):  # its shards are verified as files of their own
            check = FileCheck(path)
            try:
                open_results(path).close()  # the merge's structure and its shards' identity
            except StoreError as e:
                check.error = str(e)
            check.note = "a virtual merge: its rows were verified in its shards"
        else:
            check = verify_results(path)
        checks.append(check)
        for row, key, reason in check.damaged:
            log.error("damaged: %s row %d /%s: %s", path, row, key, reason)
        if check.error:
            log.error("refused: %s", check.error)
        elif check.note and not check.rows:
            log.info("%s: %s", path, check.note)
        else:
            if check.note:
                log.warning("%s: %s", path, check.note)
            log.info("%s: %d done rows, %.1f MB checked, %s", path, check.rows,
                     check.nbytes / 1e6, "clean" if check.clean else
                     f"{len(check.damaged)} damaged rows")
    seconds = time.perf_counter() - start
    nbytes = sum(c.nbytes for c in checks)
    damaged = [(str(c.path), row, key, reason) for c in checks for row, key, reason in c.damaged]
    refused = [c.error for c in checks if c.error]
    log.info("verified %d files, %.2f GB in %.1f s (%.2f GB/s)", len(checks), nbytes / 1e9,
             seconds, nbytes / 1e9 / max(seconds, 1e-9))
    if damaged or refused:
        first = (f"first: {damaged[0][0]} row {damaged[0][1]} /{damaged[0][2]}" if damaged
                 else f"first: {refused[0]}")
        raise StoreError(f"verify found {len(damaged)} damaged rows and {len(refused)} refused "
                         f"files among {len(checks)} under {root} ({first}); the log names "
                         "each; restore those files from a copy, or rerun with overwrite=true")
    return {"files": len(checks), "bytes": nbytes, "seconds": seconds,
            "unchecked": [str(c.path) for c in checks if c.note.startswith("no checksums")]}
