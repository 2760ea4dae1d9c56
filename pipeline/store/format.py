"""What a results file is: its name and versions, row states, dataset kinds, and the small
readers of its root attributes (map list, layouts, classes, config, identity). The layout is
docs/FORMAT.md; every other module of ``pipeline.store`` builds on these names."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError

FORMAT = "camsweep"
FORMAT_VERSION = 2  # the newest version this module reads and writes
# Fixed-size runs are written as version 1 (readable by camsweep before ragged maps);
# ragged runs (data.resize=null) as version 2, which older readers refuse.
FIXED_VERSION, RAGGED_VERSION = 1, 2
RAGGED = "ragged"  # encoding of a ragged map's flat values; group of their row index
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = ("pending", "done", "failed")
ERROR_BYTES = 256
STR = h5py.string_dtype("utf-8")
ERROR_STR = h5py.string_dtype("utf-8", ERROR_BYTES)  # fixed size: preallocated, written in place
CHUNK_BYTES = 1 << 20
INPUT_SIZE = "images/input_size"  # ragged runs: each image's model input (h, w)
IMAGE_TABLES = ("images", "targets", "predictions")
REQUIRED = ("images/path", "images/label", "images/status", "images/error", "images/size",
            "targets/class", "targets/score", "predictions/class", "predictions/prob")

# What a map dataset holds, stored as its ``kind`` attribute: readers (render, report,
# evaluate) decide how to use it without importing the methods.
LAYER_MAP, INPUT_MAP, ACTIVATIONS = "layer_map", "input_map", "activations"
WEIGHTS, ATTRIBUTION = "weights", "attribution"
MAP_KINDS = (LAYER_MAP, INPUT_MAP, ACTIVATIONS)
# Files written before datasets carried ``kind``: the group name says it.
_KIND_OF_GROUP = {
    **{g: LAYER_MAP for g in ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam",
                              "scorecam", "eigencam")},
    **{g: INPUT_MAP for g in ("saliency", "smoothgrad", "integrated_gradients",
                              "guided_backprop", "guided_gradcam")},
    "activations": ACTIVATIONS,
}

# Dimension names per dataset group, so readers without our code know the axes.

def kind_of(key: str, method_kind: str | None = None) -> str | None:
    """The ``kind`` of dataset ``group/name``: a map kind, weights, attribution, or None for
    the per-image tables. ``method_kind`` is the producing method's ("cam", "input",
    "activations"); without it the group name decides (files of before the attribute)."""
    group = key.split("/")[0]
    if group in IMAGE_TABLES:
        return None
    if group.endswith("_weights"):
        return WEIGHTS
    if group.endswith("_attribution"):
        return ATTRIBUTION
    if method_kind is not None:
        return {"cam": LAYER_MAP, "input": INPUT_MAP, "activations": ACTIVATIONS}[method_kind]
    return _KIND_OF_GROUP.get(group)


LAYOUTS_ATTR = "layer_layouts"


def layouts_attr(layouts: Mapping[str, Any]) -> dict[str, str]:
    """The root attribute ``layer_layouts`` for ``create_results``'s attrs: JSON of
    {layer: how its output became (C, h, w)} (``pipeline.layouts.Layout.as_dict``)."""
    return {LAYOUTS_ATTR: json.dumps({str(k): v.as_dict() if hasattr(v, "as_dict") else v
                                      for k, v in layouts.items()})}


def read_layouts(f: h5py.File) -> dict[str, dict[str, Any]]:
    """{layer: layout} as stored at creation; empty for files of before the attribute."""
    text = f.attrs.get(LAYOUTS_ATTR)
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError) as e:
        raise StoreError(f"{f.filename} is damaged: {LAYOUTS_ATTR} is not JSON") from e
    if not isinstance(value, dict):
        raise StoreError(f"{f.filename} is damaged: {LAYOUTS_ATTR} is not a mapping")
    return value


def is_scale(ds: h5py.Dataset) -> bool:
    """Whether ``ds`` is a dimension scale (an axis name for xarray), not per-image data."""
    return ds.attrs.get("CLASS") == b"DIMENSION_SCALE"


def walk(f: h5py.File | h5py.Group) -> list[tuple[str, h5py.Dataset]]:
    """(path, dataset) of every per-image dataset under ``f`` (dimension scales left out)."""
    out: list[tuple[str, h5py.Dataset]] = []
    f.visititems(lambda k, v: out.append((k, v))
                 if isinstance(v, h5py.Dataset) and not is_scale(v) else None)
    return out


def attr_list(value: Any) -> list[Any]:
    """A list stored as a JSON string attribute (or as an HDF5 array), as a Python list."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return list(json.loads(value)) if value else []
    return [v.decode() if isinstance(v, bytes) else v for v in np.asarray(value).tolist()]


@dataclass(frozen=True)
class MapInfo:
    """One stored map dataset: ``key`` is ``group/name`` (the HDF5 path)."""

    key: str
    group: str
    layer: str  # the layer as configured, or "input" for input-resolution maps
    kind: str  # LAYER_MAP | INPUT_MAP | ACTIVATIONS
    method: str


def stored_maps(f: h5py.File, kinds: tuple[str, ...] = MAP_KINDS) -> list[MapInfo]:
    """The map datasets of an open results file, in the run's layer order."""
    order = {name: i for i, name in enumerate(attr_list(f.attrs.get("target_layers", "[]")))}
    found = []
    for key, ds in walk(f):
        if key.count("/") != 1 or key.split("/")[0] in IMAGE_TABLES + ("metrics",):
            continue
        kind = ds.attrs.get("kind") or kind_of(key)
        if kind not in kinds:
            continue
        group, name = key.split("/")
        found.append(MapInfo(key=key, group=group, layer=str(ds.attrs.get("layer", name)),
                             kind=str(kind), method=str(ds.attrs.get("method", group))))
    return sorted(found, key=lambda m: (m.group != f.attrs.get("method"), m.group,
                                        order.get(m.layer, len(order)), m.layer))


def categories(f: h5py.File) -> list[str]:
    """Class names stored with the run, index = class (empty when the model has none)."""
    return [str(c) for c in attr_list(f.attrs.get("categories"))]


def stored_config(f: h5py.File, path: str | os.PathLike) -> dict[str, Any]:
    """The run's resolved config (attribute ``config``) as plain data: a safe YAML load,
    which never constructs Python objects, so a crafted file runs no code."""
    import yaml

    text = f.attrs.get("config")
    if not text:
        raise StoreError(f"{path} has no stored config (attribute 'config')")
    try:
        value = yaml.safe_load(str(text))
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StoreError(f"{path} is damaged: its stored config is not plain YAML "
                         f"({first})") from e
    if not isinstance(value, dict):
        raise StoreError(f"{path} is damaged: its stored config is not a mapping")
    return value


def identity(f: h5py.File) -> dict[str, str]:
    """What names one results file for files derived from it (merges, metrics)."""
    return {"run_id": str(f.attrs.get("run_id", "")), "created": str(f.attrs.get("created", ""))}
