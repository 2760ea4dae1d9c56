"""Average Drop and Increase in Confidence (Chattopadhyay et al., Grad-CAM++, 2018),
computed as torchcam's ``ClassificationMetric``: the explanation map is the normalized input
times the min-max normalized, bilinearly upsampled map."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .common import Scorer, normalize_maps, upsample

if TYPE_CHECKING:
    from .batch import Evaluation, MetricBatch


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


def confidence(ctx: Evaluation, b: MetricBatch) -> dict[str, torch.Tensor]:
    """The ``confidence`` metric: drop, increase and explanation_score per map, and the
    original confidence Y per item (``confidence`` at the file's root)."""
    original = ctx.confidence.from_logits(b.logits, b.target)
    out = {"confidence": original}
    for key, raw in b.maps.items():
        for name, value in explanation_confidence(ctx.confidence, b.x, raw, b.target,
                                                  original).items():
            out[f"{key}/{name}"] = value
    return out
