"""Checking a file before anyone reads it: that it is a camsweep results file of a version we
know, and that its structure is what every reader relies on; a damaged or forged file is one
clear :class:`StoreError`."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from .checksums import checksummed
from .format import FAILED, FORMAT, FORMAT_VERSION, RAGGED, REQUIRED, attr_list, stored_maps, walk
from .ragged import check_ragged, ragged_keys
from .received import check_contained, check_map_types


def check_format(f: h5py.File, path: str | os.PathLike) -> None:
    if f.attrs.get("format") != FORMAT:
        fmt = f.attrs.get("format")
        raise StoreError(f"{path} is not a camsweep results file (format={fmt!r})")
    version = int(f.attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} has format_version {version}, newer than this camsweep reads "
            f"({FORMAT_VERSION}); upgrade camsweep"
        )
    if version < 1:
        raise StoreError(f"{path} has an invalid format_version {version}")


def validate(f: h5py.File, path: str | os.PathLike) -> None:
    """Check what every reader relies on; a damaged or forged file is one clear error.

    The per-image tables exist with one row per image, every dataset has that many rows,
    status bytes are 0, 1 or 2, the layer list parses, and a merged file still finds the
    very shard files it was merged from.
    """
    try:
        n = f["images/status"].shape[0] if "images/status" in f else None
        missing = [k for k in REQUIRED if k not in f or not isinstance(f[k], h5py.Dataset)]
        if missing:
            raise StoreError(f"{path} is damaged: missing {', '.join(missing)}")
        check_contained(f, path)  # before anything reads data: nothing outside the file
        if "merged_from" in f.attrs:
            check_shards(f, path)  # before reading rows: a missing source reads as zeros
        ragged = ragged_keys(f)
        for key in ragged:
            check_ragged(f, key, n, path)
        check_map_types(f, path, ragged)
        checksummed(f)  # the checksum table's shape and names
        for key, ds in walk(f):
            if key.split("/")[0] == "metrics":  # files of before the metrics file
                continue
            if ds.attrs.get("encoding") == RAGGED:
                if key not in ragged:
                    raise StoreError(f"{path} is damaged: {key} is ragged but not listed in "
                                     "the root attribute ragged_maps")
                continue
            if not ds.shape or ds.shape[0] != n:
                raise StoreError(f"{path} is damaged: {key} has shape {ds.shape}, expected "
                                 f"{n} rows")
        status = f["images/status"][:]
        if status.dtype != np.uint8 or (status > FAILED).any():
            bad = int(np.flatnonzero(status > FAILED)[0]) if (status > FAILED).any() else 0
            raise StoreError(f"{path} is damaged: /images/status holds {int(status[bad])} at row "
                             f"{bad} (valid: 0 pending, 1 done, 2 failed)")
        check_own_maps(f, path)
    except StoreError:
        raise
    except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:
        raise StoreError(f"{path} is damaged: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e


def check_own_maps(f: h5py.File, path: str | os.PathLike) -> None:
    """The run's own maps are all there: one per target layer (or its input map), so a
    deleted dataset is an error, not a picture or a metric quietly missing."""
    method = str(f.attrs.get("method", ""))
    own = [m for m in stored_maps(f) if m.group == method]
    names = {m.layer for m in own} | {m.key.split("/", 1)[1] for m in own}
    layers = [str(name) for name in attr_list(f.attrs.get("target_layers"))]
    missing = [name for name in layers if name not in names]
    if missing or not own:
        what = ", ".join(f"/{method}/{name}" for name in missing) or f"every /{method}/ map"
        raise StoreError(f"{path} is damaged: {what} missing (target_layers: {layers or '[]'}); "
                         "rerun the extraction with overwrite=true")


def check_shards(f: h5py.File, path: str | os.PathLike) -> None:
    """A merged file reads its shards through virtual datasets: each must be there and be
    the file that was merged (its ``run_id``), or the merge would show zeros as results."""
    folder = Path(path).parent
    for entry in attr_list(f.attrs["merged_from"]):
        name, run_id = (entry, None) if isinstance(entry, str) else (entry["file"],
                                                                    entry.get("run_id"))
        shard = folder / name
        hint = "restore it, or rerun the shards and stage=merge"
        if not shard.is_file():
            raise StoreError(f"{path} is a merge of shards, but {name} is missing; {hint}")
        if run_id is not None:
            try:
                with h5py.File(shard, "r") as s:
                    found = s.attrs.get("run_id")
            except OSError as e:
                raise StoreError(f"{path}: shard {name} does not open ({e}); {hint}") from e
            if found != run_id:
                raise StoreError(f"{path}: shard {name} was replaced since the merge (run_id "
                                 f"{found} != {run_id}); run stage=merge again")
