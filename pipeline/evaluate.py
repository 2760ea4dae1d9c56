"""The evaluate stage: how good are the stored maps? Numbers per image, written beside them.

``python run.py stage=evaluate run_dir=DIR`` re-loads the run's images and model (from the
resolved config stored in ``results.h5``) and scores every stored map (``/gradcam/<layer>``,
``/saliency/input``, ... any CAM or input-gradient method) with:

- ``deletion`` / ``insertion`` (Petsiuk et al., RISE, 2018): the target's score while the
  most salient pixels are replaced by a baseline (deletion) or restored onto it (insertion);
  curves (N, steps + 1) and their areas (N,).
- ``confidence``: Average Drop and Increase in Confidence (Chattopadhyay et al., Grad-CAM++,
  2018), computed as torchcam's ``ClassificationMetric``: the explanation map is the
  normalized input times the min-max normalized, bilinearly upsampled map.
- ``road``: RemOve And Debias (Rong et al., 2022) as pytorch-grad-cam's
  ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst``: pixels removed by a percentile
  threshold are filled by noisy linear imputation, and the target's score is taken.
- ``pointing``: the pointing game (Zhang et al., 2016; 15-pixel tolerance) and the
  energy-based pointing game (Wang et al., Score-CAM, 2020) against ground-truth boxes.
- ``sanity``: cascading model-parameter randomization (Adebayo et al., 2018): layers are
  re-initialized from the logits down, the map is recomputed after each step and compared
  with the stored one by Spearman rank correlation.

Everything runs batched on the run's device; the only Python loops are over batches, chunks,
percentiles, randomization steps and (for per-image reproducible noise) images.

Results go to ``/metrics/<group>/<layer>/<metric>`` in the same ``results.h5``. The stored
extraction arrays are never touched: the metrics are first written batch by batch, flushed,
into a side file (``.metrics-partial.h5``, which also makes an interrupted evaluation resume),
and only copied into ``results.h5`` at the end, in one short step.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from . import __version__
from .errors import ConfigError, DataError, StoreError, unknown

log = logging.getLogger(__name__)

METRICS = ("deletion", "insertion", "confidence", "road", "pointing", "sanity")
BASELINES = ("zero", "mean", "blur")
SCORES = ("prob", "logit")
PARTIAL = ".metrics-partial.h5"
GROUP = "metrics"
# The 8-neighbour weights of the noisy linear imputation (ROAD paper; pytorch-grad-cam):
# (dy, dx, weight).
_OFFSETS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
            (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


# -- maps --------------------------------------------------------------------------------------

def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (h, w) map of a batch to [0, 1]; a constant map becomes zeros.

    Non-finite values count as 0 (they are flagged in ``/images/nonfinite`` at extraction).
    """
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1)
    span = (flat.amax(1).view(-1, 1, 1) - lo)
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-30), torch.zeros_like(maps))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear with half-pixel centres (align_corners=False), as
    pytorch-grad-cam's and torchcam's resizing; maps already at ``size`` are returned as is."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


# -- deletion and insertion --------------------------------------------------------------------

def rise_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """The 1-D factor of RISE's blur kernel (``gkern``): a Gaussian filter (scipy's
    ``gaussian_filter``, mode ``reflect``, truncated at 4 sigma) applied to a centred delta of
    ``size`` samples. The 2-D kernel is its outer product; it sums to 1."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    centre = size // 2
    out = np.zeros(size)
    for i in range(size):  # size * taps iterations, once per call: not per pixel
        for t, weight in zip(range(-radius, radius + 1), taps, strict=True):
            j = i + t
            period = 2 * size
            j %= period
            j = j if j < size else period - 1 - j  # half-sample symmetric ("reflect")
            if j == centre:
                out[i] += weight
    return torch.tensor(out, dtype=torch.float32)


def make_baseline(x: torch.Tensor, kind: str, blur_sigma: float = 5.0,
                  blur_size: int = 11) -> torch.Tensor:
    """What removed pixels become, for a normalized batch (N, C, H, W).

    ``zero``: 0 in normalized units, i.e. the normalization's mean colour (RISE's deletion
    substrate, ``torch.zeros_like`` of the normalized tensor); ``mean``: each image's own mean
    colour; ``blur``: RISE's insertion substrate, the image convolved with its ``gkern``
    (``blur_size`` x ``blur_size``, ``blur_sigma``) with zero padding, as in RISE's code.
    """
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    if kind == "blur":
        k = rise_kernel(blur_size, blur_sigma).to(x)
        n, c, h, w = x.shape
        flat = x.reshape(n * c, 1, h, w)
        flat = F.conv2d(flat, k.view(1, 1, 1, -1), padding=(0, blur_size // 2))
        flat = F.conv2d(flat, k.view(1, 1, -1, 1), padding=(blur_size // 2, 0))
        return flat.reshape(n, c, h, w)
    raise ConfigError(unknown("baseline", kind, BASELINES))


def saliency_ranks(saliency: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, H*W) int64: each pixel's position in order of decreasing saliency.

    Ties are broken in raster order (row by row from the top-left pixel), as a stable sort
    gives: a constant map removes pixels row by row from the top. Non-finite values rank last.
    """
    flat = torch.nan_to_num(saliency.flatten(1).float(), nan=-math.inf, posinf=-math.inf)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


class Scorer:
    """The target class's score for batches of model inputs: softmax probability (``prob``,
    as RISE, Grad-CAM++, torchcam) or the logit (``logit``), ``chunk`` inputs per forward."""

    def __init__(self, model: nn.Module, kind: str = "prob",
                 autocast_dtype: torch.dtype | None = None, chunk: int = 64) -> None:
        if kind not in SCORES:
            raise ConfigError(unknown("evaluate.score", kind, SCORES))
        self.model = model
        self.kind = kind
        self.autocast_dtype = autocast_dtype
        self.chunk = max(1, int(chunk))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.autocast_dtype is None:
                return self.model(x).float()
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                return self.model(x).float()

    def from_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        values = logits.softmax(1) if self.kind == "prob" else logits
        return values.gather(1, target.view(-1, 1)).squeeze(1)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = [self.from_logits(self.logits(x[s:s + self.chunk]), target[s:s + self.chunk])
               for s in range(0, len(x), self.chunk)]
        return torch.cat(out) if out else x.new_empty(0)


