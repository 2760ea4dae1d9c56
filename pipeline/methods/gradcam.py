"""Grad-CAM (Selvaraju et al.) and the base of every gradient-weighted CAM.

:class:`GradientCAM` holds the mechanics (one forward, one ``autograd.grad`` for all target
layers); Grad-CAM and its variants (``gradcampp.py``, ``xgradcam.py``, ``layercam.py``,
``hirescam.py``, ``guided_gradcam.py``) override how a layer's map is made.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Batch, Method, TargetFn, register


def weighted_cam(weights: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c w_c A_c): (N, C) channel weights and (N, C, h, w) activations -> (N, h, w)."""
    return torch.einsum("nc,nchw->nhw", weights, activation).clamp_min_(0)


def cam_from_gradients(
    activation: torch.Tensor, gradient: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of (N, C, h, w) activations and dY/dA -> (CAM (N, h, w), alpha (N, C)).

    alpha_c = mean over (h, w) of dY/dA_c; CAM = ReLU(sum_c alpha_c A_c), not normalized.
    This is :meth:`GradCAM.combine`: the pipeline's maps are made by this function.
    """
    alpha = gradient.mean(dim=(2, 3))
    return weighted_cam(alpha, activation), alpha


class GradientCAM(Method):
    """Base of the gradient-weighted CAMs: one forward, one ``torch.autograd.grad`` per batch.

    The gradients of the target scores to every target layer come from a single
    ``autograd.grad`` call; subclasses only say how a layer's activations and gradients make
    a map, by overriding :meth:`weights` (channel weights, torchcam style) or :meth:`combine`
    (element-wise methods such as LayerCAM and HiResCAM, which have no channel weights).
    Maps are stored under ``"<name>/<layer>"`` at the layer's resolution, not normalized, and
    channel weights under ``"<name>_weights/<layer>"``.
    """

    def weights(self, activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) activations and dY/dA -> channel weights (N, C)."""
        raise NotImplementedError(f"{type(self).__name__} overrides neither weights nor combine")

    def combine(
        self, activation: torch.Tensor, gradient: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CAM (N, h, w), channel weights (N, C) or None): ReLU(sum_c w_c A_c) by default."""
        alpha = self.weights(activation, gradient)
        return weighted_cam(alpha, activation), alpha

    def layer_gradients(
        self, score: torch.Tensor
    ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(layer, A, dY/dA) per target layer, float32 and reshaped, from one backward pass."""
        assert self.recorder is not None
        names = list(self.layers)
        missing = [n for n in names if n not in self.recorder.outputs]
        if missing:
            raise RuntimeError(f"target layers {missing} were not called in the forward pass")
        acts = [self.recorder.outputs[n] for n in names]
        # Images are independent, so d(sum of scores)/dA gives each image its own gradient.
        grads = self.score_gradients(score, acts, allow_unused=True)
        out = []
        for name, act, grad in zip(names, acts, grads, strict=True):
            if grad is None:
                raise ConfigError(f"the score does not depend on layer {name!r} (a side branch "
                                  f"whose output is not used?); choose another target layer")
            act, grad = act.detach().float(), grad.float()
            if self.reshape is not None:
                act, grad = self.reshape(act), self.reshape(grad)
            if act.ndim != 4:
                raise ConfigError(f"layer {name!r} outputs shape {tuple(act.shape)}, not a "
                                  f"spatial map (N, C, h, w) nor tokens of the model's patch "
                                  f"grid; choose a convolutional or token layer (or force a "
                                  f"layout with model.reshape=vit|nhwc|swin)")
            out.append((name, act, grad))
        return out

    def layer_cams(
        self, score: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Layer -> (CAM, channel weights or None) for every target layer."""
        return {name: self.combine(act, grad) for name, act, grad in self.layer_gradients(score)}

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        score, out = self.forward(x, choose)
        for name, (cam, weights) in self.layer_cams(score).items():
            self.add_map(out, name, cam, weights)
        return out


@register
class GradCAM(GradientCAM):
    """Grad-CAM: alpha_c = spatial mean of dY/dA_c (:func:`cam_from_gradients`)."""

    name = "gradcam"

    def combine(
        self, activation: torch.Tensor, gradient: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return cam_from_gradients(activation, gradient)
