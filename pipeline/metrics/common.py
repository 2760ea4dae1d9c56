"""What every metric family shares: maps scaled to [0, 1] at the input's resolution, and
the target class's score for batches of model inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, unknown
from ..methods.base import SCORES, target_score


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each (h, w) map of a batch to [0, 1]; a constant map becomes zeros.

    Non-finite values count as 0 (they are flagged in ``/images/nonfinite`` at extraction).
    """
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1)
    span = (flat.amax(1).view(-1, 1, 1) - lo)
    return torch.where(span > 0, (maps - lo) / span.clamp_min(1e-30), torch.zeros_like(maps))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear with half-pixel centres (align_corners=False), as
    pytorch-grad-cam's and torchcam's resizing; maps already at ``size`` are returned as is."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class Scorer:
    """The target class's score for batches of model inputs, ``chunk`` inputs per forward:
    the function of the logits that extraction explains (``target.score``, one of
    :data:`~pipeline.methods.base.SCORES`: :func:`~pipeline.methods.base.target_score`),
    e.g. the softmax probability (``prob``, as RISE, Grad-CAM++, torchcam) or the logit."""

    def __init__(self, model: nn.Module, kind: str = "prob",
                 autocast_dtype: torch.dtype | None = None, chunk: int = 64) -> None:
        if kind not in SCORES:
            raise ConfigError(unknown("evaluate.score", kind, SCORES))
        self.model = model
        self.kind = kind
        self.autocast_dtype = autocast_dtype
        self.chunk = max(1, int(chunk))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.autocast_dtype is None:
                return self.model(x).float()
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                return self.model(x).float()

    def from_logits(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return target_score(logits, target, self.kind)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = [self.from_logits(self.logits(x[s:s + self.chunk]), target[s:s + self.chunk])
               for s in range(0, len(x), self.chunk)]
        return torch.cat(out) if out else x.new_empty(0)
