"""Axis names: the ``dims`` attribute of every dataset and the HDF5 dimension scales
(netCDF-4 conventions) that let xarray or plain h5py read a file without our code."""

from __future__ import annotations

import json

import h5py
import numpy as np

from .format import ACTIVATIONS, ATTRIBUTION, INPUT_MAP, LAYER_MAP, RAGGED, STR, WEIGHTS, walk

DIMS = {
    "images/path": ["image"], "images/label": ["image"], "images/status": ["image"],
    "images/error": ["image"], "images/size": ["image", "hw"], "images/input_size": ["image", "hw"],
    "images/box": ["image", "y0x0y1x1"],
    "images/index": ["image"], "images/nonfinite": ["image"],
    "images/content_hash": ["image"], "images/file_size": ["image"], "images/mtime_ns": ["image"],
    "targets/class": ["image", "class"], "targets/score": ["image", "class"],
    "predictions/class": ["image", "rank"], "predictions/prob": ["image", "rank"],
    LAYER_MAP: ["image", "h", "w"], WEIGHTS: ["image", "channel"],
    INPUT_MAP: ["image", "height", "width"], ATTRIBUTION: ["image", "channel", "height", "width"],
    ACTIVATIONS: ["image", "channel", "h", "w"],
}


def dataset_dims(key: str, kind: str | None, ndim: int) -> list[str]:
    dims = DIMS.get(key) or DIMS.get(kind or "", [])
    if kind is not None and "/" in key and len(dims) + 1 == ndim:  # target=topk: class axis
        dims = [dims[0], "class", *dims[1:]]
    if len(dims) != ndim:  # e.g. pooled activations (image, channel)
        extra = [f"d{i}" for i in range(len(dims), ndim)]
        dims = dims[:ndim] if len(dims) > ndim else dims + extra
    return dims


SCALE_ATTRS = ("CLASS", "NAME", "DIMENSION_LIST", "REFERENCE_LIST", "_Netcdf4Dimid")
_NO_VARIABLE = "This is a netCDF dimension but not a netCDF variable.%10d"


def attach_dims(f: h5py.File, paths: list[str] | np.ndarray) -> None:
    """Name every axis with an HDF5 dimension scale (netCDF-4 conventions), so that
    ``xarray.open_dataset(path, engine="h5netcdf", group=G)`` shows named dims and the image
    paths as the ``image`` coordinate.

    Scales live in the group of the datasets they label: an ``image`` coordinate (the paths)
    and one axis per other dim name. Axes of one name but different sizes within a group
    (``h`` of layer3 and of layer4) get the dataset's name as a suffix: ``h_layer4``.
    Called when a file is created or merged, never during a run.
    """
    paths = np.asarray(paths, dtype=object)
    groups: dict[str, list[tuple[str, h5py.Dataset, list[str]]]] = {}
    for key, ds in walk(f):
        if "/" not in key or ds.attrs.get("encoding") == RAGGED:  # no per-image axis
            continue
        group, name = key.rsplit("/", 1)
        dims = json.loads(ds.attrs["dims"])
        groups.setdefault(group, []).append((name, ds, dims))
    for group, members in groups.items():
        g = f[group]
        sizes: dict[str, set[int]] = {}
        for _, ds, dims in members:
            for dim, size in zip(dims[1:], ds.shape[1:], strict=True):
                sizes.setdefault(dim, set()).add(size)
        image = g.create_dataset("image", data=paths, dtype=STR)
        image.make_scale("image")
        scales: dict[str, h5py.Dataset] = {}
        for name, ds, dims in members:
            named = ["image"]
            ds.dims[0].attach_scale(image)
            for axis, (dim, size) in enumerate(zip(dims[1:], ds.shape[1:], strict=True), 1):
                label = dim if len(sizes[dim]) == 1 else f"{dim}_{name}"
                if label in g and label not in scales:  # a variable of that name (targets/class)
                    label = f"{label}_dim"
                if label not in scales:
                    scales[label] = g.create_dataset(label, shape=(size,), dtype=np.float32)
                    scales[label].make_scale(_NO_VARIABLE % size)
                ds.dims[axis].attach_scale(scales[label])
                named.append(label)
            ds.attrs["dims"] = json.dumps(named)
