"""LayerCAM (Jiang et al., 2021): each position weighted by its own positive gradient."""

from __future__ import annotations

import torch

from .base import register
from .gradcam import GradientCAM


@register
class LayerCAM(GradientCAM):
    """CAM = ReLU(sum_c relu(dY/dA_c) * A_c); element-wise, so no channel weights."""

    name = "layercam"

    def combine(
        self, activation: torch.Tensor, gradient: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        cam = (gradient.clamp_min(0) * activation).sum(dim=1).clamp_min_(0)
        return cam, None
