"""The pointing game (Zhang et al., 2016; 15-pixel tolerance) and the energy-based pointing
game (Wang et al., Score-CAM, 2020) against ground-truth boxes, and where the boxes come
from (a ``file,xmin,ymin,xmax,ymax`` CSV or ImageNet's ``LOC_val_solution.csv``)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DataError

if TYPE_CHECKING:
    from .batch import Evaluation, MetricBatch


def pointing_game(
    maps: torch.Tensor, seen: torch.Tensor, boxes: torch.Tensor, tolerance: float = 15.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointing game hits and energy-based pointing game proportions, batched.

    The map's pixels are placed on the original photo through the region the model saw
    (``/images/box``): input pixel (i, j) of an H x W input has its centre at
    ``y0 + (i + 0.5) (y1 - y0) / H``, ``x0 + (j + 0.5) (x1 - x0) / W`` in photo pixels.

    Pointing game (Zhang et al., 2016): a hit when the map's maximum (first in raster order
    among equal maxima) lies within ``tolerance`` photo pixels of a ground-truth box.
    Energy (Wang et al., Score-CAM, 2020): the share of the map's sum that falls on pixels
    whose centre lies inside a box (boxes of an image are merged).

    Args:
        maps: (N, H, W) min-max normalized maps at the input's resolution.
        seen: (N, 4) region of the photo the model saw, (y0, x0, y1, x1).
        boxes: (N, B, 4) ground-truth boxes (xmin, ymin, xmax, ymax) in photo pixels, NaN
            rows for padding.
        tolerance: Pointing tolerance in photo pixels (15 in Zhang et al.).

    Returns:
        (hit, energy), each (N,) float32; NaN for images without boxes (and energy NaN for
        an all-zero map).
    """
    n, h, w = maps.shape
    seen = seen.to(maps)
    boxes = boxes.to(maps)
    valid = torch.isfinite(boxes).all(-1)  # (N, B)
    ys = seen[:, :1] + (torch.arange(h, device=maps.device) + 0.5) * (
        (seen[:, 2:3] - seen[:, :1]) / h)  # (N, H)
    xs = seen[:, 1:2] + (torch.arange(w, device=maps.device) + 0.5) * (
        (seen[:, 3:4] - seen[:, 1:2]) / w)  # (N, W)
    top = maps.flatten(1).argmax(1)
    py = ys.gather(1, (top // w)[:, None])  # (N, 1)
    px = xs.gather(1, (top % w)[:, None])
    x0, y0, x1, y1 = (torch.nan_to_num(boxes[..., i]) for i in range(4))  # (N, B)
    dx = torch.maximum(x0 - px, px - x1).clamp_min(0)
    dy = torch.maximum(y0 - py, py - y1).clamp_min(0)
    near = (torch.hypot(dx, dy) <= tolerance) & valid
    has_box = valid.any(1)
    hit = torch.where(has_box, near.any(1).float(), torch.full_like(has_box, math.nan,
                                                                     dtype=maps.dtype))
    inside_y = (ys[:, None, :] >= y0[..., None]) & (ys[:, None, :] <= y1[..., None])  # N,B,H
    inside_x = (xs[:, None, :] >= x0[..., None]) & (xs[:, None, :] <= x1[..., None])  # N,B,W
    inside_y &= valid[..., None]
    inside = (inside_y[..., :, None] & inside_x[..., None, :]).any(1)  # (N, H, W)
    total = maps.flatten(1).sum(1)
    energy = (maps * inside).flatten(1).sum(1) / total.clamp_min(1e-30)
    energy = torch.where(has_box & (total > 0), energy, torch.full_like(energy, math.nan))
    return hit, energy


def read_boxes_csv(path: str | os.PathLike) -> dict[str, list[tuple[float, float, float,
                                                                     float]]]:
    """``file,xmin,ymin,xmax,ymax`` lines (header first, one box a line) -> file -> boxes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"evaluate.boxes={str(path)!r} does not exist")
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        need = ("file", "xmin", "ymin", "xmax", "ymax")
        missing = [k for k in need if k not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: the header must name {','.join(need)}; missing "
                            f"{missing} (has {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            try:
                box = tuple(float(row[k]) for k in need[1:])
            except (TypeError, ValueError) as e:
                raise DataError(f"{path}:{line}: not a box: {row}") from e
            out.setdefault(str(row["file"]).strip(), []).append(box)  # type: ignore[arg-type]
    return out


def read_imagenet_boxes(path: str | os.PathLike) -> dict[str, list[tuple[float, float, float,
                                                                          float]]]:
    """ImageNet's ``LOC_val_solution.csv``: ImageId -> boxes from its PredictionString
    (``wnid xmin ymin xmax ymax`` repeated, in original pixel coordinates)."""
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parts = row["PredictionString"].split()
            out[row["ImageId"]] = [tuple(float(v) for v in parts[i + 1:i + 5])  # type: ignore
                                   for i in range(0, len(parts) - 4, 5)]
    return out


def match_boxes(paths: Sequence[str], table: dict[str, list[Any]],
                by_stem: bool = False) -> list[list[Any]]:
    """Boxes of each image: a ``file`` entry matches an image path when it equals it or is
    a trailing part of it (``a.jpg`` or ``sub/a.jpg`` matches ``/data/sub/a.jpg``); with
    ``by_stem`` the key is the file stem (ImageNet's ImageId)."""
    if by_stem:
        return [list(table.get(Path(p.replace("\\", "/")).stem, [])) for p in paths]
    by_name: dict[str, list[tuple[str, list[Any]]]] = {}
    for key, boxes in table.items():
        norm = key.replace("\\", "/")
        by_name.setdefault(norm.rsplit("/", 1)[-1], []).append((norm, boxes))
    out = []
    for p in paths:
        norm = p.replace("\\", "/")
        found: list[Any] = []
        for key, boxes in by_name.get(norm.rsplit("/", 1)[-1], []):
            if norm == key or norm.endswith("/" + key.lstrip("./")):
                found.extend(boxes)
        out.append(found)
    return out


def pad_boxes(boxes: Sequence[Sequence[Any]]) -> torch.Tensor:
    """Lists of (xmin, ymin, xmax, ymax) -> (N, B, 4) float32, NaN-padded."""
    most = max((len(b) for b in boxes), default=0)
    out = torch.full((len(boxes), max(1, most), 4), math.nan)
    for i, b in enumerate(boxes):
        if b:
            out[i, :len(b)] = torch.tensor(b, dtype=torch.float32)
    return out


def find_boxes(boxes_file: str | None, data: Any, paths: list[str]) -> tuple[
        list[list[Any]] | None, str]:
    """Boxes per image and where they came from, or (None, why not).

    Args:
        boxes_file: ``evaluate.boxes`` (a ``file,xmin,ymin,xmax,ymax`` CSV), or None.
        data: The run's stored ``data`` config: for ``imagenet_val``, a
            ``LOC_val_solution.csv`` given as its labels or beside its root is used.
        paths: The run's image paths.
    """
    if boxes_file:
        return match_boxes(paths, read_boxes_csv(boxes_file)), str(boxes_file)
    if data.get("name") != "imagenet_val":
        return None, "no evaluate.boxes file and the data is not imagenet_val"
    candidates = []
    if data.get("labels") and str(data.labels).endswith(".csv"):
        candidates.append(Path(data.labels))
    if data.get("root"):
        root = Path(data.root)
        candidates += [root / "LOC_val_solution.csv", root.parent / "LOC_val_solution.csv"]
    for c in candidates:
        if c.is_file():
            return match_boxes(paths, read_imagenet_boxes(c), by_stem=True), str(c)
    return None, "no LOC_val_solution.csv beside data.root (or evaluate.boxes=FILE)"


def prepare(ctx: Evaluation) -> str | None:
    """Find the boxes (or say why the pointing game is skipped); they go into the metrics
    file as ``boxes`` (N, B, 4), in original-image pixels."""
    boxes, source = find_boxes(ctx.ev.boxes, ctx.stored.data, ctx.paths)
    if boxes is None:
        return f"pointing game skipped: {source}"
    have = sum(1 for r in ctx.rows if boxes[r])
    ctx.notes.append(f"boxes from {source}: {have} of {len(ctx.rows)} images have boxes")
    padded = pad_boxes(boxes)
    ctx.state["pointing"] = padded
    ctx.settings["max_boxes"] = int(padded.shape[1])
    ctx.initial["boxes"] = padded.numpy()
    return None


def pointing(ctx: Evaluation, b: MetricBatch) -> dict[str, torch.Tensor]:
    """The ``pointing`` metric: hit and energy per map."""
    rows = torch.from_numpy(b.item_rows.astype("int64"))
    boxes = ctx.state["pointing"][rows].to(ctx.device)
    seen = torch.from_numpy(ctx.seen[b.item_rows]).to(ctx.device)
    out = {}
    for key in b.maps:
        hit, energy = pointing_game(b.normalized(key), seen, boxes, float(ctx.ev.tolerance))
        out[f"{key}/pointing_hit"], out[f"{key}/pointing_energy"] = hit, energy
    return out
