"""Overlays for the explorer, drawn from one stored map and the photo: the arithmetic of
:func:`pipeline.pictures.overlay_cam` (what render draws: with ``cmap="jet"`` and
``alpha=0.5`` the picture is the same, pixel for pixel) with the colormap and the map's
opacity chosen by the viewer. When ``Run.overlay(row, map=, alpha=, cmap=)`` exists it
becomes the one place that draws, and this module a call to it. No torch.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..pictures import cam_alone, colorize, normalize_cam, normalize_saliency, pixel_box
from ..store import INPUT_MAP

# Colormaps offered to the viewer: name -> OpenCV's constant.
CMAPS = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO, "viridis": cv2.COLORMAP_VIRIDIS,
         "inferno": cv2.COLORMAP_INFERNO, "magma": cv2.COLORMAP_MAGMA,
         "hot": cv2.COLORMAP_HOT, "bone": cv2.COLORMAP_BONE}


def overlay(photo: np.ndarray | None, box: np.ndarray, value: np.ndarray, kind: str,
            alpha: float, cmap: str, box_hw: tuple[int, int]) -> np.ndarray:
    """uint8 RGB: the map normalised (min-max for layer maps, 99th percentile for input
    maps), resized bilinearly to the region the model saw (``box``, photo pixels) and
    blended there with weight ``alpha`` (0 = the photo alone, 1 = the map alone); without a
    photo, the coloured map alone at the box's size ``box_hw``."""
    normalize = normalize_saliency if kind == INPUT_MAP else normalize_cam
    if photo is None:
        h, w = box_hw if min(box_hw) > 0 else value.shape[:2]
        if kind != INPUT_MAP and cmap == "jet":
            return cam_alone(value, h, w)
        mask = cv2.resize(normalize(value), (w, h), interpolation=cv2.INTER_LINEAR)
        return colorize(mask, CMAPS[cmap])
    height, width = photo.shape[:2]
    y0, x0, y1, x1 = pixel_box(box, height, width)
    mask = cv2.resize(normalize(value), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    out = np.array(photo, dtype=np.uint8, copy=True)
    out[y0:y1, x0:x1] = _blend(out[y0:y1, x0:x1], mask, 1.0 - alpha, CMAPS[cmap])
    return out


def _blend(image: np.ndarray, mask: np.ndarray, image_weight: float, cmap: int) -> np.ndarray:
    """:func:`pipeline.pictures.blend_cam` with another colormap: the same float32 steps."""
    cam = colorize(mask, cmap).astype(np.float32)
    cam /= 255
    cam *= 1 - image_weight
    img = image.astype(np.float32)
    img /= 255
    img *= image_weight
    cam += img
    peak = float(cam.max()) if cam.size else 0.0
    if peak > 0:
        cam /= peak
    cam *= 255
    return cam.astype(np.uint8)


def shrink(picture: np.ndarray, max_side: int) -> np.ndarray:
    """The picture at most ``max_side`` pixels on its longest side (area interpolation)."""
    h, w = picture.shape[:2]
    if max(h, w) <= max_side:
        return picture
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)


def encode(picture: np.ndarray, fmt: str) -> bytes:
    """PNG or JPEG (quality 88) bytes of a uint8 RGB picture."""
    bgr = cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
    ok, data = (cv2.imencode(".png", bgr) if fmt == "png"
                else cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 88]))
    if not ok:
        raise ValueError(f"could not encode a {picture.shape} picture as {fmt}")
    return data.tobytes()
