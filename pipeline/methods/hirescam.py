"""HiResCAM (Draelos & Carin, 2020): gradient times activation, summed over channels."""

from __future__ import annotations

import torch

from .base import register
from .gradcam import GradientCAM


@register
class HiResCAM(GradientCAM):
    """CAM = ReLU(sum_c dY/dA_c * A_c); element-wise, so no channel weights.

    Unlike Grad-CAM, the gradient is not averaged first, so the map is exactly what the
    layer contributes to the score when the head is a global-average-pool + linear layer.
    """

    name = "hirescam"

    def combine(
        self, activation: torch.Tensor, gradient: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        cam = (gradient * activation).sum(dim=1).clamp_min_(0)
        return cam, None
