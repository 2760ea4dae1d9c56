"""Score-CAM (Wang et al., 2020): channel weights from the scores of activation-masked inputs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .activation_cam import ActivationCAM

EPS = 1e-8  # pytorch-grad-cam's, for channels that are constant (max == min)


class ScoreCAM(ActivationCAM):
    """As pytorch-grad-cam computes it, batched over images and channels.

    Each channel's map is upsampled to the input (bilinear, ``align_corners=True`` as
    ``nn.UpsamplingBilinear2d``), min-max normalized to [0, 1], and multiplies the input;
    the model's pre-softmax scores of the target class for those masked inputs, softmaxed
    over the channels, are the channel weights; CAM = ReLU(sum_c w_c A_c).

    Every target layer costs N * C extra forward passes; they run ``batch_masks`` masked
    inputs at a time, which bounds memory (the masks are made chunk by chunk, never all).
    """

    name = "scorecam"

    def __init__(self, *args: Any, batch_masks: int = 64, **kwargs: Any) -> None:
        if batch_masks < 1:
            raise ValueError(f"batch_masks must be >= 1, got {batch_masks}")
        self.batch_masks = batch_masks
        super().__init__(*args, **kwargs)

    def combine(
        self, x: torch.Tensor, activation: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = activation.shape[:2]
        maps = activation.flatten(0, 1)  # (N*C, h, w), image-major
        scores = torch.empty(n * c, device=x.device)
        with self.not_recording():
            for start in range(0, n * c, self.batch_masks):
                rows = torch.arange(start, min(start + self.batch_masks, n * c), device=x.device)
                image = rows // c
                mask = F.interpolate(maps[rows, None], size=x.shape[-2:], mode="bilinear",
                                     align_corners=True)
                flat = mask.flatten(1)
                lo = flat.min(dim=1).values[:, None, None, None]
                hi = flat.max(dim=1).values[:, None, None, None]
                mask = (mask - lo) / (hi - lo + EPS)
                with self.autocast(x):
                    logits = self.model(x[image] * mask)
                scores[rows] = logits.float().gather(1, target[image, None]).squeeze(1)
        weights = scores.view(n, c).softmax(dim=1)
        cam = torch.einsum("nc,nchw->nhw", weights, activation).clamp_min_(0)
        return cam, weights
