"""Methods by config name: one module per method, base.py the shared mechanics and registry.

Every module of this package is imported here, so a method is registered (``@register``)
by its module alone; ``METHODS`` maps config names to classes, in the order of registration.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from ..errors import ConfigError, unknown
from .activations import Activations
from .base import (
    METHODS,
    SCORES,
    AttributionOptions,
    Batch,
    CAMWeightOptions,
    Method,
    MethodOptions,
    TargetFn,
    explain_topk,
    on_register,
    option,
    reduce_channels,
    register,
    target_fn,
    target_score,
)
from .eigencam import EigenCAM
from .gradcam import GradCAM, GradientCAM, cam_from_gradients, weighted_cam
from .gradcampp import GradCAMPlusPlus
from .guided_backprop import GuidedBackprop
from .guided_gradcam import GuidedGradCAM
from .hirescam import HiResCAM
from .input_gradient import InputGradient
from .integrated_gradients import IntegratedGradients
from .layercam import LayerCAM
from .saliency import Saliency
from .scorecam import ScoreCAM
from .smoothgrad import SmoothGrad
from .xgradcam import XGradCAM

# The classes above are imported by name for callers; a new method's module needs no line
# here: this loop imports every module of the package, and its @register does the rest.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")


def method_class(name: str) -> type[Method]:
    """The registered method called ``name``, or a one-line :class:`ConfigError`."""
    if name not in METHODS:
        raise ConfigError(unknown("method", name, METHODS))
    return METHODS[name]


def build_method(cfg: Any, model: nn.Module, layers: Any, **kwargs: Any) -> Method:
    """``cfg`` is the ``method`` config group: its name plus that method's options."""
    options = {k: v for k, v in dict(cfg).items() if k != "name"}
    return method_class(cfg.name)(model, layers, **options, **kwargs)


__all__ = [
    "METHODS", "Method", "MethodOptions", "CAMWeightOptions", "AttributionOptions", "Batch",
    "TargetFn", "SCORES", "target_score", "InputGradient", "GradientCAM", "option", "register",
    "on_register",
    "method_class", "build_method", "explain_topk", "target_fn", "reduce_channels",
    "cam_from_gradients", "weighted_cam", "GradCAM", "Saliency", "Activations",
    "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM", "ScoreCAM", "EigenCAM", "SmoothGrad",
    "IntegratedGradients", "GuidedBackprop", "GuidedGradCAM",
]
