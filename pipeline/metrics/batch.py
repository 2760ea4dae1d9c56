"""What a metric's compute function sees: the evaluation (once per run) and one batch (the
model inputs, targets, original scores and the stored maps, with what several metrics
share computed once: upsampled and normalized maps, baselines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import Scorer, normalize_maps, upsample


@dataclass
class Evaluation:
    """The run being evaluated, as the metrics need it.

    ``state`` holds what a metric's ``prepare`` made (keyed by metric name); ``settings``
    what it adds to the settings the metrics file records (``sanity_units``,
    ``max_boxes``); ``initial`` per-image arrays known before the loop (``boxes``).
    """

    ev: Any  # the evaluate config (every option of the chosen metrics)
    model: nn.Module
    device: torch.device
    scorer: Scorer  # the metrics' score (evaluate.score)
    confidence: Scorer  # Average Drop's: a probability
    example: torch.Tensor  # one normalized input of the run's size
    paths: list[str]
    rows: np.ndarray  # the rows to evaluate
    seen: np.ndarray  # (N, 4) region of each photo the model saw (y0, x0, y1, x1)
    stored: Any  # the run's stored config
    build_method: Any  # () -> the stored method on the re-loaded model
    notes: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    initial: dict[str, np.ndarray] = field(default_factory=dict)


class MetricBatch:
    """One batch of items (an image, or one class of it for target=topk runs)."""

    def __init__(self, ctx: Evaluation, x: torch.Tensor, target: torch.Tensor,
                 logits: torch.Tensor, rows: np.ndarray, reps: int,
                 maps: dict[str, torch.Tensor]) -> None:
        self.ctx, self.x, self.target, self.logits = ctx, x, target, logits
        self.item_rows = np.repeat(rows, reps)  # the image of each item
        self.n, self.reps = len(rows), reps
        self.maps = maps  # map key -> (items, h, w) as stored
        self.original = ctx.scorer.from_logits(logits, target)  # the metrics' score of x
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def _memo(self, kind: str, key: str, make: Any) -> torch.Tensor:
        if (kind, key) not in self._cache:
            self._cache[kind, key] = make()
        return self._cache[kind, key]

    def saliency(self, key: str) -> torch.Tensor:
        """The stored map upsampled to the input's size (only its order matters)."""
        return self._memo("saliency", key,
                          lambda: upsample(self.maps[key], tuple(self.x.shape[-2:])))

    def normalized(self, key: str) -> torch.Tensor:
        """The map min-max scaled at its own resolution, then upsampled."""
        return self._memo("normalized", key, lambda: upsample(
            normalize_maps(self.maps[key]), tuple(self.x.shape[-2:])))

    def baseline(self, kind: str) -> torch.Tensor:
        from .perturbation import make_baseline

        ev = self.ctx.ev
        return self._memo("baseline", kind, lambda: make_baseline(
            self.x, kind, ev.blur_sigma, ev.blur_size))

    def seeds(self) -> torch.Tensor:
        """Per-item seeds: an item's random draws do not depend on its batch."""
        return (torch.from_numpy(self.item_rows.astype(np.int64)) * self.reps
                + torch.arange(self.reps).repeat(self.n) + int(self.ctx.ev.seed) * 1_000_003)
