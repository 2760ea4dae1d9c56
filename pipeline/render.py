"""Pictures from a results file: Grad-CAM overlays, saliency maps and activation grids.

The render stage reads ``results.h5`` (and the original photos named in ``/images/path``)
and nothing else; it writes PNG files only under ``<run_dir>/pictures``. Only rows whose
status is done are drawn: the others may hold garbage from an interrupted run.

The pure functions (:func:`overlay_cam`, :func:`saliency_picture`, :func:`activation_grid`,
:func:`add_title`, :func:`safe_name`) take and return numpy arrays, so they are tested on
their own; :func:`render_run` only reads rows, calls them and writes files.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import h5py
import numpy as np

from .data import open_image
from .errors import ConfigError
from .methods import METHODS
from .store import DONE, open_results

log = logging.getLogger(__name__)

PICTURES = "pictures"
# Group (= method name) -> how its maps are drawn: "cam" overlays, "input" saliency-style
# panels, "activations" grids.
KINDS = {name: cls.kind for name, cls in METHODS.items()}
MIN_TILE = 48  # activation tiles are upscaled (nearest) to at least this many pixels
SEPARATOR = 2  # pixels between activation tiles and between saliency panels
SEPARATOR_RGB = (255, 255, 255)
MAX_PANEL = 1024  # longest side of a saliency panel; huge photos are shown smaller
BANNER_RGB = (24, 24, 24)
OUTLINE_RGB = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")  # "_" counts as unsafe so runs collapse to one
_DOTS = re.compile(r"\.{2,}")
_NAME_CHARS = 60

Box = tuple[int, int, int, int]


# -- numbers to colours ------------------------------------------------------------------

def normalize_cam(cam: np.ndarray) -> np.ndarray:
    """Min-max scale a map to [0, 1] as float32; a constant map becomes zeros, never NaN.

    Non-finite values (flagged in ``/images/nonfinite`` at extraction) count as zero so
    that one bad pixel does not blank the whole picture.
    """
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if not cam.size:
        return cam
    lo, hi = float(cam.min()), float(cam.max())
    if not hi > lo:
        return np.zeros_like(cam)
    return (cam - lo) / (hi - lo)


def normalize_saliency(saliency: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Scale a saliency map by its ``percentile`` to [0, 1] as float32.

    Gradients are heavy-tailed: scaling by the maximum leaves a few white pixels on black,
    scaling by the 99th percentile shows the structure.
    """
    s = np.abs(np.nan_to_num(np.asarray(saliency, dtype=np.float32), nan=0.0, posinf=0.0,
                             neginf=0.0))
    if not s.size:
        return s
    top = float(np.percentile(s, percentile))
    if not top > 0:
        top = float(s.max())
    if not top > 0:
        return np.zeros_like(s)
    return np.clip(s / top, 0.0, 1.0)


def colorize(values: np.ndarray, colormap: int) -> np.ndarray:
    """Values in [0, 1] (h, w) -> uint8 RGB (h, w, 3) through an OpenCV colormap."""
    # np.uint8(255 * v) truncates, exactly as pytorch-grad-cam's show_cam_on_image does.
    levels = np.uint8(255 * np.clip(values, 0.0, 1.0))
    return cv2.cvtColor(cv2.applyColorMap(levels, colormap), cv2.COLOR_BGR2RGB)


def pixel_box(box: Sequence[float] | np.ndarray | None, height: int, width: int) -> Box:
    """A stored (y0, x0, y1, x1) float box as whole pixels inside a height x width image.

    A missing, non-finite or empty box means the whole image (what ``resize=square`` saw).
    """
    if box is None or len(box) != 4 or not np.all(np.isfinite(np.asarray(box, np.float64))):
        return 0, 0, height, width
    y0, x0, y1, x1 = (int(round(float(v))) for v in box)
    y0, y1 = min(max(y0, 0), height), min(max(y1, 0), height)
    x0, x1 = min(max(x0, 0), width), min(max(x1, 0), width)
    if y1 <= y0 or x1 <= x0:
        return 0, 0, height, width
    return y0, x0, y1, x1


