"""Grad-CAM++ (Chattopadhyay et al., 2018): higher-order weighting of positive gradients."""

from __future__ import annotations

import torch

from .base import CAMWeightOptions, register
from .gradcam import GradientCAM

EPS = 1e-6  # pytorch-grad-cam's; it also keeps 0/0 finite where all gradients vanish


@register
class GradCAMPlusPlus(GradientCAM):
    """w_c = sum_ij relu(g_ij) a_ij with a_ij = g^2 / (2 g^2 + sum_ij(A) g^3) (eq. 19).

    As pytorch-grad-cam computes it: the exponential of the score is not taken (the
    gradients are those of the pre-softmax score), and a_ij is zeroed where g is zero.
    """

    name = "gradcampp"
    Options = CAMWeightOptions

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        g2 = gradient.pow(2)
        g3 = g2 * gradient
        sum_a = activation.sum(dim=(2, 3), keepdim=True)
        aij = g2 / (2 * g2 + sum_a * g3 + EPS)
        aij = torch.where(gradient != 0, aij, torch.zeros_like(aij))
        return (gradient.clamp_min(0) * aij).sum(dim=(2, 3))
