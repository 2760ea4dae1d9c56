"""Grad-CAM (Selvaraju et al.): channel weights from spatially averaged gradients."""

from __future__ import annotations

import torch

from .base import Batch, Method, TargetFn


def cam_from_gradients(
    activation: torch.Tensor, gradient: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, h, w) activations and dY/dA -> (CAM (N, h, w), alpha (N, C)).

    alpha_c = mean over (h, w) of dY/dA_c; CAM = ReLU(sum_c alpha_c A_c), not normalized.
    """
    alpha = gradient.mean(dim=(2, 3))
    cam = torch.einsum("nc,nchw->nhw", alpha, activation).clamp_min_(0)
    return cam, alpha


class GradCAM(Method):
    """All target layers from one forward and one ``torch.autograd.grad`` per batch."""

    name = "gradcam"

    def __init__(self, *args, save_weights: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.save_weights = save_weights

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        score, out = self.forward(x, choose)
        assert self.recorder is not None
        names = list(self.layers)
        missing = [n for n in names if n not in self.recorder.outputs]
        if missing:
            raise RuntimeError(f"target layers {missing} were not called in the forward pass")
        acts = [self.recorder.outputs[n] for n in names]
        # Images are independent, so d(sum of scores)/dA gives each image its own gradient.
        grads = torch.autograd.grad(score.sum(), acts)
        for name, act, grad in zip(names, acts, grads, strict=True):
            act, grad = act.detach().float(), grad.float()
            if self.reshape is not None:
                act, grad = self.reshape(act), self.reshape(grad)
            cam, alpha = cam_from_gradients(act, grad)
            out[f"gradcam/{name}"] = cam
            if self.save_weights:
                out[f"gradcam_weights/{name}"] = alpha
        return out
