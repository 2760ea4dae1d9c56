"""Join shard files of one run into a ``results.h5`` that reads like an unsharded run.

Each shard wrote a contiguous block of images to ``results.shard-<i>-of-<N>.h5``. The
merged file maps every dataset onto those blocks with HDF5 virtual datasets whose
sources are relative file names, so the run folder can be moved as a whole; with
``copy=True`` the arrays are copied instead and the shards are no longer needed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np

from .errors import StoreError
from .store import PENDING, _walk, open_results

log = logging.getLogger(__name__)
SHARD_RE = re.compile(r"results\.shard-(\d+)-of-(\d+)\.h5$")
MERGED_ATTRS = {"shard": 0, "num_shards": 1, "first_index": 0}


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
    """Whether every shard file exists and has no pending image."""
    try:
        n, shards = shard_files(run_dir)
    except StoreError:
        return False
    if len(shards) != n:
        return False
    for p in shards.values():
        with open_results(p) as f:
            if (f["images/status"][:] == PENDING).any():
                return False
    return True


def merge_shards(run_dir: str | os.PathLike, copy: bool = False) -> Path:
    """Write ``run_dir/results.h5`` over all shards (virtual, or a real copy)."""
    run_dir = Path(run_dir)
    n, shards = shard_files(run_dir)
    missing = sorted(set(range(n)) - set(shards))
    if missing:
        raise StoreError(f"cannot merge {run_dir}: shards {missing} of {n} are missing")
    out = run_dir / "results.h5"
    if out.exists():
        with h5py.File(out, "r") as f:
            if "merged_from" not in f.attrs:
                raise StoreError(f"{out} exists and is not a merge of shards; not replacing it")
    files = [open_results(shards[i]) for i in range(n)]
    try:
        first = files[0]
        fingerprints = {f.attrs["fingerprint"] for f in files}
        if len(fingerprints) > 1:
            raise StoreError(f"shards in {run_dir} come from different configs")
        total = int(first.attrs["n_total"])
        starts = [int(f.attrs["first_index"]) for f in files]
        counts = [int(f["images/status"].shape[0]) for f in files]
        if starts != list(np.cumsum([0, *counts[:-1]])) or sum(counts) != total:
            raise StoreError(f"shards in {run_dir} do not tile the {total} images")
        pending = sum(int((f["images/status"][:] == PENDING).sum()) for f in files)
        if pending:
            log.warning("merging %s with %d images still pending", run_dir, pending)
        tmp = out.with_name(f".results.h5.tmp-{os.getpid()}")
        with h5py.File(tmp, "w", libver=("earliest", "v110")) as dst:
            for key, value in first.attrs.items():
                dst.attrs[key] = value
            dst.attrs.update(MERGED_ATTRS)
            dst.attrs["n_images"] = total
            dst.attrs["merged_from"] = json.dumps([shards[i].name for i in range(n)])
            dst.attrs["merge"] = "copy" if copy else "virtual"
            for key, ds in _walk(first):
                shape = (total, *ds.shape[1:])
                if copy:
                    target = dst.create_dataset(key, shape=shape, dtype=ds.dtype,
                                                chunks=ds.chunks)
                    for f, start, count in zip(files, starts, counts, strict=True):
                        target[start:start + count] = f[key][...]
                else:
                    layout = h5py.VirtualLayout(shape=shape, dtype=ds.dtype)
                    for i, (start, count) in enumerate(zip(starts, counts, strict=True)):
                        # A relative name: HDF5 looks for it beside the merged file.
                        src = h5py.VirtualSource(shards[i].name, key, shape=(count, *shape[1:]),
                                                 dtype=ds.dtype)
                        layout[start:start + count] = src
                    target = dst.create_virtual_dataset(key, layout)
                for k, v in ds.attrs.items():
                    target.attrs[k] = v
        os.replace(tmp, out)
    finally:
        for f in files:
            f.close()
        if "tmp" in locals():
            Path(tmp).unlink(missing_ok=True)
    return out


def merge_if_complete(run_dir: Path) -> Path | None:
    """Merge once the last shard is done; None while shards are pending or another shard
    is merging right now.

    The lock is a POSIX record lock on ``.merge.lock`` (``lockf``: honoured across NFS
    clients), which the kernel drops when its holder exits or is killed, so a shard killed
    while merging leaves nothing stale behind: the next shard to finish (or a rerun) merges.
    A merged file newer than every shard is kept as it is.
    """
    if not shards_complete(run_dir):
        return None
    with open(run_dir / ".merge.lock", "a") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a shard that is merging now
            return None
        out = run_dir / "results.h5"
        _, shards = shard_files(run_dir)
        if out.exists() and out.stat().st_mtime >= max(p.stat().st_mtime
                                                       for p in shards.values()):
            return out
        return merge_shards(run_dir)  # the lock goes with the file's closing