# -- pictures ------------------------------------------------------------------------------

def blend_cam(image_rgb: np.ndarray, mask: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """JET heatmap of ``mask`` (values in [0, 1], same h, w) blended onto a uint8 RGB image.

    The arithmetic of pytorch-grad-cam's ``show_cam_on_image(img / 255, mask, use_rgb=True,
    image_weight=...)``, step for step in float32, so pictures match the reference.
    """
    if not 0.0 <= image_weight <= 1.0:
        raise ConfigError(f"render.image_weight must be in [0, 1], got {image_weight}")
    heatmap = np.float32(colorize(mask, cv2.COLORMAP_JET)) / 255
    img = np.float32(image_rgb) / 255
    cam = (1 - image_weight) * heatmap + image_weight * img
    peak = float(cam.max()) if cam.size else 0.0
    if peak > 0:  # the reference divides unguarded; a black image with weight 1 has peak 0
        cam = cam / peak
    return np.uint8(255 * cam)


def overlay_cam(
    image_rgb: np.ndarray,
    cam: np.ndarray,
    box: Sequence[float] | np.ndarray | None = None,
    image_weight: float = 0.5,
    outline: bool = False,
) -> np.ndarray:
    """Draw a raw Grad-CAM map onto the photo region the model saw.

    The map is min-max normalized, resized bilinearly to the box and blended with the JET
    colormap as :func:`blend_cam`; pixels outside the box keep the photo as it is.

    Args:
        image_rgb: The original photo, uint8 (H, W, 3) RGB.
        cam: The map at the layer's resolution (h, w), not normalized.
        box: (y0, x0, y1, x1) in photo pixels (``/images/box``); None for the whole photo.
        image_weight: Weight of the photo in the blend, 0..1.
        outline: Draw a thin frame just outside the box (only when it is not the whole photo).

    Returns:
        A new uint8 (H, W, 3) RGB picture.
    """
    height, width = image_rgb.shape[:2]
    y0, x0, y1, x1 = pixel_box(box, height, width)
    mask = cv2.resize(normalize_cam(cam), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    out = np.array(image_rgb, dtype=np.uint8, copy=True)
    out[y0:y1, x0:x1] = blend_cam(out[y0:y1, x0:x1], mask, image_weight)
    if outline and (y0, x0, y1, x1) != (0, 0, height, width):
        thickness = max(1, round(min(height, width) / 250))
        for t in range(1, thickness + 1):  # grow outwards so the blended box stays intact
            cv2.rectangle(out, (x0 - t, y0 - t), (x1 - 1 + t, y1 - 1 + t), OUTLINE_RGB, 1)
    return out


def cam_alone(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """The normalized map as a JET picture of the given size, for a photo that is gone."""
    mask = cv2.resize(normalize_cam(cam), (width, height), interpolation=cv2.INTER_LINEAR)
    return colorize(mask, cv2.COLORMAP_JET)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    shrink = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def panel_size(box_hw: tuple[int, int], input_side: int) -> tuple[int, int]:
    """Size of a saliency panel: the box's aspect ratio, its longest side at least the model
    input (no saliency detail lost) and at most ``MAX_PANEL`` (huge photos stay viewable)."""
    bh, bw = max(1, box_hw[0]), max(1, box_hw[1])
    longest = min(max(bh, bw, input_side), max(MAX_PANEL, input_side))
    scale = longest / max(bh, bw)
    return max(1, round(bh * scale)), max(1, round(bw * scale))


def hstack(panels: Sequence[np.ndarray], gap: int = SEPARATOR) -> np.ndarray:
    """Panels of equal height side by side with a thin separator."""
    height = panels[0].shape[0]
    sep = np.empty((height, gap, 3), np.uint8)
    sep[:] = SEPARATOR_RGB
    parts: list[np.ndarray] = []
    for i, panel in enumerate(panels):
        parts += [sep, panel] if i else [panel]
    return np.concatenate(parts, axis=1)


def saliency_picture(
    saliency: np.ndarray,
    image_rgb: np.ndarray | None,
    box: Sequence[float] | np.ndarray | None = None,
    box_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """The region the model saw, next to its saliency map (99th-percentile scaled, HOT).

    Both panels keep the photo's aspect ratio (the model may have seen it squashed to a
    square), so the map reads as a mask of the photo beside it.

    Args:
        saliency: (H, W) map at the model's input size.
        image_rgb: The original photo, uint8 RGB, or None to draw the map alone.
        box: (y0, x0, y1, x1) region of the photo the model saw; None for all of it.
        box_hw: The box's (height, width) when there is no photo (from ``/images/size``).

    Returns:
        uint8 RGB picture: [photo | map], or [map] without a photo.
    """
    if image_rgb is not None:
        y0, x0, y1, x1 = pixel_box(box, *image_rgb.shape[:2])
        box_hw = (y1 - y0, x1 - x0)
    elif box_hw is None or min(box_hw) < 1:
        box_hw = saliency.shape[:2]
    height, width = panel_size(box_hw, max(saliency.shape[:2]))
    heat = colorize(_resize(normalize_saliency(saliency), height, width), cv2.COLORMAP_HOT)
    if image_rgb is None:
        return heat
    view = _resize(np.ascontiguousarray(image_rgb[y0:y1, x0:x1]), height, width)
    return hstack([view, heat])


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of a near-square grid for ``n`` tiles: 64 -> 8 x 8, 10 -> 3 x 4."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / cols)), cols


def activation_grid(
    activation: np.ndarray, max_channels: int = 64, min_tile: int = MIN_TILE,
    gap: int = SEPARATOR,
) -> np.ndarray:
    """The first ``max_channels`` channels of one image's (C, h, w) activation as a grid.

    Each channel is min-max scaled on its own (a dead channel is dark), upscaled by nearest
    neighbour to tiles of at least ``min_tile`` pixels, coloured with VIRIDIS and framed by
    ``gap``-pixel separators.

    Returns:
        uint8 RGB picture of rows x columns tiles (see :func:`grid_shape`).
    """
    act = np.asarray(activation[: max(1, max_channels)], dtype=np.float32)
    act = np.nan_to_num(act, nan=0.0, posinf=0.0, neginf=0.0)
    n, h, w = act.shape
    lo = act.min(axis=(1, 2), keepdims=True)
    span = act.max(axis=(1, 2), keepdims=True) - lo
    scaled = np.divide(act - lo, span, out=np.zeros_like(act), where=span > 0)
    k = max(1, math.ceil(min_tile / max(h, w)))
    tiles = colorize(scaled.reshape(n * h, w), cv2.COLORMAP_VIRIDIS).reshape(n, h, w, 3)
    tiles = tiles.repeat(k, axis=1).repeat(k, axis=2)
    rows, cols = grid_shape(n)
    th, tw = h * k, w * k
    grid = np.empty((rows * th + (rows + 1) * gap, cols * tw + (cols + 1) * gap, 3), np.uint8)
    grid[:] = SEPARATOR_RGB
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = gap + r * (th + gap), gap + c * (tw + gap)
        grid[y:y + th, x:x + tw] = tiles[i]
    return grid


def activation_strip(pooled: np.ndarray, height: int = 64, width: int = 1024) -> np.ndarray:
    """A pooled (C,) activation as a bar code: one VIRIDIS column per channel, scaled over
    the channels of this image."""
    values = normalize_cam(np.asarray(pooled, dtype=np.float32).reshape(1, -1))
    per = max(1, width // max(1, values.shape[1]))
    return colorize(values, cv2.COLORMAP_VIRIDIS).repeat(per, axis=1).repeat(height, axis=0)


# -- titles --------------------------------------------------------------------------------

def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only; decompose accents and drop the rest."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _fit(part: str, scale: float, thickness: int, room: int) -> str:
    while len(part) > 1 and cv2.getTextSize(part, FONT, scale, thickness)[0][0] > room:
        part = part[:-3] + ".." if len(part) > 3 else part[:-1]
    return part


def add_title(picture: np.ndarray, parts: Sequence[str]) -> np.ndarray:
    """Put a dark banner with ``parts`` of a title above the picture.

    The font grows with the picture's width (about 1/30 of it, 11 to 30 px tall); parts
    that do not fit on one line wrap onto the next, and a part wider than the picture is
    cut short, so small pictures stay readable.
    """
    width = picture.shape[1]
    pad = max(3, width // 120)
    text_px = min(30.0, max(11.0, width / 30))
    scale = text_px / cv2.getTextSize("Hg", FONT, 1.0, 1)[0][1]
    thickness = 1 if text_px < 20 else 2
    room = max(1, width - 2 * pad)
    lines: list[str] = []
    for part in (_fit(_ascii(p), scale, thickness, room) for p in parts if p):
        joined = f"{lines[-1]}  {part}" if lines else part
        if lines and cv2.getTextSize(joined, FONT, scale, thickness)[0][0] <= room:
            lines[-1] = joined
        else:
            lines.append(part)
    (_, text_h), base = cv2.getTextSize("Hg", FONT, scale, thickness)
    line_h = text_h + base + pad
    banner = np.empty((len(lines) * line_h + pad, width, 3), np.uint8)
    banner[:] = BANNER_RGB
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (pad, pad + i * line_h + text_h), FONT, scale,
                    (255, 255, 255), thickness, cv2.LINE_AA)
    return np.concatenate([banner, picture], axis=0)


# -- file names ----------------------------------------------------------------------------

def safe_name(text: str, fallback: str) -> str:
    """``text`` reduced to a harmless file-name part: ASCII letters, digits, ``.``, ``-``
    and single ``_``; no ``..``, no leading dot or dash, at most 60 characters."""
    name = _DOTS.sub(".", _UNSAFE.sub("_", _ascii(text)))[:_NAME_CHARS]
    name = name.strip("._-")
    return name or fallback


def image_stem(path: str) -> str:
    """The file stem of a stored image path, whatever its separators ('/' or '\\')."""
    return PurePosixPath(path.replace("\\", "/")).stem


def picture_name(path: str, row: int, digits: int, layer: str, method: str) -> str:
    """``<image stem>-<row>__<layer>__<method>.png``, every part sanitized; the row keeps
    two ``a.jpg`` from different folders apart."""
    stem = safe_name(image_stem(path), "image")
    return f"{stem}-{row:0{digits}d}__{safe_name(layer, 'layer')}__{safe_name(method, 'map')}.png"


# -- the results file ----------------------------------------------------------------------

def _string_list(value: Any) -> list[str]:
    """An attribute holding names: a JSON list string (what the writer stores) or an array."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value] if value else []
        if not isinstance(value, list):
            return []
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            for v in np.asarray(value, dtype=object).ravel()]


def _layer_datasets(f: h5py.File, group: str) -> list[tuple[str, h5py.Dataset]]:
    """(layer name, dataset) of a group, in the order of the run's target layers."""
    if group not in f or not isinstance(f[group], h5py.Group):
        return []
    found = [(str(ds.attrs.get("layer", key)), ds) for key, ds in f[group].items()
             if isinstance(ds, h5py.Dataset)]
    order = {name: i for i, name in enumerate(_string_list(f.attrs.get("target_layers")))}
    return sorted(found, key=lambda item: (order.get(item[0], len(order)), item[0]))


def _option(cfg: Any, name: str, default: Any) -> Any:
    value = getattr(cfg, name, default) if cfg is not None else default
    return default if value is None and default is not None else value


class _Labels:
    """Title text for one row: target class, name, probability (or logit), top-1."""

    def __init__(self, f: h5py.File) -> None:
        self.categories = _string_list(f.attrs.get("categories"))
        n = f["images/status"].shape[0]
        self.target = f["targets/class"][:] if "targets/class" in f else np.full(n, -1)
        self.score = f["targets/score"][:] if "targets/score" in f else np.full(n, np.nan)
        self.pred = f["predictions/class"][:] if "predictions/class" in f else None
        self.prob = f["predictions/prob"][:] if "predictions/prob" in f else None

    def name(self, cls: int) -> str:
        if 0 <= cls < len(self.categories):
            return f"{cls} {self.categories[cls]}"
        return str(cls)

    def parts(self, row: int, k: int | None = None) -> list[str]:
        """Title parts; ``k`` picks the k-th explained class of a target=topk run."""
        cls = int(self.target[row] if k is None else self.target[row, k])
        parts = [self.name(cls)]
        if self.pred is not None and self.prob is not None:
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


def _load_photo(path: str, size: np.ndarray, box: np.ndarray) -> tuple[np.ndarray | None, Any]:
    """The original photo as uint8 RGB and the box in its pixels, or (None, box) if gone."""
    try:
        image, _ = open_image(path)
    except Exception as e:  # missing, moved, unreadable: draw the maps alone
        log.warning("cannot open %s (%s: %s); drawing the maps without the photo",
                    path, type(e).__name__, e)
        return None, box
    rgb = np.asarray(image, dtype=np.uint8)
    h, w = (int(v) for v in size)
    if h > 0 and w > 0 and (h, w) != rgb.shape[:2]:
        # The file changed size since extraction: keep the box on the same content.
        sy, sx = rgb.shape[0] / h, rgb.shape[1] / w
        box = np.asarray(box, np.float64) * [sy, sx, sy, sx]
        log.warning("%s is %dx%d now, %dx%d when extracted; scaling the box",
                    path, rgb.shape[0], rgb.shape[1], h, w)
    return rgb, box


def _box_hw(size: np.ndarray, box: np.ndarray) -> tuple[int, int]:
    """The box's pixel size from the stored sizes alone (no photo at hand)."""
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        return 0, 0
    y0, x0, y1, x1 = pixel_box(box, h, w)
    return y1 - y0, x1 - x0


def _write(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def render_run(run_dir: Path, cfg: Any = None) -> list[Path]:
    """Draw the pictures of a run from its ``results.h5``, into ``run_dir/pictures``.

    One picture per done image and per stored map: a Grad-CAM overlay per layer, a
    saliency picture, an activation grid per layer (or a bar code for pooled layers).

    Args:
        run_dir: The run's folder, holding ``results.h5``.
        cfg: The ``render`` config (``image_weight``, ``title``, ``max_images``,
            ``grid_channels``); None for the defaults.

    Returns:
        The paths of the PNG files written, in row order.
    """
    run_dir = Path(run_dir)
    image_weight = float(_option(cfg, "image_weight", 0.5))
    if not 0.0 <= image_weight <= 1.0:
        raise ConfigError(f"render.image_weight must be in [0, 1], got {image_weight}")
    title = bool(_option(cfg, "title", True))
    max_images = _option(cfg, "max_images", None)
    grid_channels = max(1, int(_option(cfg, "grid_channels", 64)))

    out_dir = run_dir / PICTURES
    written: list[Path] = []
    with open_results(run_dir / "results.h5") as f:
        status = f["images/status"][:]
        rows = np.flatnonzero(status == DONE)
        if max_images is not None:
            rows = rows[: max(0, int(max_images))]
        skipped = int((status != DONE).sum())
        if skipped:
            log.info("render: %d of %d rows are not done (pending or failed); skipped",
                     skipped, len(status))
        maps = [(group, layer, ds) for group in KINDS for layer, ds in _layer_datasets(f, group)]
        if not len(rows) or not maps:
            log.warning("render: nothing to draw in %s (%d done rows, %d maps)",
                        run_dir / "results.h5", len(rows), len(maps))
            return written
        out_dir.mkdir(parents=True, exist_ok=True)
        real_out = out_dir.resolve()
        paths = f["images/path"].asstr()[:]
        sizes, boxes = f["images/size"][:], f["images/box"][:]
        labels = _Labels(f)
        digits = len(str(max(len(status) - 1, 0)))
        noted: set[str] = set()
        needs_photo = any(group != "activations" for group, _, _ in maps)
        for row in rows:
            photo, box = (_load_photo(paths[row], sizes[row], boxes[row]) if needs_photo
                          else (None, boxes[row]))
            for group, layer, ds, k in _pictures(maps):
                picture, caption = _draw(group, layer, ds, int(row), photo, box, sizes[row],
                                         image_weight, grid_channels, labels, noted, k)
                if picture is None:
                    continue
                if title:
                    picture = add_title(picture, caption)
                shown = layer if k is None else f"{layer}-top{k + 1}"
                target = out_dir / picture_name(paths[row], int(row), digits, shown, group)
                if target.resolve().parent != real_out:  # names are sanitized; belt and braces
                    raise RuntimeError(f"refusing to write {target} outside {out_dir}")
                _write(target, picture)
                written.append(target)
    return written


def _pictures(maps: list[tuple[str, str, h5py.Dataset]]) -> list[tuple[Any, ...]]:
    """(group, layer, dataset, k) per picture of a row: maps of a target=topk run carry a
    class axis, (N, k, h, w), and get one picture per explained class."""
    out: list[tuple[Any, ...]] = []
    for group, layer, ds in maps:
        if KINDS[group] != "activations" and ds.ndim == 4:
            out += [(group, layer, ds, k) for k in range(ds.shape[1])]
        else:
            out.append((group, layer, ds, None))
    return out


def _draw(
    group: str, layer: str, ds: h5py.Dataset, row: int, photo: np.ndarray | None, box: Any,
    size: np.ndarray, image_weight: float, grid_channels: int, labels: _Labels, noted: set[str],
    k: int | None = None,
) -> tuple[np.ndarray | None, list[str]]:
    """One picture and its title parts for one row of one stored map (None to skip); ``k``
    selects the class of a target=topk map."""
    kind = KINDS[group]
    index = row if k is None else (row, k)
    if kind == "cam":
        cam = ds[index]
        if photo is not None:
            picture = overlay_cam(photo, cam, box, image_weight, outline=True)
        else:
            h, w = _box_hw(size, box)
            picture = cam_alone(cam, h or cam.shape[0], w or cam.shape[1])
        return picture, [*labels.parts(row, k), f"[{group} {layer}]"]
    if kind == "input":
        picture = saliency_picture(ds[index], photo, box, _box_hw(size, box))
        where = group if layer == "input" else f"{group} {layer}"
        return picture, [*labels.parts(row, k), f"[{where}]"]
    # activations: (C, h, w) maps, or (C,) when pooled at extraction
    channels = ds.shape[1] if ds.ndim > 1 else 0
    if ds.ndim == 4:
        n = min(grid_channels, channels)
        picture = activation_grid(ds[row, :n], n)
        shown = f"channels 0-{n - 1} of {channels}"
    elif ds.ndim == 2:
        picture = activation_strip(ds[row])
        shown = f"{channels} channels, pooled"
    else:
        if layer not in noted:
            noted.add(layer)
            log.info("render: activations of %s have shape %s; no picture for that layout",
                     layer, ds.shape[1:])
        return None, []
    pred = ([f"pred {labels.name(int(labels.pred[row, 0]))}"]
            if labels.pred is not None and labels.pred.shape[1] else [])
    return picture, [f"[{layer}]", shown, *pred]
