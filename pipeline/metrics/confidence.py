"""Average Drop and Increase in Confidence (Chattopadhyay et al., Grad-CAM++, 2018),
computed as torchcam's ``ClassificationMetric``: the explanation map is the normalized input
times the min-max normalized, bilinearly upsampled map."""

from __future__ import annotations

import torch

from .common import Scorer, normalize_maps, upsample


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
