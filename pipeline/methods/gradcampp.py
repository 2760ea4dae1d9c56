"""Grad-CAM++ (Chattopadhyay et al., 2018): higher-order weighting of positive gradients."""

from __future__ import annotations

import torch

from .base import register
from .catalog import GradCAMPlusPlusOptions
from .gradcam import GradientCAM


def gradcampp_weights(activation: torch.Tensor, gradient: torch.Tensor,
                      eps: float = 0.0) -> torch.Tensor:
    """Grad-CAM++ channel weights (N, C) of (N, C, h, w) activations A and gradients g = dS/dA.

    w_c = sum_ij relu(g_ij) a_ij, a_ij = g^2 / (2 g^2 + sum_ab(A_ab) g^3) (eq. 19). The
    paper takes Y = exp(S); for a piecewise-linear network its higher derivatives are
    exp(S) g^2 and exp(S) g^3, the exp(S) cancels in a_ij and only scales w (a positive
    factor per image, gone after normalization), so g is the gradient of the score itself,
    as in pytorch-grad-cam. ``eps = 0``: a_ij = 0 where the denominator is 0 (g = 0, or
    sum(A) g = -2), the quotient as it is elsewhere; ``eps > 0`` adds it to every
    denominator (pytorch-grad-cam: 1e-6) and zeroes a_ij where g = 0.
    """
    g2 = gradient.pow(2)
    g3 = g2 * gradient
    sum_a = activation.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3
    if eps > 0:
        aij = torch.where(gradient != 0, g2 / (denom + eps), torch.zeros_like(g2))
    else:
        # The division where denom is 0 gives nan/inf that torch.where drops.
        aij = torch.where(denom != 0, g2 / denom, torch.zeros_like(g2))
    return (gradient.clamp_min(0) * aij).sum(dim=(2, 3))


@register
class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++ (:func:`gradcampp_weights`); CAM = ReLU(sum_c w_c A_c).

    ``method.eps=1e-6`` reproduces pytorch-grad-cam's ``GradCAMPlusPlus``; the default 0 is
    the paper's eq. 19, which pytorch-grad-cam's eps changes wherever gradients are small.
    """

    name = "gradcampp"
    options: GradCAMPlusPlusOptions

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return gradcampp_weights(activation, gradient, self.options.eps)
