"""ROAD: RemOve And Debias (Rong et al., 2022): exactly p % of the pixels, the most (MoRF)
or least (LeRF) relevant first, are filled by noisy linear imputation, and the target's
score is taken. pytorch-grad-cam's ``ROADMostRelevantFirst`` / ``ROADLeastRelevantFirst``
threshold at a percentile instead (``rule="percentile"``), which removes every pixel tied at
the threshold: "90 %" of a Grad-CAM map removes ~92.5 % of its pixels where the map is flat."""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from .common import Scorer
from .declared import ROAD_RULES as RULES

if TYPE_CHECKING:
    from .batch import Evaluation, MetricBatch

# The 8-neighbour weights of the noisy linear imputation (ROAD paper; pytorch-grad-cam):
# (dy, dx, weight).
_OFFSETS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
            (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


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




def removed_count(removed: float, pixels: int) -> int:
    """How many of ``pixels`` ROAD removes for ``removed`` percent: removed/100 * pixels,
    rounded half up (never Python's half-to-even)."""
    return min(pixels, max(0, math.floor(removed * pixels / 100.0 + 0.5)))


def road_masks(maps: torch.Tensor, removed: float,
               rule: str = "count") -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (N, H, W) of ROAD's MoRF and LeRF orders for ``removed`` percent.

    ``count`` (default): exactly :func:`removed_count` pixels are removed per map, MoRF the
    highest values first, LeRF the lowest first; among equal values the earlier one in
    raster order (row-major flat index) goes first, in both orders (a stable sort on the
    value, descending for MoRF, ascending for LeRF). ``percentile``: pytorch-grad-cam's
    rule (its percentile p is ``100 - removed``): MoRF keeps the pixels with
    ``map < percentile(map, p)``, LeRF those with ``1 - map < percentile(1 - map, p)``, on
    the min-max normalized map, so every pixel tied at the threshold is removed.
    """
    flat = maps.flatten(1)
    if rule == "percentile":
        keep = 100.0 - removed
        morf = flat < percentile(flat, keep)[:, None]
        inv = 1 - flat
        lerf = inv < percentile(inv, keep)[:, None]
        return morf.view_as(maps), lerf.view_as(maps)
    if rule != "count":
        raise ValueError(f"unknown ROAD rule {rule!r}; valid: {', '.join(RULES)}")
    count = removed_count(removed, flat.shape[1])
    masks = []
    for descending in (True, False):  # MoRF, LeRF
        order = flat.sort(dim=1, descending=descending, stable=True).indices[:, :count]
        masks.append(torch.ones_like(flat, dtype=torch.bool).scatter_(1, order, False))
    return masks[0].view_as(maps), masks[1].view_as(maps)


def road_scores(
    scorer: Scorer, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
    removed: Sequence[float], noise: float = 0.01, seeds: torch.Tensor | None = None,
    rule: str = "count",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROAD (Rong et al., 2022) scores: (MoRF, LeRF), each (N, len(removed)).

    For each percentage that share of the pixels, ranked most (MoRF) or least (LeRF)
    relevant, is removed (:func:`road_masks`) and filled by noisy linear imputation
    (:func:`linear_impute`, then Gaussian noise of std ``noise`` on the imputed pixels, in
    normalized units as pytorch-grad-cam); the value is the target's score on the imputed
    image. A good map has a low MoRF and a high LeRF curve.

    Args:
        maps: (N, H, W) min-max normalized maps at the input's resolution.
        seeds: (N,) int64 per-image noise seeds, so an image's noise does not depend on the
            batch it is in; None draws from the global generator.
        rule: Which pixels a percentage removes (:func:`road_masks`): ``count`` (exactly
            that share, ties in raster order) or pytorch-grad-cam's ``percentile``.
    """
    n = len(x)
    morf = torch.empty(n, len(removed), device=x.device)
    lerf = torch.empty_like(morf)
    for j, q in enumerate(removed):
        keep_m, keep_l = road_masks(maps, float(q), rule)
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
    return road_noise(like.shape, seeds, salt, like.device).to(like.dtype)


def road_noise(shape: Sequence[int], seeds: torch.Tensor | None, salt: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard-normal noise of ``shape`` (N, ...), image ``i`` from its own seed.

    Drawn on the CPU, float32, and moved to ``device``: CUDA's generator gives other numbers
    for the same seed, so drawing there would make a GPU evaluation of a run differ from a
    CPU one. With ``seeds`` (N,), image ``i``'s noise is that of a CPU generator seeded
    ``seeds[i] * 1009 + salt``, whatever the batch around it; None draws from the global
    CPU generator.
    """
    shape = tuple(shape)
    if seeds is None:
        return torch.randn(shape).to(device)
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {shape[0]} images")
    out = torch.empty(shape)
    gen = torch.Generator()
    for i, seed in enumerate(seeds.tolist()):  # one generator call per image, not per pixel
        gen.manual_seed(int(seed) * 1009 + salt)
        out[i] = torch.randn(shape[1:], generator=gen)
    return out.to(device)


def road(ctx: Evaluation, b: MetricBatch) -> dict[str, torch.Tensor]:
    """The ``road`` metric: MoRF and LeRF curves over the percentages, and their combination."""
    ev, out = ctx.ev, {}
    removed = [float(q) for q in ev.road_percentiles]
    for key in b.maps:
        morf, lerf = road_scores(ctx.scorer, b.x, b.normalized(key), b.target, removed,
                                 float(ev.road_noise), b.seeds(), str(ev.road_rule))
        out[f"{key}/road_morf"], out[f"{key}/road_lerf"] = morf, lerf
        out[f"{key}/road"] = ((lerf - morf) / 2).mean(1)
    return out
