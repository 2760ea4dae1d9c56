"""The render stage: pictures from a results file (Grad-CAM overlays, saliency panels,
activation grids).

``python run.py stage=render run_dir=DIR`` reads ``DIR/results.h5`` through
:func:`pipeline.store.open_results` (which refuses damaged files) and the original photos
named in ``/images/path``, and writes PNG files only under ``DIR/pictures``. Only rows whose
status is done are drawn: the others may hold garbage from an interrupted run. Drawing
itself is :mod:`pipeline.pictures` (pure numpy); this module reads rows, calls it and
writes files. No torch is imported.

Memory does not grow with the photos: a picture is drawn at most :data:`MAX_SIDE` pixels
on its longest side, and photos are decoded already reduced to that size
(:func:`pipeline.images.open_image` with ``max_side``), so a 12000 x 12000 photo costs
what a 2048 x 2048 one does. (A ``render.max_side`` option would need a key in
``pipeline/config.py``; until then the cap is this module's constant.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from .errors import ConfigError, StoreError
from .images import open_image
from .pictures import (
    activation_grid,
    activation_strip,
    add_title,
    cam_alone,
    capped_size,
    overlay_cam,
    picture_name,
    pixel_box,
    saliency_picture,
)
from .progress import Progress
from .store import (
    ACTIVATIONS,
    DONE,
    INPUT_MAP,
    LAYER_MAP,
    MapInfo,
    categories,
    map_ndim,
    open_results,
    read_column,
    read_map_rows,
    read_rows,
    row_shape,
    stored_maps,
)

log = logging.getLogger(__name__)

PICTURES = "pictures"
MAX_SIDE = 2048  # longest side of a drawn picture (before its title banner), in pixels


def _option(cfg: Any, name: str, default: Any) -> Any:
    value = getattr(cfg, name, default) if cfg is not None else default
    return default if value is None and default is not None else value


class _Labels:
    """Title text for one row: target class, name, probability (or logit), top-1."""

    def __init__(self, f: h5py.File) -> None:
        self.categories = categories(f)
        self.target = read_column(f, "targets/class")
        self.score = read_column(f, "targets/score")
        self.pred = read_column(f, "predictions/class")
        self.prob = read_column(f, "predictions/prob")

    def name(self, cls: int) -> str:
        if 0 <= cls < len(self.categories):
            return f"{cls} {self.categories[cls]}"
        return str(cls)

    def parts(self, row: int, k: int | None = None) -> list[str]:
        """Title parts; ``k`` picks the k-th explained class of a target=topk run."""
        cls = int(self.target[row] if k is None else self.target[row, k])
        parts = [self.name(cls)]
        hit = np.flatnonzero(self.pred[row] == cls)
        if hit.size:
            parts.append(f"p={float(self.prob[row, hit[0]]):.2f}")
        else:  # e.g. target=label, not in the top k: the logit is what we have
            score = self.score[row] if k is None else self.score[row, k]
            parts.append(f"logit={float(score):.2f}")
        if self.pred.shape[1] and int(self.pred[row, 0]) != cls:
            parts.append(f"(top-1: {self.name(int(self.pred[row, 0]))} "
                         f"{float(self.prob[row, 0]):.2f})")
        return parts


def load_photo(path: str, size: np.ndarray, box: np.ndarray,
               max_side: int = MAX_SIDE) -> tuple[np.ndarray | None, np.ndarray]:
    """The original photo as uint8 RGB, at most ``max_side`` pixels on its longest side,
    and the stored box (original pixels) mapped into its pixels; (None, box) if the photo
    is gone or does not decode."""
    try:
        image, (full_h, full_w) = open_image(path, max_side=max_side)
    except Exception as e:  # missing, moved, unreadable: draw the maps alone
        log.warning("cannot open %s (%s: %s); drawing the maps without the photo",
                    path, type(e).__name__, e)
        return None, box
    rgb = np.asarray(image, dtype=np.uint8)
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        h, w = full_h, full_w
    elif (full_h, full_w) != (h, w):  # the file changed since extraction: same content
        log.warning("%s is %dx%d now, %dx%d when extracted; scaling the box",
                    path, full_h, full_w, h, w)
    if rgb.shape[:2] != (h, w):
        sy, sx = rgb.shape[0] / h, rgb.shape[1] / w
        box = np.asarray(box, np.float64) * [sy, sx, sy, sx]
    return rgb, box


def _box_hw(size: np.ndarray, box: np.ndarray) -> tuple[int, int]:
    """The box's pixel size from the stored sizes alone (no photo at hand)."""
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        return 0, 0
    y0, x0, y1, x1 = pixel_box(box, h, w)
    return y1 - y0, x1 - x0


