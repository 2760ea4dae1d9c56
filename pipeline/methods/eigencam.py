"""Eigen-CAM (Muhammad & Yeasin, 2020): the first principal component of the activations."""

from __future__ import annotations

import numpy as np
import torch

from .activation_cam import ActivationCAM
from .base import CAMWeightOptions, register


@register
class EigenCAM(ActivationCAM):
    """CAM = ReLU(projection of the centered activations on their first right-singular
    vector), as pytorch-grad-cam's ``get_2d_projection`` computes it.

    Per image, the (h*w, C) matrix of activations is centered per channel and decomposed by
    SVD; the map is that matrix times VT[0]. The sign of a singular vector is arbitrary, and
    pytorch-grad-cam keeps whatever numpy's LAPACK returns (torch's SVD picks the other sign
    for about half of all inputs), so the SVD runs in numpy, float32, on the host: the same
    maps, signs included. The cost is one device-to-host copy of the activations per batch.
    The weights stored are VT[0] (N, C); note the map projects the *centered* activations,
    so it is sum_c v_c (A_c - mean A_c), not sum_c v_c A_c.
    """

    name = "eigencam"
    Options = CAMWeightOptions  # the weights: the first principal direction, (N, C)

    def combine(
        self, x: torch.Tensor, activation: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        acts = activation.cpu().numpy()
        acts = np.where(np.isnan(acts), np.float32(0), acts)  # as pytorch-grad-cam does
        maps, vectors = [], []
        for a in acts:  # the exact operations of get_2d_projection, image by image
            flat = a.reshape(a.shape[0], -1).transpose()
            flat = flat - flat.mean(axis=0)
            # full_matrices=False: the same VT (sign included; checked), without the
            # (h*w)^2 U that pytorch-grad-cam computes and discards.
            _, _, vt = np.linalg.svd(flat, full_matrices=False)
            maps.append((flat @ vt[0, :]).reshape(a.shape[1:]))
            vectors.append(vt[0, :])
        cam = torch.from_numpy(np.float32(maps)).to(activation.device).clamp_min_(0)
        return cam, torch.from_numpy(np.float32(vectors)).to(activation.device)
