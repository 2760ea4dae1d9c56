"""SmoothGrad (Smilkov et al., 2017): the mean gradient over noisy copies of the input."""

from __future__ import annotations

from typing import Any

import torch

from .base import Batch, TargetFn, register
from .catalog import SmoothGradOptions
from .input_gradient import InputGradient


@register
class SmoothGrad(InputGradient):
    """mean over ``samples`` of dY_t/dx at x + noise, noise ~ N(0, (sigma * (max x - min x))^2).

    ``sigma`` is the noise level of the paper, a fraction of the input's range (per image,
    over all channels and pixels of the normalized input); the absolute standard deviation
    it gives is what Captum's ``NoiseTunnel(Saliency)`` takes as ``stdevs``. The signed
    gradients are averaged, then reduced by max |.| over channels (Captum's
    ``Saliency(abs=False)`` under ``NoiseTunnel(nt_type="smoothgrad")``).

    The noise is reproducible and independent of the batch: one bank of ``samples``
    standard-normal draws of the input's shape, from a CPU generator seeded with ``seed``
    (``torch.randn`` order, the draws Captum makes after ``torch.manual_seed(seed)`` for a
    single image), scaled per image. Batched results therefore equal per-image results, a
    resumed run equals an uninterrupted one, and CPU and GPU runs use the same noise.
    Images and samples run ``batch_samples`` noisy inputs per forward pass.
    """

    name = "smoothgrad"
    options: SmoothGradOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bank: torch.Tensor | None = None  # a constant, not data: kept across batches

    def noise_bank(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """(samples, C, H, W) standard-normal draws, the same for every batch of that size."""
        want = (self.options.samples, *shape)
        if self._bank is None or self._bank.shape != want or self._bank.device != device:
            generator = torch.Generator().manual_seed(self.options.seed)
            self._bank = torch.randn(want, generator=generator).to(device)
        return self._bank

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        x = x.detach().float()
        _, out = self.forward(x, choose)
        target = out["targets/class"].long()
        samples = self.options.samples
        bank = self.noise_bank(x.shape[1:], x.device)
        flat = x.flatten(1)
        stdev = self.options.sigma * (flat.amax(dim=1) - flat.amin(dim=1))

        def noisy(rows: torch.Tensor) -> torch.Tensor:
            image, sample = rows // samples, rows % samples
            return x[image] + bank[sample] * stdev[image].view(-1, 1, 1, 1)

        ones = torch.ones(samples, device=x.device)
        total = self.gradient_sum(noisy, len(x), samples, target, ones,
                                  self.options.batch_samples, x)
        self.add_attribution(out, "input", total / samples)
        return out
