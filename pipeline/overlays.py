"""One stored map drawn onto its photo, on demand: ``Run.overlay`` and the explorer. The
picture is the one ``stage=render`` writes for that row and map (without the title banner):
the photo read as render reads it (:func:`pipeline.render.load_photo`, at most
``MAX_SIDE`` pixels), drawn by :mod:`pipeline.pictures`. No torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError, DataError, unknown
from .pictures import (
    cam_alone,
    capped_size,
    colormap_code,
    overlay,
    pixel_box,
    saliency_picture,
)
from .store import (
    DONE,
    INPUT_MAP,
    LAYER_MAP,
    STATUS_NAMES,
    MapInfo,
    map_ndim,
    read_column,
    read_map_rows,
    stored_maps,
)

DEFAULT_CMAP = {LAYER_MAP: "jet", INPUT_MAP: "hot"}  # what render uses for each kind


def find_map(f: Any, name: str | None) -> MapInfo:
    """The stored map called ``name`` (its key ``group/name`` or ``method/layer``); the
    run's first map for None. ConfigError naming the maps there are otherwise."""
    maps = stored_maps(f, (LAYER_MAP, INPUT_MAP))
    if not maps:
        raise ConfigError(f"{f.filename} stores no maps to draw (activations only)")
    if name is None:
        return maps[0]
    for m in maps:
        if name in (m.key, f"{m.group}/{m.layer}"):
            return m
    raise ConfigError(unknown("map", name, [m.key for m in maps], keep_order=True))


def run_overlay(run: Any, row: int, map: str | None = None, alpha: float = 0.5,
                cmap: str | None = None, k: int | None = None) -> np.ndarray:
    """The picture of image ``row`` and one map as uint8 RGB (H, W, 3); see
    ``Run.overlay``."""
    from .render import MAX_SIDE, load_photo

    f = run.file
    m = find_map(f, map)
    n = int(f["images/status"].shape[0])
    if not isinstance(row, (int, np.integer)) or not 0 <= int(row) < n:
        raise ConfigError(f"row {row!r} is not an image row of {run.path} (0..{n - 1})")
    row = int(row)
    status = int(read_column(f, "images/status", row))
    if status != DONE:
        raise DataError(f"row {row} of {run.path} is {STATUS_NAMES[status]}: it has no map "
                        "to draw")
    cam = np.asarray(read_map_rows(f, m.key, run.path, row))
    classes = int(cam.shape[0]) if map_ndim(f, m.key) == 4 else 0  # target=topk: (k, h, w)
    if k not in (None, 0) and not (classes and isinstance(k, (int, np.integer))
                                   and 0 <= k < classes):
        raise ConfigError(f"k={k!r}: {m.key} has " + (f"{classes} explained classes (k = 0.."
                                                      f"{classes - 1})" if classes else
                                                      "one map per image (k = None or 0)"))
    colormap = colormap_code(cmap or DEFAULT_CMAP[m.kind])
    if classes:
        cam = cam[k or 0]
    path = read_column(f, "images/path", row)
    size = read_column(f, "images/size", row)
    box = read_column(f, "images/box", row) if "images/box" in f else None
    seen = box if box is not None else np.array([0, 0, *size], np.float64)
    photo, seen = load_photo(path, size, seen)
    h, w = (int(v) for v in size)
    y0, x0, y1, x1 = pixel_box(seen, h, w) if h > 0 and w > 0 else (0, 0, 0, 0)
    if m.kind == INPUT_MAP:
        return saliency_picture(cam, photo, seen, (y1 - y0, x1 - x0), colormap)
    if photo is not None:
        return overlay(photo, cam, seen, alpha, cmap or DEFAULT_CMAP[m.kind], outline=True)
    bh, bw = y1 - y0, x1 - x0
    return cam_alone(cam, *capped_size(bh or cam.shape[0], bw or cam.shape[1], MAX_SIDE),
                     colormap)
