"""Pictures as numpy arrays: Grad-CAM overlays, saliency panels, activation grids, title
banners, and safe file names. Pure numpy and OpenCV (no torch, no files), so each is tested
on its own; :mod:`pipeline.render` reads the rows and writes the files.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from pathlib import PurePosixPath

import cv2
import numpy as np

from .errors import ConfigError, unknown

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

def blend_cam(image_rgb: np.ndarray, mask: np.ndarray, image_weight: float = 0.5,
              colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """JET (or ``colormap``) heatmap of ``mask`` (values in [0, 1], same h, w) blended onto
    a uint8 RGB image.

    The arithmetic of pytorch-grad-cam's ``show_cam_on_image(img / 255, mask, use_rgb=True,
    image_weight=...)``, step for step in float32, so pictures match the reference. The
    steps run in place (the same float32 operations), so two float copies of the picture
    are alive at a time instead of seven.
    """
    if not 0.0 <= image_weight <= 1.0:
        raise ConfigError(f"render.image_weight must be in [0, 1], got {image_weight}")
    cam = colorize(mask, colormap).astype(np.float32)
    cam /= 255
    cam *= 1 - image_weight
    img = np.asarray(image_rgb).astype(np.float32)
    img /= 255
    img *= image_weight
    cam += img
    del img
    peak = float(cam.max()) if cam.size else 0.0
    if peak > 0:  # the reference divides unguarded; a black image with weight 1 has peak 0
        cam /= peak
    cam *= 255
    return cam.astype(np.uint8)


def overlay_cam(
    image_rgb: np.ndarray,
    cam: np.ndarray,
    box: Sequence[float] | np.ndarray | None = None,
    image_weight: float = 0.5,
    outline: bool = False,
    colormap: int = cv2.COLORMAP_JET,
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
        colormap: The OpenCV colormap (``cv2.COLORMAP_*``; :func:`colormap_code` by name).

    Returns:
        A new uint8 (H, W, 3) RGB picture.
    """
    height, width = image_rgb.shape[:2]
    y0, x0, y1, x1 = pixel_box(box, height, width)
    mask = cv2.resize(normalize_cam(cam), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    out = np.array(image_rgb, dtype=np.uint8, copy=True)
    out[y0:y1, x0:x1] = blend_cam(out[y0:y1, x0:x1], mask, image_weight, colormap)
    if outline and (y0, x0, y1, x1) != (0, 0, height, width):
        thickness = max(1, round(min(height, width) / 250))
        for t in range(1, thickness + 1):  # grow outwards so the blended box stays intact
            cv2.rectangle(out, (x0 - t, y0 - t), (x1 - 1 + t, y1 - 1 + t), OUTLINE_RGB, 1)
    return out


def cam_alone(cam: np.ndarray, height: int, width: int,
              colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """The normalized map as a JET picture of the given size, for a photo that is gone."""
    mask = cv2.resize(normalize_cam(cam), (width, height), interpolation=cv2.INTER_LINEAR)
    return colorize(mask, colormap)


# The OpenCV colormaps by their lower-case names ("jet", "viridis", "inferno", "turbo", ...).
COLORMAPS = {name[len("COLORMAP_"):].lower(): int(getattr(cv2, name))
             for name in dir(cv2) if name.startswith("COLORMAP_")}


def colormap_code(name: str) -> int:
    """The OpenCV colormap called ``name`` (case-insensitive); ConfigError naming the valid
    ones otherwise."""
    code = COLORMAPS.get(str(name).lower())
    if code is None:
        raise ConfigError(unknown("colormap", name, COLORMAPS, show=len(COLORMAPS)))
    return code


def overlay(
    image_rgb: np.ndarray,
    cam: np.ndarray,
    box: Sequence[float] | np.ndarray | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    outline: bool = False,
) -> np.ndarray:
    """The public, stable form of :func:`overlay_cam`: a raw map drawn onto the region
    ``box`` (y0, x0, y1, x1) of a uint8 RGB photo, with ``alpha`` the map's opacity (0..1)
    and ``cmap`` an OpenCV colormap name. ``alpha=0.5, cmap="jet"`` is what render draws.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha (the map's opacity) must be in [0, 1], got {alpha}")
    return overlay_cam(image_rgb, cam, box, 1.0 - alpha, outline, colormap_code(cmap))


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
    colormap: int = cv2.COLORMAP_HOT,
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
    heat = colorize(_resize(normalize_saliency(saliency), height, width), colormap)
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


def capped_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, so the longest side is at most
    ``max_side``; sizes within it are returned as they are (never enlarged)."""
    longest = max(height, width)
    if longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))
