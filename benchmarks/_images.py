"""Generated photos for the benchmarks and the fault campaign (torch-free)."""

from __future__ import annotations

import numpy as np


def blob_photo(seed: int, h: int, w: int, blobs: int = 4,
               radius: tuple[float, float] = (6, 20)) -> np.ndarray:
    """A smooth random RGB picture (``blobs`` coloured blobs of a radius in ``radius``),
    different for every seed: it compresses like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3))
    for _ in range(blobs):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(*radius)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(
            0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)
