"""Integrated Gradients (Sundararajan et al., 2017): gradients along a path from a baseline."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF

from .base import Batch, TargetFn, register
from .catalog import BASELINES, INTEGRATIONS, IntegratedGradientsOptions
from .input_gradient import InputGradient


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """(step sizes, alphas) on [0, 1], exactly as Captum's ``approximation_parameters``."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    if method not in INTEGRATIONS:
        raise ValueError(f"unknown integration {method!r}; valid: {', '.join(INTEGRATIONS)}")
    if steps < 2:
        raise ValueError(f"{method} needs steps >= 2, got {steps}")
    sizes = [1 / steps] * steps
    kind = method.split("_")[1]
    if kind == "trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        alphas = torch.linspace(0, 1, steps)
    elif kind == "left":
        alphas = torch.linspace(0, 1 - 1 / steps, steps)
    elif kind == "middle":
        alphas = torch.linspace(1 / (2 * steps), 1 - 1 / (2 * steps), steps)
    else:
        alphas = torch.linspace(1 / steps, 1, steps)
    return sizes, alphas.tolist()


def baseline_of(x: torch.Tensor, kind: str, blur_sigma: float) -> torch.Tensor:
    """The path's start for each image of a normalized batch.

    Args:
        x: (N, C, H, W) normalized input.
        kind: ``zero``: zeros of the normalized input, i.e. the normalization's mean colour
            (Captum's default baseline); ``mean``: each image's own mean colour, per
            channel; ``blur``: the image under a Gaussian blur (Sturmfels et al., 2020),
            reflected at the borders, its kernel cut to fit small images.
        blur_sigma: The blur's standard deviation in pixels.

    Returns:
        (N, C, H, W) baseline.
    """
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if kind == "blur":
        radius = min(math.ceil(3 * blur_sigma), min(x.shape[-2:]) - 1)
        if radius < 1:
            return x.clone()
        return TF.gaussian_blur(x, [2 * radius + 1] * 2, [blur_sigma] * 2)
    raise ValueError(f"unknown baseline {kind!r}; valid: {', '.join(BASELINES)}")


@register
class IntegratedGradients(InputGradient):
    """(x - x') * sum_k s_k dY_t/dx at x' + a_k (x - x'), with Captum's step sizes s_k and
    points a_k (``gausslegendre`` by default, or its Riemann rules).

    The target is chosen on the input itself. The points of all images run
    ``batch_steps`` at a time (one forward and one ``autograd.grad`` each), which bounds
    memory whatever ``steps`` and the batch size are.
    """

    name = "integrated_gradients"
    options: IntegratedGradientsOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        sizes, alphas = quadrature(self.options.integration, self.options.steps)
        self.step_sizes = torch.tensor(sizes, dtype=torch.float32)
        self.alphas = torch.tensor(alphas, dtype=torch.float32)

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        x = x.detach().float()
        _, out = self.forward(x, choose)
        target = out["targets/class"].long()
        steps = self.options.steps
        start = baseline_of(x, self.options.baseline, self.options.blur_sigma)
        delta = x - start
        alphas = self.alphas.to(x.device)

        def on_path(rows: torch.Tensor) -> torch.Tensor:
            image, step = rows // steps, rows % steps
            # Captum's expression, in float32: baseline + alpha * (input - baseline).
            return start[image] + alphas[step].view(-1, 1, 1, 1) * delta[image]

        total = self.gradient_sum(on_path, len(x), steps, target,
                                  self.step_sizes.to(x.device), self.options.batch_steps, x)
        self.add_attribution(out, "input", total * delta)
        return out