def _write(path: Path, rgb: np.ndarray) -> None:
    """Encode to PNG in memory, then write under a temporary name and rename: a full disk is
    an OSError with its errno (one line from the CLI), never half a picture."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise StoreError(f"could not encode {path.name} as PNG")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # two renders never share one
    try:
        tmp.write_bytes(png.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Painter:
    """Draws the pictures of one open results file's rows, untitled: what
    :func:`render_run` writes and what the report shows as thumbnails.

    Args:
        f: The results file, opened through :func:`pipeline.store.open_results`.
        path: Its path (for messages).
        image_weight: Weight of the photo in a Grad-CAM overlay, 0..1.
        grid_channels: Channels in an activation grid.
        max_side: Photos are decoded at most this many pixels on their longest side.
    """

    def __init__(self, f: h5py.File, path: Path, image_weight: float = 0.5,
                 grid_channels: int = 64, max_side: int = MAX_SIDE) -> None:
        if not 0.0 <= image_weight <= 1.0:
            raise ConfigError(f"render.image_weight must be in [0, 1], got {image_weight}")
        self.f, self.path = f, path
        self.image_weight, self.grid_channels = image_weight, max(1, grid_channels)
        self.max_side = max_side
        self.maps = stored_maps(f)
        self.views = pictures_of(f, self.maps)
        self.paths = read_column(f, "images/path")
        self.sizes = read_rows(f, "images/size", path)
        self.boxes = read_rows(f, "images/box", path)
        self.labels = _Labels(f)
        self.noted: set[str] = set()
        self.needs_photo = any(m.kind != ACTIVATIONS for m in self.maps)

    def row(self, row: int) -> list[tuple[MapInfo, int | None, np.ndarray, list[str]]]:
        """(map, k, picture, title parts) for each picture of a done ``row``: one per
        stored map, one per explained class of a target=topk map (``k``)."""
        photo, box = (load_photo(self.paths[row], self.sizes[row], self.boxes[row],
                                 self.max_side) if self.needs_photo
                      else (None, self.boxes[row]))
        out = []
        for m, k in self.views:
            picture, caption = _draw(self.f, self.path, m, row, photo, box, self.sizes[row],
                                     self.image_weight, self.grid_channels, self.labels,
                                     self.noted, k)
            if picture is not None:
                out.append((m, k, picture, caption))
        return out


def render_run(run_dir: Path, cfg: Any = None) -> list[Path]:
    """Draw the pictures of a run from its ``results.h5``, into ``run_dir/pictures``.

    One picture per done image and per stored map: a Grad-CAM overlay per layer, a
    saliency picture, an activation grid per layer (or a bar code for pooled layers).
    Progress: a bar on a terminal, a log line now and then otherwise.

    Args:
        run_dir: The run's folder, holding ``results.h5``.
        cfg: The ``render`` config (``image_weight``, ``title``, ``max_images``,
            ``grid_channels``); None for the defaults.

    Returns:
        The paths of the PNG files written, in row order.

    Raises:
        StoreError: The results file is missing, damaged or not ours (one line).
    """
    run_dir = Path(run_dir)
    image_weight = float(_option(cfg, "image_weight", 0.5))
    if not 0.0 <= image_weight <= 1.0:
        raise ConfigError(f"render.image_weight must be in [0, 1], got {image_weight}")
    title = bool(_option(cfg, "title", True))
    max_images = _option(cfg, "max_images", None)
    grid_channels = max(1, int(_option(cfg, "grid_channels", 64)))

    path = run_dir / "results.h5"
    out_dir = run_dir / PICTURES
    written: list[Path] = []
    with open_results(path) as f:
        maps = stored_maps(f)
        status = read_column(f, "images/status")
        rows = np.flatnonzero(status == DONE)
        if max_images is not None:
            rows = rows[: max(0, int(max_images))]
        skipped = int((status != DONE).sum())
        if skipped:
            log.info("render: %d of %d rows are not done (pending or failed); skipped",
                     skipped, len(status))
        if not len(rows) or not maps:
            log.warning("render: nothing to draw in %s (%d done rows, %d maps)",
                        path, len(rows), len(maps))
            return written
        painter = Painter(f, path, image_weight, grid_channels)
        out_dir.mkdir(parents=True, exist_ok=True)
        real_out = out_dir.resolve()
        digits = len(str(max(len(status) - 1, 0)))
        with Progress(len(rows), "render", unit="img") as progress:
            for row in rows:
                for m, k, picture, caption in painter.row(int(row)):
                    if title:
                        picture = add_title(picture, caption)
                    shown = m.layer if k is None else f"{m.layer}-top{k + 1}"
                    target = out_dir / picture_name(painter.paths[row], int(row), digits,
                                                    shown, m.group)
                    if target.resolve().parent != real_out:  # names are sanitized; belt and braces
                        raise RuntimeError(f"refusing to write {target} outside {out_dir}")
                    _write(target, picture)
                    written.append(target)
                progress.update()
    return written


def pictures_of(f: h5py.File, maps: list[MapInfo]) -> list[tuple[MapInfo, int | None]]:
    """(map, k) per picture of a row: maps of a target=topk run carry a class axis,
    (N, k, h, w), and get one picture per explained class (k = 0..k-1; None otherwise)."""
    out: list[tuple[MapInfo, int | None]] = []
    for m in maps:
        if m.kind != ACTIVATIONS and map_ndim(f, m.key) == 4:
            out += [(m, k) for k in range(_classes(f, m.key))]
        else:
            out.append((m, None))
    return out


def _classes(f: h5py.File, key: str) -> int:
    """The class axis length of a target=topk map (fixed or ragged: the same for all)."""
    ds = f[key]
    if ds.ndim == 4:
        return int(ds.shape[1])
    shapes = f[f"ragged/{key}/shape"]
    return int(shapes[:, 0].max()) if shapes.shape[0] else 0


def _draw(
    f: h5py.File, path: Path, m: MapInfo, row: int, photo: np.ndarray | None, box: Any,
    size: np.ndarray, image_weight: float, grid_channels: int, labels: _Labels,
    noted: set[str], k: int | None = None,
) -> tuple[np.ndarray | None, list[str]]:
    """One picture and its title parts for one row of one stored map (None to skip); ``k``
    selects the class of a target=topk map."""
    def one() -> np.ndarray:  # this row's map (of class k), fixed or ragged
        value = np.asarray(read_map_rows(f, m.key, path, row))
        return value if k is None else value[k]

    if m.kind == LAYER_MAP:
        cam = one()
        if photo is not None:
            picture = overlay_cam(photo, cam, box, image_weight, outline=True)
        else:
            h, w = _box_hw(size, box)
            picture = cam_alone(cam, *capped_size(h or cam.shape[0], w or cam.shape[1],
                                                  MAX_SIDE))
        return picture, [*labels.parts(row, k), f"[{m.group} {m.layer}]"]
    if m.kind == INPUT_MAP:
        picture = saliency_picture(one(), photo, box, _box_hw(size, box))
        where = m.group if m.layer == "input" else f"{m.group} {m.layer}"
        return picture, [*labels.parts(row, k), f"[{where}]"]
    # activations: (C, h, w) maps, or (C,) when pooled at extraction
    ndim, shape = map_ndim(f, m.key), row_shape(f, m.key, row)
    channels = shape[0] if shape else 0
    if ndim == 4 and tuple(shape[1:]) == (1, 1):  # e.g. avgpool: a grid of 1x1 tiles says nothing
        picture = activation_strip(np.asarray(read_map_rows(f, m.key, path, row)).reshape(-1))
        shown = f"{channels} channels, 1x1"
    elif ndim == 4:
        n = min(grid_channels, channels)
        if f[m.key].ndim == 4:  # fixed size: read the first n channels only
            grid = read_rows(f, m.key, path, (row, slice(0, n)))
        else:
            grid = np.asarray(read_map_rows(f, m.key, path, row))[:n]
        picture = activation_grid(grid, n)
        shown = f"channels 0-{n - 1} of {channels}"
    elif ndim == 2:
        picture = activation_strip(read_rows(f, m.key, path, row))
        shown = f"{channels} channels, pooled"
    else:
        if m.layer not in noted:
            noted.add(m.layer)
            log.info("render: activations of %s have shape %s; no picture for that layout",
                     m.layer, shape)
        return None, []
    pred = ([f"pred {labels.name(int(labels.pred[row, 0]))}"]
            if labels.pred.shape[1] else [])
    return picture, [f"[{m.layer}]", shown, *pred]
