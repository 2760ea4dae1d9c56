"""Score-CAM (Wang et al., 2020): channel weights from the scores of activation-masked inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activation_cam import ActivationCAM
from .base import register
from .catalog import ScoreCAMOptions
from .gradcam import weighted_cam

EPS = 1e-8  # pytorch-grad-cam's, for channels that are constant (max == min)


def channel_masks(maps: torch.Tensor, size: tuple[int, int],
                  align_corners: bool = False) -> torch.Tensor:
    """Score-CAM's masks: (M, h, w) activation maps -> (M, 1, H, W) in [0, 1].

    Each map is upsampled bilinearly to ``size`` (``align_corners`` as F.interpolate), then
    min-max normalized: (m - min) / (max - min + 1e-8), so a constant map gives zeros.
    """
    mask = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=align_corners)
    flat = mask.flatten(1)
    lo = flat.min(dim=1).values[:, None, None, None]
    hi = flat.max(dim=1).values[:, None, None, None]
    return (mask - lo) / (hi - lo + EPS)


@register
class ScoreCAM(ActivationCAM):
    """Score-CAM's channel weights, batched over images and channels.

    Each channel's map is upsampled to the input (:func:`channel_masks`: bilinear,
    ``align_corners=False`` as the official Score-CAM code; ``method.align_corners=true``
    gives pytorch-grad-cam's ``nn.UpsamplingBilinear2d``), min-max normalized to [0, 1], and
    multiplies the input; the explained scores of the target class (``target.score``: the
    logit by default, as pytorch-grad-cam's ``ClassifierOutputTarget``; ``prob`` as the
    official code and torchcam) for those masked inputs, softmaxed over the channels, are
    the channel weights; CAM = ReLU(sum_c w_c A_c) at the layer's resolution.

    Every target layer costs one extra forward pass per image and channel that is not all
    zero; channels that are (after a ReLU: 30-60% of EfficientNet-Lite0's last layer on the
    bundled photos) all mask the input to zeros, and share one pass of a zero image. The
    passes run ``batch_masks`` masked inputs at a time, which bounds memory (the masks are
    made chunk by chunk, never all).
    """

    name = "scorecam"
    options: ScoreCAMOptions

    def combine(
        self, x: torch.Tensor, activation: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = activation.shape[:2]
        maps = activation.flatten(0, 1)  # (N*C, h, w), image-major
        target_of_row = target.repeat_interleave(c)
        scores = torch.empty(n * c, device=x.device)
        # An all-zero channel (common after a ReLU) masks the input to zeros whatever the
        # image: all of them share the score of one zero image instead of a pass each.
        live = maps.flatten(1).ne(0).any(dim=1)
        rows_live = live.nonzero().squeeze(1)  # one host sync: how many passes to run
        with self.not_recording():
            if len(rows_live) < n * c:
                with self.autocast(x):
                    zero_logits = self.model(torch.zeros_like(x[:1]))
                dead = target_of_row[~live]
                scores[~live] = self.score_of(zero_logits.expand(len(dead), -1), dead)
            for start in range(0, len(rows_live), self.options.batch_masks):
                rows = rows_live[start:start + self.options.batch_masks]
                image = rows // c
                mask = channel_masks(maps[rows], tuple(x.shape[-2:]),
                                     self.options.align_corners)
                with self.autocast(x):
                    logits = self.model(x[image] * mask)
                scores[rows] = self.score_of(logits, target_of_row[rows])
        weights = scores.view(n, c).softmax(dim=1)
        return weighted_cam(weights, activation), weights