def perturbation_curves(
    scorer: Scorer,
    x: torch.Tensor,
    saliency: torch.Tensor,
    target: torch.Tensor,
    baseline: torch.Tensor,
    steps: int,
    mode: str,
    original: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deletion or insertion curves (RISE's causal metrics), batched.

    Point k (0..steps) has the ``k * H*W // steps`` most salient pixels (all channels)
    replaced by the baseline (``deletion``) or, starting from the baseline, restored
    (``insertion``); its value is the target's score. Pixel order: :func:`saliency_ranks`.

    Args:
        scorer: Scores inputs, ``scorer.chunk`` per forward pass.
        x: (N, C, H, W) normalized input.
        saliency: (N, H, W) map at the input's resolution (only its order matters).
        target: (N,) class explained per image.
        baseline: (N, C, H, W) substrate (:func:`make_baseline`).
        steps: Number of intervals; curves have ``steps + 1`` points.
        mode: ``deletion`` or ``insertion``.
        original: (N,) scores of ``x`` if known (deletion's first, insertion's last point).

    Returns:
        (N, steps + 1) float32 curves.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be deletion or insertion, got {mode!r}")
    n, c, h, w = x.shape
    pixels = h * w
    ranks = saliency_ranks(saliency)
    counts = torch.arange(steps + 1, device=x.device) * pixels // steps
    curves = torch.full((n, steps + 1), math.nan, device=x.device)
    known = 0 if mode == "deletion" else steps  # the point that is x itself
    if original is not None:
        curves[:, known] = original.float()
    jobs = torch.arange(n * (steps + 1), device=x.device)
    if original is not None:
        jobs = jobs[jobs % (steps + 1) != known]
    for start in range(0, len(jobs), scorer.chunk):
        job = jobs[start:start + scorer.chunk]
        image, point = job // (steps + 1), job % (steps + 1)
        changed = (ranks[image] < counts[point, None]).view(-1, 1, h, w)
        if mode == "deletion":
            inputs = torch.where(changed, baseline[image], x[image])
        else:
            inputs = torch.where(changed, x[image], baseline[image])
        curves[image, point] = scorer(inputs, target[image])
    return curves


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under (N, steps + 1) curves over [0, 1] by the trapezoid rule (RISE's ``auc``)."""
    steps = curves.shape[1] - 1
    return torch.trapezoid(curves, dx=1.0 / steps, dim=1)


# -- Average Drop / Increase in Confidence -----------------------------------------------------

def explanation_confidence(
    scorer: Scorer, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
    original: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Grad-CAM++'s Average Drop / Increase in Confidence terms per image, as torchcam.

    The explanation map is ``x * upsample(normalize(map))`` (normalized input, map min-max
    scaled at its own resolution then bilinearly upsampled). With Y the original and O the
    explanation's score: ``drop = max(0, Y - O) / (Y + 1e-7)``, ``increase = [Y < O]``;
    Average Drop (%) is 100 x the mean drop, Increase in Confidence (%) 100 x the mean
    increase.

    Returns:
        ``drop``, ``increase`` (0/1) and ``explanation_score``, each (N,).
    """
    mask = upsample(normalize_maps(maps), tuple(x.shape[-2:]))
    explained = scorer(x * mask[:, None], target)
    drop = (original - explained).clamp_min(0) / (original + 1e-7)
    return {"drop": drop, "increase": (original < explained).float(),
            "explanation_score": explained}


# -- ROAD --------------------------------------------------------------------------------------

def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Row-wise ``q``-th percentile (0..100) of (N, P) values, linear interpolation as
    ``numpy.percentile``'s default (no size limit, unlike ``torch.quantile``)."""
    s = values.sort(dim=1).values
    pos = (s.shape[1] - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[:, lo] + (s[:, hi] - s[:, lo]) * (pos - lo)


def _impute_one(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """One image's missing pixels, solved exactly: (C, H, W) float64 image, (H, W) bool."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    h, w = keep.shape
    miss = ~keep
    m = int(miss.sum())
    if m == 0:
        return x
    if m == keep.size:  # nothing kept to interpolate from: the normalization's mean colour
        return np.zeros_like(x)
    index = np.full((h + 2, w + 2), -2, dtype=np.int64)  # -2: outside the image
    index[1:-1, 1:-1] = -1  # -1: kept
    index[1:-1, 1:-1][miss] = np.arange(m)
    padded = np.zeros((x.shape[0], h + 2, w + 2))
    padded[:, 1:-1, 1:-1] = x
    ys, xs = np.nonzero(miss)  # row-major, the order of the unknowns
    rows, cols, vals = [np.arange(m)], [np.arange(m)], [np.zeros(m)]
    b = np.zeros((m, x.shape[0]))
    for dy, dx, weight in _OFFSETS:
        near = index[ys + 1 + dy, xs + 1 + dx]
        inside = near != -2
        vals[0][inside] += weight  # diagonal: the weights of the in-image neighbours
        unknown = near >= 0
        rows.append(np.flatnonzero(unknown))
        cols.append(near[unknown])
        vals.append(np.full(int(unknown.sum()), -weight))
        known = near == -1
        b[known] += weight * padded[:, ys[known] + 1 + dy, xs[known] + 1 + dx].T
    a = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(m, m))
    u = spsolve(a, b).reshape(m, -1)
    out = x.copy()
    out[:, ys, xs] = u.T
    return out


def linear_impute(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Fill the pixels where ``keep`` is 0 by the ROAD paper's linear imputation.

    Each missing pixel equals the weighted mean of its in-image 8-neighbours (weights 1/6
    for edge neighbours, 1/12 for diagonal ones): per image one sparse system over its
    missing pixels, all channels at once, solved exactly (SuperLU, float64) as
    pytorch-grad-cam's ``NoisyLinearImputer`` does, its system built vectorized and the
    images solved in parallel threads. An
    image with no pixel kept gets zeros (the normalization's mean colour).

    Args:
        x: (N, C, H, W) normalized images (any device; solved on the host).
        keep: (N, H, W) 1 where the pixel stays, 0 where it is imputed.

    Returns:
        (N, C, H, W) float32 images with the missing pixels imputed (no noise added), on
        ``x``'s device.
    """
    images = x.detach().double().cpu().numpy()
    kept = keep.detach().cpu().numpy() > 0.5
    # SuperLU releases the GIL: the images' systems are solved in parallel threads.
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(images)))) as pool:
        out = np.stack(list(pool.map(_impute_one, images, kept)))
    return torch.from_numpy(out).float().to(x.device)


def road_masks(maps: torch.Tensor, removed: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (N, H, W) of ROAD's MoRF and LeRF orders for ``removed`` percent.

    As pytorch-grad-cam (its percentile p is ``100 - removed``): MoRF keeps the pixels with
    ``map < percentile(map, p)``, LeRF those with ``1 - map < percentile(1 - map, p)``, on
    the min-max normalized map. Pixels tied at the threshold are removed.
    """
    flat = maps.flatten(1)
    keep = 100.0 - removed
    morf = flat < percentile(flat, keep)[:, None]
    inv = 1 - flat
    lerf = inv < percentile(inv, keep)[:, None]
    return morf.view_as(maps), lerf.view_as(maps)


def road_scores(
    scorer: Scorer, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
    removed: Sequence[float], noise: float = 0.01, seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROAD (Rong et al., 2022) scores: (MoRF, LeRF), each (N, len(removed)).

    For each percentage the pixels ranked most (MoRF) or least (LeRF) relevant are removed
    (:func:`road_masks`) and filled by noisy linear imputation (:func:`linear_impute`, then
    Gaussian noise of std ``noise`` on the imputed pixels, in normalized units as
    pytorch-grad-cam); the value is the target's score on the imputed image. A good map has a
    low MoRF and a high LeRF curve.

    Args:
        maps: (N, H, W) min-max normalized maps at the input's resolution.
        seeds: (N,) int64 per-image noise seeds, so an image's noise does not depend on the
            batch it is in; None draws from the global generator.
    """
    n = len(x)
    morf = torch.empty(n, len(removed), device=x.device)
    lerf = torch.empty_like(morf)
    for j, q in enumerate(removed):
        keep_m, keep_l = road_masks(maps, float(q))
        keep = torch.cat([keep_m, keep_l])
        both = torch.cat([x, x])
        imputed = linear_impute(both, keep)
        if noise > 0:
            imputed = imputed + noise * (1 - keep.float())[:, None] * _noise(
                imputed, None if seeds is None else torch.cat([seeds * 4 + 0, seeds * 4 + 1]),
                j)
        scores = scorer(imputed, torch.cat([target, target]))
        morf[:, j], lerf[:, j] = scores[:n], scores[n:]
    return morf, lerf


def _noise(like: torch.Tensor, seeds: torch.Tensor | None, salt: int) -> torch.Tensor:
    if seeds is None:
        return torch.randn_like(like)
    out = torch.empty_like(like)
    gen = torch.Generator(device=like.device)
    for i, seed in enumerate(seeds.tolist()):  # one generator call per image, not per pixel
        gen.manual_seed(int(seed) * 1009 + salt)
        out[i] = torch.randn(like.shape[1:], generator=gen, device=like.device, dtype=like.dtype)
    return out


# -- pointing game -----------------------------------------------------------------------------

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


# -- sanity check ------------------------------------------------------------------------------

def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks (1-based) of (N, P) values, ties given their average rank (as
    ``scipy.stats.rankdata``), batched without Python loops."""
    n, p = values.shape
    s, order = values.sort(dim=1, stable=True)
    pos = torch.arange(p, device=values.device).expand(n, p)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.cummax(torch.where(starts, pos, 0), dim=1).values
    last = torch.where(ends, pos, p).flip(1).cummin(dim=1).values.flip(1)
    avg = (first + last).double() / 2 + 1
    ranks = torch.empty_like(avg)
    ranks.scatter_(1, order, avg)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of two (N, ...) batches; NaN where either is
    constant (no order to compare)."""
    ra = rankdata(torch.nan_to_num(a.flatten(1).float()))
    rb = rankdata(torch.nan_to_num(b.flatten(1).float()))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / den.clamp_min(1e-300)
    return torch.where(den > 0, rho, torch.full_like(rho, math.nan)).float()


def randomization_units(model: nn.Module, example: torch.Tensor,
                        names: Sequence[str] | None = None,
                        depth: int = 2) -> dict[str, nn.Module]:
    """The modules cascading randomization re-initializes, top (logits) first.

    With ``names`` (``evaluate.sanity_layers``; patterns as ``model.target_layers``) they are
    used in the order given. Otherwise: every module with parameters that is a leaf or sits
    at ``depth`` (``layer4.1`` is depth 2), ordered by when a forward pass first calls it,
    reversed, so that the last layer to run (the classifier) is randomized first.
    """
    from .models import resolve_layers

    if names:
        units = resolve_layers(model, list(names))
        empty = [n for n, m in units.items() if next(m.parameters(), None) is None]
        if empty:
            raise ConfigError(f"evaluate.sanity_layers {empty} have no parameters to randomize")
        return units
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        d = name.count(".") + 1
        if not name or d > depth or next(module.parameters(), None) is None:
            continue
        if d == depth or next(module.children(), None) is None:
            found[name] = module
    order: dict[str, int] = {}

    def seen(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object) -> None:  # returns None: input unchanged
            order.setdefault(name, len(order))

        return hook

    handles = [m.register_forward_pre_hook(seen(name)) for name, m in found.items()]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    called = sorted((n for n in found if n in order), key=order.__getitem__, reverse=True)
    return {n: found[n] for n in called}


def _reinitialized(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialized copy's state (CPU): ``reset_parameters`` of every submodule that
    has one (PyTorch's default initializations; batch norms back to identity statistics), and
    parameters no such method covers re-drawn from a normal of their own mean and std."""
    clone = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        covered: set[int] = set()
        for m in clone.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in m.parameters(recurse=False))
        for p in clone.parameters():
            if id(p) not in covered:
                values = p.detach().float()
                std = float(values.std()) if values.numel() > 1 else 0.0
                p.normal_(float(values.mean()), std if std > 0 else 0.02)
    return {k: v.detach().clone() for k, v in clone.state_dict().items()}


class CascadingRandomization:
    """Holds the original and a re-initialized state of each unit, so every batch sees the
    same randomized networks: :meth:`randomize` unit i after units 0..i-1 (cascading), and
    :meth:`restore` puts the original weights back (in place: hooks stay valid)."""

    def __init__(self, units: dict[str, nn.Module], seed: int) -> None:
        self.units = units
        self.original = {n: {k: v.detach().clone() for k, v in m.state_dict().items()}
                         for n, m in units.items()}
        self.random = {}
        for i, (n, m) in enumerate(units.items()):
            device = next(m.parameters()).device
            self.random[n] = {k: v.to(device) for k, v in _reinitialized(m, seed + i).items()}

    @staticmethod
    def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, tensor in module.state_dict(keep_vars=True).items():
                tensor.data.copy_(state[key])

    def randomize(self, name: str) -> None:
        self._load(self.units[name], self.random[name])

    def restore(self) -> None:
        for name, module in self.units.items():
            self._load(module, self.original[name])


# -- settings ----------------------------------------------------------------------------------

def check_settings(ev: Any) -> None:
    """One-line errors for bad ``evaluate.*`` values, before any work."""
    for name in ev.metrics:
        if name not in METRICS:
            raise ConfigError(unknown("evaluate metric", name, METRICS))
    for key in ("deletion_baseline", "insertion_baseline"):
        if ev[key] not in BASELINES:
            raise ConfigError(unknown(f"evaluate.{key}", ev[key], BASELINES))
    if ev.score not in SCORES:
        raise ConfigError(unknown("evaluate.score", ev.score, SCORES))
    if ev.steps < 1:
        raise ConfigError(f"evaluate.steps must be >= 1, got {ev.steps}")
    if ev.batch_points < 1:
        raise ConfigError(f"evaluate.batch_points must be >= 1, got {ev.batch_points}")
    if ev.blur_sigma <= 0 or ev.blur_size < 1 or ev.blur_size % 2 == 0:
        raise ConfigError(f"evaluate.blur_sigma must be > 0 and evaluate.blur_size odd, got "
                          f"{ev.blur_sigma}, {ev.blur_size}")
    bad = [q for q in ev.road_percentiles if not 0 < float(q) < 100]
    if bad or not len(ev.road_percentiles):
        raise ConfigError(f"evaluate.road_percentiles must be percentages in (0, 100), got "
                          f"{list(ev.road_percentiles)}")
    if ev.tolerance < 0 or ev.road_noise < 0:
        raise ConfigError("evaluate.tolerance and evaluate.road_noise must be >= 0")
    if ev.sanity_depth < 1:
        raise ConfigError(f"evaluate.sanity_depth must be >= 1, got {ev.sanity_depth}")


# -- the stage ---------------------------------------------------------------------------------

@dataclass
class MapSummary:
    """Means over the evaluated images of one map's metrics (NaN where not computed)."""

    key: str
    n: int
    figures: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        f = self.figures
        parts = [f"{self.key} ({self.n} images):"]
        labels = (("deletion_auc", "deletion AUC {:.3f}"),
                  ("insertion_auc", "insertion AUC {:.3f}"),
                  ("avg_drop", "avg drop {:.1f}%"), ("increase", "increase {:.1f}%"),
                  ("road", "ROAD {:.3f}"), ("pointing", "pointing {:.1f}%"),
                  ("energy", "energy {:.1f}%"), ("sanity_last", "sanity rho {:.2f}"))
        parts += [fmt.format(f[k]) for k, fmt in labels if k in f and np.isfinite(f[k])]
        return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


@dataclass
class EvaluateSummary:
    path: Path
    evaluated: int
    skipped: int
    maps: list[MapSummary]
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"evaluated {self.evaluated} images -> {self.path}:/{GROUP}"
               + (f" ({self.skipped} were done before this run)" if self.skipped else "")]
        out += [f"  {m.line()}" for m in self.maps]
        out += [f"  note: {n}" for n in self.notes]
        return out


def _attr_list(value: Any) -> list[Any]:
    if isinstance(value, bytes):
        value = value.decode()
    return list(json.loads(value)) if isinstance(value, str) else list(value)


def stored_maps(f: h5py.File) -> list[str]:
    """``group/layer`` of every attribution map in a results file, in the run's layer order."""
    from .methods import METHODS

    order = {name: i for i, name in enumerate(_attr_list(f.attrs.get("target_layers", "[]")))}
    keys = []
    for group, cls in METHODS.items():
        if cls.kind in ("cam", "input") and group in f and isinstance(f[group], h5py.Group):
            names = sorted(f[group], key=lambda n: (order.get(n, len(order)), n))
            keys += [f"{group}/{n}" for n in names if isinstance(f[group][n], h5py.Dataset)]
    return keys


@dataclass
class _Setup:
    """The run as it was: its config, model, normalization, data and what to evaluate."""

    stored: DictConfig
    model: nn.Module
    layers: dict[str, nn.Module]
    normalize: nn.Module
    image_size: int
    resize: str
    decode: str
    paths: list[str]
    labels: np.ndarray
    rows: np.ndarray  # rows to evaluate (done rows, after evaluate.limit)
    maps: list[str]
    targets: np.ndarray  # (N,), or (N, k) for target=topk
    scores: np.ndarray
    sizes: np.ndarray
    seen: np.ndarray
    n: int
    autocast: torch.dtype | None
    boxes: list[list[Any]] | None


def _stored_config(f: h5py.File, path: Path) -> DictConfig:
    text = f.attrs.get("config")
    if not text:
        raise StoreError(f"{path} has no stored config (attribute 'config'); cannot rebuild "
                         "its model")
    return OmegaConf.create(yaml.safe_load(text))


def _model_config(stored: DictConfig) -> DictConfig:
    from .config import ModelConfig

    return OmegaConf.merge(OmegaConf.structured(ModelConfig), stored.model)


def _find_boxes(cfg: DictConfig, stored: DictConfig, paths: list[str]) -> tuple[
        list[list[Any]] | None, str]:
    """Boxes per image and where they came from, or (None, why not)."""
    if cfg.evaluate.boxes:
        return match_boxes(paths, read_boxes_csv(cfg.evaluate.boxes)), str(cfg.evaluate.boxes)
    data = stored.get("data", {})
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


def _setup(cfg: DictConfig, path: Path, device: torch.device, notes: list[str]) -> _Setup:
    from .methods import METHODS
    from .models import build_model, resolve_layers, use_channels_last
    from .runtime import AUTOCAST, Normalize
    from .store import DONE, open_results

    with open_results(path) as f:
        stored = _stored_config(f, path)
        maps = stored_maps(f)
        if not maps:
            raise StoreError(f"{path} holds no attribution maps to evaluate (method="
                             f"{f.attrs.get('method')}); evaluate needs a CAM or saliency run")
        wanted = list(cfg.evaluate.maps) if cfg.evaluate.maps else maps
        for key in wanted:
            if key not in maps:
                raise ConfigError(unknown("evaluate.maps entry", key, maps))
        status = f["images/status"][:]
        rows = np.flatnonzero(status == DONE)
        if cfg.evaluate.limit is not None:
            rows = rows[: max(0, int(cfg.evaluate.limit))]
        attrs = f.attrs
        setup_kw = dict(
            paths=list(f["images/path"].asstr()[:]), labels=f["images/label"][:],
            targets=f["targets/class"][:], scores=f["targets/score"][:],
            sizes=f["images/size"][:], seen=f["images/box"][:], n=len(status),
            image_size=int(attrs["image_size"]), resize=str(attrs.get("resize", "square")),
            mean=_attr_list(attrs["mean"]), std=_attr_list(attrs["std"]))
    if setup_kw["resize"] == "none":
        raise StoreError(f"{path} was extracted at native resolution; evaluate needs a fixed "
                         "input size")
    torch.manual_seed(int(stored.get("seed", 0)))  # random-init models: the same weights
    model, _ = build_model(_model_config(stored))
    model.to(device)
    size = setup_kw["image_size"]
    # Speed only (the numbers agree up to float rounding): NHWC where channels_last says.
    use_channels_last(model, cfg.channels_last, torch.zeros(1, 3, size, size, device=device))
    method_name = stored.method.name
    layers = (resolve_layers(model, list(stored.model.target_layers))
              if METHODS[method_name].uses_layers else {})
    boxes: list[list[Any]] | None = None
    if "pointing" in cfg.evaluate.metrics:
        boxes, source = _find_boxes(cfg, stored, setup_kw["paths"])
        if boxes is None:
            notes.append(f"pointing game skipped: {source}")
        else:
            have = sum(1 for r in rows if boxes[r])
            notes.append(f"boxes from {source}: {have} of {len(rows)} images have boxes")
    mean, std = setup_kw.pop("mean"), setup_kw.pop("std")
    return _Setup(
        stored=stored, model=model, layers=layers,
        normalize=Normalize(tuple(mean), tuple(std)).to(device),
        decode=str(stored.get("data", {}).get("decode", "cpu")), rows=rows, maps=wanted,
        autocast=AUTOCAST.get(stored.get("precision", "fp32")), boxes=boxes, **setup_kw)


def _settings(cfg: DictConfig, setup: _Setup, sanity_layers: list[str]) -> dict[str, Any]:
    ev = OmegaConf.to_container(cfg.evaluate, resolve=True)
    assert isinstance(ev, dict)
    for key in ("overwrite", "limit"):  # not part of what the numbers mean
        ev.pop(key, None)
    ev["maps"] = setup.maps
    ev["sanity_units"] = sanity_layers
    return ev


def _layout(ev: dict[str, Any], maps: list[str], metrics: Iterable[str], n_sanity: int,
            classes: int = 0) -> dict[str, tuple[tuple[int, ...], list[str], str]]:
    """Dataset path (under /metrics) -> (per-image shape, dims, description); ``classes`` > 0
    (a target=topk run) puts a class axis after the image axis, as in the stored maps."""
    out = _layout_per_map(ev, maps, metrics, n_sanity)
    if not classes:
        return out
    return {key: ((classes, *shape), [dims[0], "class", *dims[1:]], text)
            for key, (shape, dims, text) in out.items()}


def _layout_per_map(ev: dict[str, Any], maps: list[str], metrics: Iterable[str],
                    n_sanity: int) -> dict[str, tuple[tuple[int, ...], list[str], str]]:
    steps = int(ev["steps"])
    n_road = len(ev["road_percentiles"])
    score = "softmax probability" if ev["score"] == "prob" else "logit"
    out: dict[str, tuple[tuple[int, ...], list[str], str]] = {
        "score": ((), ["image"], f"target class {score} of the re-loaded image (check of the "
                                 "reproduction: compare /targets/score)"),
    }
    for key in maps:
        if "deletion" in metrics:
            out[f"{key}/deletion"] = ((steps + 1,), ["image", "step"],
                                      f"target {score} with k/steps of the pixels deleted")
            out[f"{key}/deletion_auc"] = ((), ["image"], "area under the deletion curve")
        if "insertion" in metrics:
            out[f"{key}/insertion"] = ((steps + 1,), ["image", "step"],
                                       f"target {score} with k/steps of the pixels inserted")
            out[f"{key}/insertion_auc"] = ((), ["image"], "area under the insertion curve")
        if "confidence" in metrics:
            out[f"{key}/drop"] = ((), ["image"], "max(0, Y - O) / Y (Average Drop = 100 x mean)")
            out[f"{key}/increase"] = ((), ["image"], "1 if O > Y (Increase in Confidence = "
                                                     "100 x mean)")
            out[f"{key}/explanation_score"] = ((), ["image"], f"O: target {score} of "
                                                              "input x normalized map")
        if "road" in metrics:
            out[f"{key}/road_morf"] = ((n_road,), ["image", "removed_percent"],
                                       f"target {score}, most relevant pixels imputed")
            out[f"{key}/road_lerf"] = ((n_road,), ["image", "removed_percent"],
                                       f"target {score}, least relevant pixels imputed")
            out[f"{key}/road"] = ((), ["image"], "mean over percentages of (LeRF - MoRF) / 2 "
                                                 "(pytorch-grad-cam's ROADCombined)")
        if "pointing" in metrics:
            out[f"{key}/pointing_hit"] = ((), ["image"], "1 if the map's maximum is within "
                                                         "tolerance of a box; NaN: no box")
            out[f"{key}/pointing_energy"] = ((), ["image"], "share of the map's energy inside "
                                                            "the boxes; NaN: no box")
        if "sanity" in metrics and n_sanity:
            out[f"{key}/sanity_spearman"] = ((n_sanity,), ["image", "randomized_layer"],
                                             "Spearman rho with the stored map after "
                                             "randomizing layers 0..j (top first)")
    return out


class _Partial:
    """The side file that collects metrics batch by batch (resumable)."""

    def __init__(self, path: Path, n: int, settings: dict[str, Any],
                 layout: dict[str, tuple[tuple[int, ...], list[str], str]]) -> None:
        self.path = path
        text = json.dumps(settings, sort_keys=True)
        if path.exists():
            try:
                with h5py.File(path, "r") as f:
                    same = f.attrs.get("settings") == text and f["status"].shape == (n,)
            except (OSError, KeyError):
                same = False
            if not same:
                log.info("evaluate: discarding %s (other settings)", path)
                path.unlink()
        if not path.exists():
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            with h5py.File(tmp, "w") as f:
                f.attrs["settings"] = text
                f.create_dataset("status", shape=(n,), dtype=np.uint8, fillvalue=0)
                g = f.create_group(GROUP)
                for key, (shape, dims, description) in layout.items():
                    ds = g.create_dataset(key, shape=(n, *shape), dtype=np.float32,
                                          fillvalue=np.nan,
                                          chunks=(min(n, max(1, 4096 // max(1, int(np.prod(
                                              shape, dtype=np.int64))))), *shape))
                    ds.attrs["dims"] = json.dumps(dims)
                    ds.attrs["description"] = description
            os.replace(tmp, path)
        self.file = h5py.File(path, "r+")

    def pending(self, rows: np.ndarray) -> np.ndarray:
        return rows[self.file["status"][:][rows] == 0]

    def write(self, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        g = self.file[GROUP]
        for key, value in arrays.items():
            g[key][rows] = value  # rows ascending (h5py's fancy indexing)
        self.file.flush()  # values reach the file before the status that vouches for them
        self.file["status"][rows] = 1
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _confirm_replace(path: Path, overwrite: bool) -> None:
    """Refuse to replace existing metrics unless told to (or the user says yes)."""
    from .store import open_results

    with open_results(path) as f:
        if GROUP not in f:
            return
        old = f[GROUP].attrs.get("created", "?")
    if overwrite:
        log.warning("evaluate.overwrite=true: replacing /%s (from %s) in %s", GROUP, old, path)
        return
    question = f"{path} already has /{GROUP} (from {old}). Replace them? [y/N] "
    if sys.stdin is not None and sys.stdin.isatty():
        if input(question).strip().lower() in ("y", "yes"):
            return
        raise StoreError(f"kept the existing /{GROUP} in {path}")
    raise StoreError(f"{path} already has /{GROUP} (from {old}); pass evaluate.overwrite=true "
                     "to replace them")


def _install(path: Path, partial: Path, attrs: dict[str, Any]) -> None:
    """Copy the finished metrics into the results file in one short step."""
    from .store import open_results

    with h5py.File(partial, "r") as src, open_results(path, "r+") as dst:
        if GROUP in dst:
            del dst[GROUP]
        src.copy(src[GROUP], dst, name=GROUP)
        g = dst[GROUP]
        for key, value in attrs.items():
            g.attrs[key] = value if not isinstance(value, (list, dict)) else json.dumps(value)
        for key in g:  # map groups say which layer they belong to
            if isinstance(g[key], h5py.Group):
                for layer in g[key]:
                    if isinstance(g[key][layer], h5py.Group):
                        g[key][layer].attrs["layer"] = layer
        dst.flush()
    partial.unlink()


def evaluate(cfg: DictConfig, run_dir: Path) -> EvaluateSummary:
    """Score the maps of the run in ``run_dir`` and store the metrics in its results file.

    Args:
        cfg: The invocation's config: ``evaluate.*``, ``device``, ``batch_size``,
            ``num_workers``. Model, method, data, target and seed come from the config
            stored in the results file.
        run_dir: The run's folder (holding ``results.h5``).

    Returns:
        What was evaluated, with per-map means (also logged by the CLI).
    """
    from .runtime import auto_workers, resolve_device

    ev = cfg.evaluate
    check_settings(ev)
    path = Path(run_dir) / "results.h5"
    _confirm_replace(path, bool(ev.overwrite))
    device = resolve_device(cfg.device)
    notes: list[str] = []
    setup = _setup(cfg, path, device, notes)
    metrics = [m for m in METRICS if m in ev.metrics and (m != "pointing" or setup.boxes)]
    size = setup.image_size
    example = setup.normalize(torch.zeros(1, 3, size, size, device=device))
    units: dict[str, nn.Module] = {}
    if "sanity" in metrics:
        units = randomization_units(setup.model, example, ev.sanity_layers, ev.sanity_depth)
        if ev.sanity_max_steps is not None:
            units = dict(list(units.items())[: max(0, int(ev.sanity_max_steps))])
        if not units:
            notes.append("sanity check skipped: no layer with parameters to randomize")
            metrics.remove("sanity")
    settings = _settings(cfg, setup, list(units))
    classes = setup.targets.shape[1] if setup.targets.ndim == 2 else 0
    layout = _layout(settings, setup.maps, metrics, len(units), classes)
    partial = _Partial(path.parent / PARTIAL, setup.n, settings, layout)
    try:
        todo = partial.pending(setup.rows)
        skipped = len(setup.rows) - len(todo)
        worker = _BatchEvaluator(cfg, setup, metrics, units, device, path)
        workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(
            len(todo), cfg.batch_size)
        worker.run(todo, partial, workers)
        notes += worker.notes
    finally:
        partial.close()
    attrs = {
        "created": datetime.now(timezone.utc).isoformat(), "settings": settings,
        "metrics": metrics, "maps": setup.maps, "camsweep_version": __version__,
        "n_evaluated": int(len(setup.rows)),
        "score_check_max_abs_diff": worker.max_score_diff,
        "sanity_layers": list(units),
        "road_removed_percent": [float(q) for q in ev.road_percentiles],
        "steps": int(ev.steps), "score": str(ev.score),
    }
    _install(path, partial.path, attrs)
    with h5py.File(path, "r") as f:
        summaries = summarize(f)
    return EvaluateSummary(path=path, evaluated=len(setup.rows) - skipped, skipped=skipped,
                           maps=summaries, notes=notes)


class _BatchEvaluator:
    """The batch loop of the evaluate stage."""

    def __init__(self, cfg: DictConfig, setup: _Setup, metrics: list[str],
                 units: dict[str, nn.Module], device: torch.device, path: Path) -> None:
        ev = cfg.evaluate
        self.cfg, self.ev, self.setup, self.metrics = cfg, ev, setup, metrics
        self.device, self.path = device, path
        self.scorer = Scorer(setup.model, ev.score, setup.autocast, ev.batch_points)
        self.removed = [float(q) for q in ev.road_percentiles]
        self.units = units
        self.randomizer = CascadingRandomization(units, int(ev.seed)) if units else None
        self.max_score_diff = 0.0
        self.notes: list[str] = []

    def _method(self) -> Any:
        from .methods import build_method
        from .models import reshape_transform
        from .runtime import AUTOCAST

        stored = self.setup.stored
        return build_method(stored.method, self.setup.model, self.setup.layers,
                            reshape=reshape_transform(stored.model.get("reshape")),
                            topk=int(stored.get("topk", 5)),
                            autocast_dtype=AUTOCAST.get(stored.get("precision", "fp32")))

    def run(self, rows: np.ndarray, partial: _Partial, workers: int) -> None:
        from tqdm import tqdm

        from .data import ImageDataset, Record, collate, decode_on_device
        from .runtime import worker_init

        s = self.setup
        records = [Record(p, int(lab)) for p, lab in zip(s.paths, s.labels, strict=True)]
        dataset = ImageDataset(records, rows, s.image_size, s.resize, s.decode)
        loader = DataLoader(dataset, batch_size=self.cfg.batch_size, num_workers=workers,
                            collate_fn=collate, pin_memory=self.device.type == "cuda",
                            worker_init_fn=worker_init)
        changed: list[str] = []
        bar = tqdm(total=len(rows), desc=f"evaluate {self.path.parent.name}", unit="img",
                   dynamic_ncols=True, disable=None)
        try:
            with h5py.File(self.path, "r") as f:
                for batch in loader:
                    batch_rows = batch["index"].numpy()
                    x = batch["pixels"].to(self.device, non_blocking=True)
                    for pos, reason in decode_on_device(batch, x, s.image_size).items():
                        batch["error"][pos] = reason
                    ok = np.array([not e for e in batch["error"]])
                    for r, e in zip(batch_rows[~ok], np.array(batch["error"])[~ok], strict=True):
                        self.notes.append(f"{s.paths[r]} no longer loads ({e}); not evaluated")
                    moved = ~np.isclose(batch["box"].numpy(), s.seen[batch_rows], atol=1e-3).all(1)
                    changed += [s.paths[r] for r in batch_rows[moved & ok]]
                    if ok.any():
                        keep = torch.from_numpy(ok)
                        arrays = self.batch(f, batch_rows[ok], x[keep.to(self.device)])
                        partial.write(batch_rows[ok], arrays)
                    bar.update(len(batch_rows))
        finally:
            bar.close()
        if changed:
            self.notes.append(f"{len(changed)} images changed size since extraction (e.g. "
                              f"{changed[0]}); their metrics may not match the stored maps")
        if self.max_score_diff > 1e-2:
            self.notes.append(
                f"re-loaded images and model do not reproduce the stored target scores (max "
                f"|diff| {self.max_score_diff:.3g}): weights, images or preprocessing changed "
                "since extraction; the metrics describe today's model, not the stored maps'")

    def batch(self, f: h5py.File, rows: np.ndarray, pixels: torch.Tensor
              ) -> dict[str, np.ndarray]:
        """All metrics of one batch, as host arrays keyed by dataset path under /metrics.

        A target=topk run explains k classes per image: every (image, class) pair is scored
        as an item of its own (the image repeated, as at extraction), and the results get
        the class axis back.
        """
        s, ev, dev = self.setup, self.ev, self.device
        n = len(rows)
        classes = s.targets.shape[1] if s.targets.ndim == 2 else 0
        reps = max(1, classes)
        x = s.normalize(pixels)
        size = tuple(x.shape[-2:])
        logits = self.scorer.logits(x).repeat_interleave(reps, 0)
        x = x.repeat_interleave(reps, 0) if classes else x
        item_rows = np.repeat(rows, reps)
        target = torch.from_numpy(s.targets[rows].reshape(-1).astype(np.int64)).to(dev)
        stored = torch.from_numpy(s.scores[rows].reshape(-1)).to(dev)
        diff = float((logits.gather(1, target[:, None]).squeeze(1) - stored).abs().max())
        self.max_score_diff = max(self.max_score_diff, diff)
        original = self.scorer.from_logits(logits, target)
        out: dict[str, torch.Tensor] = {"score": original}
        stored_maps = {}
        for key in s.maps:
            raw = torch.from_numpy(f[key][rows]).to(dev)
            stored_maps[key] = raw.reshape(-1, *raw.shape[-2:])
        baselines: dict[str, torch.Tensor] = {}
        for key, raw in stored_maps.items():
            saliency = upsample(raw, size)
            normalized = upsample(normalize_maps(raw), size)
            for mode in ("deletion", "insertion"):
                if mode not in self.metrics:
                    continue
                kind = ev[f"{mode}_baseline"]
                if kind not in baselines:
                    baselines[kind] = make_baseline(x, kind, ev.blur_sigma, ev.blur_size)
                curves = perturbation_curves(self.scorer, x, saliency, target, baselines[kind],
                                             int(ev.steps), mode, original)
                out[f"{key}/{mode}"] = curves
                out[f"{key}/{mode}_auc"] = curve_auc(curves)
            if "confidence" in self.metrics:
                for name, value in explanation_confidence(self.scorer, x, raw, target,
                                                          original).items():
                    out[f"{key}/{name}"] = value
            if "road" in self.metrics:
                # Per item seeds: the noise of an image does not depend on its batch.
                seeds = (torch.from_numpy(item_rows.astype(np.int64)) * reps
                         + torch.arange(reps).repeat(n) + int(ev.seed) * 1_000_003)
                morf, lerf = road_scores(self.scorer, x, normalized, target, self.removed,
                                         float(ev.road_noise), seeds)
                out[f"{key}/road_morf"], out[f"{key}/road_lerf"] = morf, lerf
                out[f"{key}/road"] = ((lerf - morf) / 2).mean(1)
            if "pointing" in self.metrics and s.boxes is not None:
                boxes = pad_boxes([s.boxes[r] for r in item_rows]).to(dev)
                seen = torch.from_numpy(s.seen[item_rows]).to(dev)
                hit, energy = pointing_game(normalized, seen, boxes, float(ev.tolerance))
                out[f"{key}/pointing_hit"], out[f"{key}/pointing_energy"] = hit, energy
        if "sanity" in self.metrics and self.randomizer is not None:
            out.update(self._sanity(x, target, stored_maps))
        shape = (n, classes) if classes else (n,)
        return {k: v.detach().float().reshape(*shape, *v.shape[1:]).cpu().numpy()
                for k, v in out.items()}

    def _sanity(self, x: torch.Tensor, target: torch.Tensor,
                stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.randomizer is not None
        rho = {key: torch.empty(len(x), len(self.units), device=x.device) for key in stored}
        method = self._method()
        try:
            with method:
                for j, name in enumerate(self.units):
                    self.randomizer.randomize(name)  # cascading: earlier units stay random
                    maps = method(x, lambda _logits: target)
                    for key, original in stored.items():
                        rho[key][:, j] = spearman(original, maps[key])
        finally:
            self.randomizer.restore()
        return {f"{key}/sanity_spearman": value for key, value in rho.items()}


# -- reading -----------------------------------------------------------------------------------

def summarize(f: h5py.File) -> list[MapSummary]:
    """Per-map means of the stored metrics of an open results file (empty without them)."""
    if GROUP not in f:
        return []
    g = f[GROUP]
    maps = _attr_list(g.attrs.get("maps", "[]"))
    status = f["images/status"][:]
    out = []
    for key in maps:
        if key not in g:
            continue
        m = g[key]
        figures: dict[str, float] = {}

        def mean(name: str, scale: float = 1.0, m: h5py.Group = m) -> float | None:
            if name not in m:
                return None
            values = m[name][:].ravel()  # (N,) or (N, k) for target=topk
            values = values[np.isfinite(values)]
            return float(np.mean(values) * scale) if values.size else math.nan

        for name, label, scale in (("deletion_auc", "deletion_auc", 1), ("insertion_auc",
                                   "insertion_auc", 1), ("drop", "avg_drop", 100),
                                   ("increase", "increase", 100), ("road", "road", 1),
                                   ("pointing_hit", "pointing", 100),
                                   ("pointing_energy", "energy", 100)):
            value = mean(name, scale)
            if value is not None:
                figures[label] = value
        if "sanity_spearman" in m:
            last = m["sanity_spearman"][..., -1].ravel()
            last = last[np.isfinite(last)]
            figures["sanity_last"] = float(last.mean()) if last.size else math.nan
        if "score" in g:  # images evaluated (any class of a target=topk run)
            score = g["score"][:]
            n = int(np.isfinite(score.reshape(len(score), -1)).any(1).sum())
        else:
            n = int((status == 1).sum())
        out.append(MapSummary(key=key, n=n, figures=figures))
    return out
