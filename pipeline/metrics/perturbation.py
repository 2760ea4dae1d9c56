"""Deletion and insertion (Petsiuk et al., RISE, 2018): the target's score while the most
salient pixels are replaced by a baseline (deletion) or restored onto it (insertion);
curves (N, steps + 1) and their areas (N,)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, unknown
from .common import Scorer
from .declared import BASELINES

if TYPE_CHECKING:
    from .batch import Evaluation, MetricBatch


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


def _curves(ctx: Evaluation, b: MetricBatch, mode: str) -> dict[str, torch.Tensor]:
    out = {}
    baseline = b.baseline(ctx.ev[f"{mode}_baseline"])
    for key in b.maps:
        curves = perturbation_curves(ctx.scorer, b.x, b.saliency(key), b.target, baseline,
                                     int(ctx.ev.steps), mode, b.original)
        out[f"{key}/{mode}"], out[f"{key}/{mode}_auc"] = curves, curve_auc(curves)
    return out


def deletion(ctx: Evaluation, b: MetricBatch) -> dict[str, torch.Tensor]:
    """The ``deletion`` metric (pipeline.metrics.declared): curves and AUC per map."""
    return _curves(ctx, b, "deletion")


def insertion(ctx: Evaluation, b: MetricBatch) -> dict[str, torch.Tensor]:
    """The ``insertion`` metric: curves and AUC per map."""
    return _curves(ctx, b, "insertion")
