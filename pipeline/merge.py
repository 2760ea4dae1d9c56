"""Join shard files of one run into a ``results.h5`` that reads like an unsharded run.

Each shard wrote a contiguous block of images to ``results.shard-<i>-of-<N>.h5``. The
merged file maps every dataset onto those blocks with HDF5 virtual datasets whose
sources are relative file names, so the run folder can be moved as a whole; with
``copy=True`` the arrays are copied (chunk by chunk) and the shards are no longer needed.
The merged file names each shard with its ``run_id``; readers refuse it when a shard is
missing or was replaced (a virtual dataset would silently read zeros).

This module decides what to merge and when (locks, shard discovery, checks that the shards
tile one run); the file writes are :mod:`pipeline.store.mergefile`'s.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from .errors import StoreError
from .locks import lock_is_held, run_dir_lock, writer_lock
from .store import DONE, PENDING, attr_list, open_results, read_column, remove_stale_temporaries
from .store.mergefile import is_merge, write_merge

log = logging.getLogger(__name__)
SHARD_RE = re.compile(r"results\.shard-(\d+)-of-(\d+)\.h5$")
SAME_RUN = ("fingerprint", "listing_sha256", "n_total")  # attributes all shards share


def shard_files(run_dir: Path) -> tuple[int, dict[int, Path]]:
    """(num_shards, {shard: path}) of the shard files in ``run_dir``."""
    found: dict[int, dict[int, Path]] = {}
    for p in run_dir.iterdir():
        m = SHARD_RE.fullmatch(p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if not found:
        raise StoreError(f"{run_dir} holds no results.shard-<i>-of-<N>.h5 files to merge")
    if len(found) > 1:
        raise StoreError(f"{run_dir} mixes shard counts {sorted(found)}; keep one")
    (n, shards), = found.items()
    return n, shards


def shards_complete(run_dir: Path) -> bool:
    """Whether every shard file exists, none is being written and none has an image left
    to do (pending; failed ones count as finished)."""
    try:
        n, shards = shard_files(run_dir)
    except StoreError:
        return False
    if len(shards) != n or any(lock_is_held(p) for p in shards.values()):
        return False
    for p in shards.values():
        with open_results(p) as f:
            if (read_column(f, "images/status") == PENDING).any():
                return False
    return True


def _up_to_date(out: Path, shards: dict[int, Path]) -> bool:
    """Whether ``out`` is a virtual merge of exactly these shard files."""
    if not out.exists():
        return False
    try:
        with open_results(out) as f:  # validates that every recorded shard is the same file
            entries = attr_list(f.attrs.get("merged_from"))
            virtual = f.attrs.get("merge") == "virtual"
    except StoreError:
        return False
    return virtual and [e.get("file") if isinstance(e, dict) else e for e in entries] == [
        shards[i].name for i in sorted(shards)]


def merge_shards(run_dir: str | os.PathLike, copy: bool = False) -> Path:
    """Write ``run_dir/results.h5`` over all shards (virtual, or a real copy), holding the
    merged file's writer lock. Merging an already merged run again is allowed."""
    run_dir = Path(run_dir)
    out = run_dir / "results.h5"
    with run_dir_lock(run_dir, "merging"), writer_lock(out, "merging"):
        return _merge(run_dir, out, copy)


def _merge(run_dir: Path, out: Path, copy: bool) -> Path:
    n, shards = shard_files(run_dir)
    missing = sorted(set(range(n)) - set(shards))
    if missing:
        raise StoreError(f"cannot merge {run_dir}: shards {missing} of {n} are missing")
    busy = [p.name for p in shards.values() if lock_is_held(p)]
    if busy:
        raise StoreError(f"cannot merge {run_dir}: {', '.join(busy)} still being written; "
                         "the last shard to finish merges")
    if out.exists() and not is_merge(out):
        raise StoreError(f"{out} exists and is not a merge of shards; not replacing it")
    remove_stale_temporaries(out)
    files = [open_results(shards[i]) for i in range(n)]
    try:
        for key in SAME_RUN:
            if len({str(f.attrs.get(key)) for f in files}) > 1:
                raise StoreError(f"shards in {run_dir} come from different runs ({key} differs)")
        total = int(files[0].attrs["n_total"])
        starts = [int(f.attrs["first_index"]) for f in files]
        counts = [int(f["images/status"].shape[0]) for f in files]
        if starts != list(np.cumsum([0, *counts[:-1]])) or sum(counts) != total:
            raise StoreError(f"shards in {run_dir} do not tile the {total} images")
        not_done = sum(int((read_column(f, "images/status") != DONE).sum()) for f in files)
        if not_done:
            log.warning("merging %s with %d images not done", run_dir, not_done)
        write_merge(out, files, [shards[i].name for i in range(n)], copy)
    finally:
        for f in files:
            f.close()
    return out


def merge_if_complete(run_dir: Path) -> Path | None:
    """Merge once the last shard is done; None while other shards are still being written.

    Called by each shard after it released its own writer lock. The merged file's lock is
    waited for (a merge is short), so of shards finishing together the last one to release
    its lock always sees every shard finished and merges; the others return None. A merged
    file of exactly these shards is kept as it is (and returned: it may be drawn from). The
    log says which of the two happened, so exactly one shard reports the merge.
    """
    out = run_dir / "results.h5"
    with run_dir_lock(run_dir, "merging", shared=True), writer_lock(out, "merging", wait=True):
        if not shards_complete(run_dir):
            return None
        _, shards = shard_files(run_dir)
        if _up_to_date(out, shards):  # another shard finishing with this one merged first
            log.info("%s already merges these shards", out)
            return out
        merged = _merge(run_dir, out, copy=False)
        log.info("all shards done, merged -> %s", merged)
        return merged
