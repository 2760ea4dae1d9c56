"""Statistics of stored maps, vectorised over a batch of equal-shape maps (pure numpy).

A map is read as a distribution of mass over the photo: non-finite values and negative
values count as zero (CAMs are ReLU'd and saliency is absolute, so these leave them as they
are), and each cell of an (h, w) map covers a rectangle of the region of the photo the
model saw (``/images/box``, y0, x0, y1, x1 in original pixels): cell (i, j) spans
``y0 + i (y1 - y0) / h`` to ``y0 + (i + 1) (y1 - y0) / h`` (and so in x). With a center
crop that region is not the photo, which is why a box must be compared in these
coordinates: laid over the whole photo, the same map scores another IoU.

- ``entropy``: Shannon entropy of the mass, divided by log(h w): 0 for all mass in one
  cell, 1 for a uniform map (0 for a one-cell map).
- ``peak_y``, ``peak_x``: the centre of the cell of the maximum (first in raster order),
  in original-image pixels, as the pointing game places it.
- ``top10_mass``: the share of the mass in the ceil(10 %) of the cells that hold most.
- ``box_iou`` (with boxes): IoU, in photo pixels, of the cells at or above half the map's
  range after min-max scaling (the bright half of the picture render draws; a constant
  map has none) with the box clipped to the region the model saw (the map cannot cover
  what the model did not see). Cells count whole: no interpolation. Several boxes of an
  image count as their union.
- ``box_mass`` (with boxes): the share of the mass inside the box(es), each cell's mass
  weighted by the fraction of its area inside.

A map without positive mass (all zeros) gets NaN for every statistic, as does an image
without a box (a NaN row) for the box statistics.
"""

from __future__ import annotations

import math

import numpy as np

TOP_SHARE = 0.10  # top10_mass: the share of cells counted as the "top"
IOU_LEVEL = 0.5  # box_iou: cells at or above this level of the min-max scaled map
STATS = ("entropy", "peak_y", "peak_x", "top10_mass")
BOX_STATS = ("box_iou", "box_mass")


