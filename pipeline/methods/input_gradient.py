"""Base of the attributions on the input (SmoothGrad, Integrated Gradients, Guided Backprop).

Each stores ``"<name>/input"`` (N, H, W): the maximum over channels of the absolute
attribution, reduced like ``/saliency`` so that the same pictures and comparisons apply.
With ``save_attribution=True`` it also stores the signed per-channel attribution,
``"<name>_attribution/input"`` (N, C, H, W) float32: three times the space, and what
completeness checks (Integrated Gradients sums to the score difference) or signed
pictures need. It is off by default because the reduced map is what is drawn and compared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Method
from .declare import AttributionOptions

# (flat indices of (image, point) pairs, image-major) -> the model inputs at those points
Points = Callable[[torch.Tensor], torch.Tensor]


class InputGradient(Method):
    """Works on the input: no target layers, no layer hooks. Subclasses declare a
    ``save_attribution`` option (:class:`AttributionOptions` has just that one)."""

    uses_layers = False
    kind = "input"
    Options = AttributionOptions

    def make_recorder(self) -> None:
        return None

    def gradient_sum(
        self,
        points: Points,
        n_images: int,
        n_points: int,
        target: torch.Tensor,
        point_weights: torch.Tensor,
        chunk: int,
        like: torch.Tensor,
    ) -> torch.Tensor:
        """sum_p w_p dY_t/dx over ``n_points`` model inputs per image, ``chunk`` per pass;
        Y_t is the explained score (:meth:`Method.score_of`), as in every method.

        Each pass is one forward and one ``autograd.grad`` to its inputs (parameters
        frozen, no parameter gradients, no ``retain_graph``); images are independent, so the
        gradient of the summed scores gives every input its own gradient.

        Args:
            points: Maps flat indices ``image * n_points + point`` to those model inputs.
            n_images: N, the batch size.
            n_points: Inputs per image (noisy samples, path steps).
            target: (N,) class explained per image.
            point_weights: (n_points,) weight of each point's gradient in the sum.
            chunk: At most this many model inputs per forward pass (bounds memory).
            like: A tensor with the result's shape (N, C, H, W) and device.

        Returns:
            (N, C, H, W) float32 weighted gradient sums.
        """
        total = torch.zeros_like(like, dtype=torch.float32)
        flat = n_images * n_points
        for start in range(0, flat, chunk):
            rows = torch.arange(start, min(start + chunk, flat), device=like.device)
            image, point = rows // n_points, rows % n_points
            inputs = points(rows).detach().requires_grad_()
            with self.autocast(inputs):
                logits = self.model(inputs)
            score = self.score_of(logits, target[image])
            (grad,) = self.score_gradients(score, [inputs])
            total.index_add_(0, image, grad.float() * point_weights[point].view(-1, 1, 1, 1))
        return total
