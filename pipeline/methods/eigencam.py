"""Eigen-CAM (Muhammad & Yeasin, 2020): the first principal component of the activations."""

from __future__ import annotations

import numpy as np
import torch

from .activation_cam import ActivationCAM
from .base import register
from .catalog import EigenCAMOptions


@register
class EigenCAM(ActivationCAM):
    """CAM = ReLU(projection of the centered activations on their first right-singular
    vector), as pytorch-grad-cam's ``get_2d_projection`` computes it.

    Per image, the (h*w, C) matrix of activations is centered per channel and decomposed by
    SVD; the map is that matrix times VT[0]. The sign of a singular vector is arbitrary:
    pytorch-grad-cam keeps whatever numpy's LAPACK returns, and torch's SVD picks the other
    sign for about half of all inputs (measured: 150 of 300, with no rule that predicts it).
    So by default (``svd=host``) the SVD runs in numpy, float32, on the host, on the whole
    batch in one stacked call (LAPACK decomposes each matrix on its own: the same vectors,
    signs included, as image by image). ``svd=device`` runs ``torch.linalg.svd`` batched on
    the activations' device and orients each direction so that its dot product with the
    image's mean activation per channel is >= 0 (see :class:`EigenCAMOptions`).
    The weights stored are VT[0] (N, C); note the map projects the *centered* activations,
    so it is sum_c v_c (A_c - mean A_c), not sum_c v_c A_c.
    """

    name = "eigencam"
    options: EigenCAMOptions

    def combine(
        self, x: torch.Tensor, activation: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        activation = torch.nan_to_num(activation, nan=0.0, posinf=torch.inf,
                                      neginf=-torch.inf)  # NaN -> 0, as pytorch-grad-cam does
        n, c, h, w = activation.shape
        flat = activation.reshape(n, c, h * w).mT  # (N, h*w, C)
        mean = flat.mean(dim=1, keepdim=True)
        centered = flat - mean
        if self.options.svd == "host":
            # full_matrices=False: the same VT (sign included; checked), without the
            # (h*w)^2 U that pytorch-grad-cam computes and discards.
            vt = np.linalg.svd(centered.cpu().numpy(), full_matrices=False)[2]
            v = torch.from_numpy(np.ascontiguousarray(vt[:, 0, :])).to(activation.device)
        else:
            v = torch.linalg.svd(centered, full_matrices=False).Vh[:, 0, :]
            flip = (v * mean.squeeze(1)).sum(dim=1, keepdim=True) < 0
            v = torch.where(flip, -v, v)
        cam = (centered @ v[:, :, None]).reshape(n, h, w).clamp_min_(0)
        return cam, v
