"""Checks for files someone may send you (``validate`` runs them before any row is read):
nothing in a results file reaches outside it, and every map has the dtype, rank and shape
the format gives its kind.

Outside the file: external links and soft links are not part of the format; raw data stored
in external files, and virtual datasets, are refused, except the virtual datasets of a merge
written by camsweep, whose every source must be one of its recorded shards (same dataset
path). Without this a virtual dataset whose source is missing reads as zeros, and one that
names /etc/passwd reads (or fails to read) whatever that file holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from .format import (
    ACTIVATIONS,
    ATTRIBUTION,
    IMAGE_TABLES,
    INPUT_MAP,
    INPUT_SIZE,
    LAYER_MAP,
    RAGGED,
    WEIGHTS,
    attr_list,
    kind_of,
    walk,
)

# Ranks of a fixed-size (N, ...) dataset per kind; ``True``: a target=topk file adds a
# class axis after the image axis. A ragged map's row has one axis less (no image axis).
RANKS = {LAYER_MAP: ({3}, True), INPUT_MAP: ({3}, True), WEIGHTS: ({2}, True),
         ATTRIBUTION: ({4}, True), ACTIVATIONS: ({2, 3, 4}, False)}
LINKS = {h5py.ExternalLink: "an external link", h5py.SoftLink: "a soft link"}
# Kinds whose last two axes are the model input's height and width.
INPUT_SIZED = (INPUT_MAP, ATTRIBUTION)


def merged_sources(f: h5py.File) -> set[str]:
    """File names a merged file may read from: its recorded shards (plain names beside it)."""
    names = set()
    for entry in attr_list(f.attrs.get("merged_from")):
        name = entry if isinstance(entry, str) else entry.get("file") if isinstance(
            entry, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise StoreError(f"{f.filename} is damaged: merged_from names {name!r}, not a file "
                             "beside it")
        names.add(name)
    return names


def check_contained(f: h5py.File, path: str | os.PathLike) -> None:
    """Nothing reads outside the file but a camsweep merge's virtual datasets over its
    shards. Reads metadata only."""
    merged = "merged_from" in f.attrs
    allowed = merged_sources(f) if merged else set()
    links: list[tuple[str, str]] = []
    f.visititems_links(lambda k, link: links.append((k, LINKS.get(type(link), "a link")))
                       if not isinstance(link, h5py.HardLink) else None)
    if links:
        key, kind = links[0]
        raise StoreError(f"{path} is refused: /{key} is {kind} (a camsweep file has none; it "
                         "may read another file)")
    for key, ds in walk(f):
        if ds.external:
            raise StoreError(f"{path} is refused: /{key} keeps its data in another file "
                             f"({ds.external[0][0]}); a camsweep file has none")
        if not ds.is_virtual:
            continue
        if not merged:
            raise StoreError(f"{path} is refused: /{key} is a virtual dataset, and the file is "
                             "not a merge written by camsweep (no merged_from)")
        for source in ds.virtual_sources():
            if source.file_name not in allowed or source.dset_name.lstrip("/") != key:
                raise StoreError(f"{path} is refused: /{key} reads {source.file_name}:"
                                 f"{source.dset_name}, not /{key} of a shard in merged_from")


def check_map_types(f: h5py.File, path: str | os.PathLike, ragged: list[str]) -> None:
    """Every map (and weights, attributions, activations) is floating point, of the rank
    its kind has, with the class axis of a target=topk file as long as ``/targets/class``'s;
    a ragged input-resolution map has each image's input size."""
    targets = f["targets/class"]
    k = int(targets.shape[1]) if targets.ndim == 2 else None
    input_size = f[INPUT_SIZE][:] if ragged and INPUT_SIZE in f else None
    for key, ds in walk(f):
        group = key.split("/")[0]
        if group in (*IMAGE_TABLES, "metrics", RAGGED, "checksums") or key.count("/") != 1:
            continue
        kind = ds.attrs.get("kind") or kind_of(key)
        if kind not in RANKS:
            continue
        if ds.dtype.kind != "f":
            raise StoreError(f"{path} is damaged: /{key} has dtype {ds.dtype} ({kind} maps are "
                             "float16 or float32)")
        ranks, class_axis = RANKS[kind]
        if key in ragged:
            shapes = f[f"{RAGGED}/{key}/shape"]
            rank, lead = 1 + int(shapes.shape[1]), None
        else:
            rank, lead = ds.ndim, (ds.shape[1] if ds.ndim > 1 else None)
        allowed = ranks | ({r + 1 for r in ranks} if class_axis and k is not None else set())
        if rank not in allowed:
            raise StoreError(f"{path} is damaged: /{key} has {rank} axes (image axis included),"
                             f" expected {' or '.join(map(str, sorted(allowed)))} for a {kind}")
        topk = class_axis and rank not in ranks
        if topk and lead is not None and lead != k:
            raise StoreError(f"{path} is damaged: /{key} has {lead} classes, /targets/class "
                             f"{k}")
        if key in ragged:
            _check_ragged_rows(f, key, path, input_size if kind in INPUT_SIZED else None,
                               k if topk else None)


def _check_ragged_rows(f: h5py.File, key: str, path: str | os.PathLike,
                       input_size: np.ndarray | None, k: int | None) -> None:
    """Each reserved row's shape: ``k`` classes first (target=topk), the image's input
    height and width last (input-resolution maps)."""
    shapes = f[f"{RAGGED}/{key}/shape"][:].astype(np.int64)
    reserved = shapes.any(axis=1)
    bad = np.zeros(len(shapes), bool)
    if input_size is not None:
        bad |= reserved & (shapes[:, -2:] != input_size[:, :2]).any(axis=1)
    if k is not None:
        bad |= reserved & (shapes[:, 0] != k)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        want = f"input {tuple(input_size[row].tolist())}" if input_size is not None else ""
        want += f"{', ' if want else ''}{k} classes" if k is not None else ""
        raise StoreError(f"{path} is damaged: /{key} of row {row} has shape "
                         f"{tuple(shapes[row].tolist())}, not that of its image ({want})")