def map_stats(maps: np.ndarray, seen: np.ndarray,
              boxes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Statistics of ``n`` maps of one shape.

    Args:
        maps: (n, h, w) maps as stored (any float dtype, not normalized).
        seen: (n, 4) region of the photo each map covers (y0, x0, y1, x1), original pixels.
        boxes: (n, 4) boxes (y0, x0, y1, x1) in original pixels, or (n, B, 4) several per
            image (their union counts), NaN rows for none; None leaves out ``box_iou`` and
            ``box_mass``.

    Returns:
        Name -> (n,) float64 array: :data:`STATS`, and :data:`BOX_STATS` with ``boxes``.
    """
    maps = np.asarray(maps)
    n, h, w = maps.shape
    cells = h * w
    # float32 halves the memory traffic of 224 x 224 maps; sums run in float64.
    flat = maps.reshape(n, cells).astype(np.float32)
    flat[~((flat > 0) & (flat < np.inf))] = 0.0  # NaN, inf and negatives hold no mass
    total = flat.sum(1, dtype=np.float64)
    empty = ~(total > 0)
    p = flat / np.where(empty, 1.0, total).astype(np.float32)[:, None]
    logs = np.log(np.where(p > 0, p, np.float32(1.0)))
    logs *= p
    entropy = (-logs.sum(1, dtype=np.float64) / math.log(cells) if cells > 1
               else np.zeros(n))
    del logs
    top = max(1, math.ceil(TOP_SHARE * cells - 1e-9))
    top_mass = np.partition(p, cells - top, axis=1)[:, cells - top:].sum(1, dtype=np.float64)
    seen = np.asarray(seen, np.float64).reshape(n, 4)
    cell_h = (seen[:, 2] - seen[:, 0]) / h
    cell_w = (seen[:, 3] - seen[:, 1]) / w
    peak = flat.argmax(1)
    out = {"entropy": entropy,
           "peak_y": seen[:, 0] + (peak // w + 0.5) * cell_h,
           "peak_x": seen[:, 1] + (peak % w + 0.5) * cell_w,
           "top10_mass": top_mass}
    if boxes is not None:
        out.update(_box_stats(flat, p, seen, h, w, np.asarray(boxes, np.float64).reshape(n, -1, 4)))
    for values in out.values():
        values[empty] = np.nan
    return out


def _pieces(lo: np.ndarray, step: np.ndarray, count: int, a0: np.ndarray,
            a1: np.ndarray) -> np.ndarray:
    """(n, E, count): the length of each interval [a0[e], a1[e]] inside each cell's span
    [lo + i step, lo + (i + 1) step]."""
    start = lo[:, None] + np.arange(count) * step[:, None]  # (n, count)
    end = start + step[:, None]
    return np.clip(np.minimum(end[:, None, :], a1[:, :, None])
                   - np.maximum(start[:, None, :], a0[:, :, None]), 0.0, None)


def _box_stats(flat: np.ndarray, p: np.ndarray, seen: np.ndarray, h: int, w: int,
               boxes: np.ndarray) -> dict[str, np.ndarray]:
    """``box_iou`` and ``box_mass`` against the union of each image's boxes (n, B, 4).

    The boxes' edges cut the region the model saw into pieces, each wholly inside the
    union or wholly outside; a cell's area inside the union is the sum of its overlaps
    with the inside pieces, which factor into rows and columns: sums over the cells are
    matrix products (pieces x h) (h x w) (w x pieces), exact for overlapping boxes too.
    """
    n = flat.shape[0]
    cell_h = (seen[:, 2] - seen[:, 0]) / h
    cell_w = (seen[:, 3] - seen[:, 1]) / w
    valid = np.isfinite(boxes).all(2)  # (n, B)
    b = np.where(valid[..., None], boxes, 0.0)
    y0, y1 = (np.clip(b[..., i], seen[:, :1], seen[:, 2:3]) for i in (0, 2))  # clipped to
    x0, x1 = (np.clip(b[..., i], seen[:, 1:2], seen[:, 3:4]) for i in (1, 3))  # what it saw
    ys = np.sort(np.concatenate([y0, y1], 1), 1)
    xs = np.sort(np.concatenate([x0, x1], 1), 1)
    cy, cx = (ys[:, :-1] + ys[:, 1:]) / 2, (xs[:, :-1] + xs[:, 1:]) / 2
    in_y = (cy[:, None, :] > y0[..., None]) & (cy[:, None, :] < y1[..., None]) & valid[..., None]
    in_x = (cx[:, None, :] > x0[..., None]) & (cx[:, None, :] < x1[..., None]) & valid[..., None]
    union = (in_y[:, :, :, None] & in_x[:, :, None, :]).any(1)  # (n, pieces y, pieces x)
    oy = _pieces(seen[:, 0], cell_h, h, ys[:, :-1], ys[:, 1:]).astype(np.float32)
    ox = _pieces(seen[:, 1], cell_w, w, xs[:, :-1], xs[:, 1:]).astype(np.float32)

    def covered(values: np.ndarray) -> np.ndarray:  # sum of values x cell area in the union
        pieces = oy @ values.reshape(n, h, w) @ ox.transpose(0, 2, 1)
        return (pieces.astype(np.float64) * union).sum((1, 2))

    cell_area = cell_h * cell_w
    mass = covered(p) / np.where(cell_area > 0, cell_area, 1.0)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    span = hi - lo
    bright = (flat - lo >= IOU_LEVEL * span) & (span > 0)  # min-max scaled >= 0.5
    inter = covered(bright.astype(np.float32))
    area = (np.diff(ys, axis=1)[:, :, None] * np.diff(xs, axis=1)[:, None, :] * union).sum((1, 2))
    total = bright.sum(1) * cell_area + area - inter
    iou = np.divide(inter, total, out=np.zeros(n), where=total > 0)
    has_box = valid.any(1)
    iou[~has_box] = np.nan
    mass[~has_box] = np.nan
    return {"box_iou": iou, "box_mass": mass}
