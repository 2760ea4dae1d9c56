"""Guided Grad-CAM (Selvaraju et al.): guided backprop times the upsampled Grad-CAM."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, TargetFn, register
from .catalog import GuidedGradCAMOptions
from .gradcam import GradCAM
from .guided_backprop import GuidedHooksMixin, GuidedReLUs


@register
class GuidedGradCAM(GuidedHooksMixin, GradCAM):
    """Per target layer: guided dY/dx * F.interpolate(Grad-CAM, input size), as Captum's
    ``GuidedGradCam`` (``interpolate_mode`` "nearest" by default).

    Stored per layer at the input's resolution, reduced like saliency:
    ``"guided_gradcam/<layer>"`` (N, H, W) = max over channels of |attribution|; with
    ``save_attribution=True`` also ``"guided_gradcam_attribution/<layer>"`` (N, C, H, W).

    Two passes per batch, each one forward and one ``autograd.grad``: Grad-CAM needs the
    plain gradients at the layers and guided backprop the guided ones at the input, and the
    ReLUs between a layer and the output see different backward rules in the two; one pass
    could only serve both with ``retain_graph`` (which we do not use) or a doubled batch.
    """

    name = "guided_gradcam"
    options: GuidedGradCAMOptions

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        self.guided = GuidedReLUs(model)
        super().__init__(model, *args, **kwargs)

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        score, out = self.forward(x, choose)
        cams = self.layer_cams(score)
        assert self.recorder is not None
        self.recorder.clear()  # the guided pass records again; nothing of it is needed
        guided = self.guided_gradient(x, out["targets/class"].long())
        for name, (cam, _) in cams.items():
            up = F.interpolate(cam[:, None], size=x.shape[-2:], mode=self.options.interpolate_mode)
            self.add_attribution(out, name, guided * up)
        return out
