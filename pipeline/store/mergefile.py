"""The file writes of merging shards (``pipeline.merge`` decides what to merge): a merged
``results.h5`` whose datasets are virtual datasets over the shard files (relative names, so
the run folder can move as a whole), or copies of them, chunk by chunk.

Ragged maps merge into one ragged map: the shards' flat values one after the other, and the
row index copied with each shard's offsets moved by the values of the shards before it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..progress import Progress
from .atomic import atomic_output
from .dims import SCALE_ATTRS, attach_dims
from .format import RAGGED, walk
from .isolate import run_isolated
from .ragged import DIGEST, index_digest, ragged_keys
from .space import check_room, write_error

MERGED_ATTRS = {"shard": 0, "num_shards": 1, "first_index": 0}


def is_merge(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a merge of shards written by camsweep (root ``merged_from``); a
    file that does not open as HDF5 is not one."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return "merged_from" in f.attrs
    except OSError:
        return False


def write_merge(out: Path, files: list[h5py.File], names: list[str], copy: bool) -> None:
    """Write ``out`` over the open shard files ``files`` (named ``names`` beside ``out``, in
    image order), as virtual datasets or, with ``copy``, as copies; replace atomically."""
    check_room(out, merged_size(files, copy), "needs")
    try:
        with atomic_output(out) as tmp:
            def build() -> None:
                with h5py.File(tmp, "w", libver=("earliest", "v110")) as dst:
                    _fill(dst, files, names, copy)

            run_isolated(build, str(tmp))  # a full disk must not crash this process
    except (OSError, RuntimeError) as e:  # a full disk while writing the merge
        raise write_error(out, e, "; the shards are untouched") from e


def merged_size(files: list[h5py.File], copy: bool) -> int:
    """An upper bound of the merged file's size: the shards' values when copied, else the
    virtual datasets' mappings, the copied ragged index and the paths per group."""
    values = sum(ds.id.get_storage_size() for f in files for _, ds in walk(f)) if copy else 0
    datasets = len(walk(files[0]))
    paths = sum(int(f["images/path"].shape[0]) for f in files) * 300
    groups = len({key.split("/")[0] for key, _ in walk(files[0])})
    index = sum(f[key].nbytes for f in files for key, _ in walk(f) if key.startswith(RAGGED))
    return int((values + index + paths * (1 + groups) + (64 << 10)
                + datasets * len(files) * (8 << 10)) * 1.05)


def _fill(dst: h5py.File, files: list[h5py.File], names: list[str], copy: bool) -> None:
    first = files[0]
    total = sum(int(f["images/status"].shape[0]) for f in files)
    counts = [int(f["images/status"].shape[0]) for f in files]
    for key, value in first.attrs.items():
        dst.attrs[key] = value
    dst.attrs.update(MERGED_ATTRS)
    dst.attrs["n_images"] = total
    dst.attrs["merged_from"] = json.dumps([
        {"file": name, "run_id": str(f.attrs.get("run_id", ""))}
        for name, f in zip(names, files, strict=True)])
    dst.attrs["merge"] = "copy" if copy else "virtual"
    keys = walk(first)
    # A copy of a large run takes minutes: a bar on a terminal, lines in job logs.
    progress = Progress(len(keys), f"merge {'copy' if copy else 'virtual'}", unit="dataset")
    for key, ds in keys:
        progress.update()
        if key.startswith(f"{RAGGED}/"):  # the row index of a ragged map
            _merge_index(dst, key, files)
            continue
        ragged = ds.attrs.get("encoding") == RAGGED
        lengths = [int(f[key].shape[0]) for f in files] if ragged else counts
        firsts = [int(v) for v in np.cumsum([0, *lengths[:-1]])]
        shape = (sum(lengths) if ragged else total, *ds.shape[1:])
        if copy or not shape[0]:  # (HDF5 has no empty virtual dataset)
            target = dst.create_dataset(key, shape=shape, dtype=ds.dtype,
                                        chunks=ds.chunks if shape[0] else None)
            step = ds.chunks[0] if ds.chunks else 1024
            for f, start, count in zip(files, firsts, lengths, strict=True):
                for lo in range(0, count, step):  # bounded memory: a chunk at a time
                    hi = min(count, lo + step)
                    target[start + lo:start + hi] = f[key][lo:hi]
        else:
            layout = h5py.VirtualLayout(shape=shape, dtype=ds.dtype)
            for name, start, count in zip(names, firsts, lengths, strict=True):
                if not count:  # a shard without values of this map
                    continue
                # A relative name: HDF5 looks for it beside the merged file.
                src = h5py.VirtualSource(name, key, shape=(count, *shape[1:]), dtype=ds.dtype)
                layout[start:start + count] = src
            target = dst.create_virtual_dataset(key, layout)
        for k, v in ds.attrs.items():
            if k not in SCALE_ATTRS:  # scales are the merged file's own, below
                target.attrs[k] = v
    progress.close()
    for key in ragged_keys(first):  # the merged index, vouched for like a created one
        index = dst[f"{RAGGED}/{key}"]
        index.attrs[DIGEST] = index_digest(index["offset"][:], index["shape"][:])
    paths = np.concatenate([f["images/path"].asstr()[:] for f in files])
    attach_dims(dst, paths)


def _merge_index(dst: h5py.File, key: str, files: list[h5py.File]) -> None:
    """Copy ``ragged/<map>/offset`` or ``.../shape`` of every shard into ``dst``; offsets
    move by the length of the shards' values before (they index the merged values)."""
    parts = [f[key][:] for f in files]
    if key.endswith("/offset"):
        values = key.removeprefix(f"{RAGGED}/").rsplit("/", 1)[0]
        before = np.cumsum([0, *[int(f[values].shape[0]) for f in files[:-1]]])
        parts = [p.astype(np.int64) + int(b) for p, b in zip(parts, before, strict=True)]
    target = dst.create_dataset(key, data=np.concatenate(parts))
    for k, v in files[0][key].attrs.items():
        if k not in SCALE_ATTRS:
            target.attrs[k] = v
