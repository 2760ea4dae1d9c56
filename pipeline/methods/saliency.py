"""Vanilla gradient saliency (Simonyan et al.): max over channels of |dY/dx|."""

from __future__ import annotations

import torch

from .base import Batch, Method, TargetFn


class Saliency(Method):
    name = "saliency"
    uses_layers = False
    kind = "input"

    def make_recorder(self) -> None:
        return None  # works on the input, no layer hooks

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        x = x.detach().requires_grad_()
        score, out = self.forward(x, choose)
        (grad,) = torch.autograd.grad(score.sum(), x)
        out["saliency/input"] = grad.float().abs().amax(dim=1)
        return out
