"""Vanilla gradient saliency (Simonyan et al.): max over channels of |dY/dx|."""

from __future__ import annotations

import torch

from .base import Batch, TargetFn, register
from .input_gradient import InputGradient


@register
class Saliency(InputGradient):
    """max over channels of |dY_t/dx| for the normalized input; one backward per batch."""

    name = "saliency"

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        x = x.detach().requires_grad_()
        score, out = self.forward(x, choose)
        (grad,) = self.score_gradients(score, [x])
        self.add_attribution(out, "input", grad)
        return out
