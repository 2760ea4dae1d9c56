"""XGrad-CAM (Fu et al., 2020): gradients weighted by normalized activations."""

from __future__ import annotations

import torch

from .base import register
from .gradcam import GradientCAM

EPS = 1e-7  # pytorch-grad-cam's, against channels that are zero everywhere


@register
class XGradCAM(GradientCAM):
    """w_c = sum_ij g_ij A_ij / (sum_ij A_ij + eps), as pytorch-grad-cam computes it."""

    name = "xgradcam"

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        sum_a = activation.sum(dim=(2, 3), keepdim=True)
        return (gradient * activation / (sum_a + EPS)).sum(dim=(2, 3))
