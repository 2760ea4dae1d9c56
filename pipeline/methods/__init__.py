"""Methods by config name. Each file holds one; base.py the shared mechanics."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, unknown
from .activations import Activations
from .base import Method, explain_topk, target_fn
from .eigencam import EigenCAM
from .gradcam import GradCAM, GradientCAM, cam_from_gradients
from .gradcampp import GradCAMPlusPlus
from .guided_backprop import GuidedBackprop
from .guided_gradcam import GuidedGradCAM
from .hirescam import HiResCAM
from .integrated_gradients import IntegratedGradients
from .layercam import LayerCAM
from .saliency import Saliency
from .scorecam import ScoreCAM
from .smoothgrad import SmoothGrad
from .xgradcam import XGradCAM

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    GradCAM, Saliency, Activations,
    GradCAMPlusPlus, XGradCAM, LayerCAM, HiResCAM, ScoreCAM, EigenCAM,
    SmoothGrad, IntegratedGradients, GuidedBackprop, GuidedGradCAM,
)}


def build_method(cfg: Any, model, layers, **kwargs) -> Method:
    """``cfg`` is the ``method`` config group: its name plus that method's options."""
    if cfg.name not in METHODS:
        raise ConfigError(unknown("method", cfg.name, METHODS))
    options = {k: v for k, v in dict(cfg).items() if k != "name"}
    return METHODS[cfg.name](model, layers, **options, **kwargs)


__all__ = ["METHODS", "Method", "GradCAM", "Saliency", "Activations", "build_method",
           "explain_topk",
           "cam_from_gradients", "target_fn", "GradientCAM", "GradCAMPlusPlus", "XGradCAM",
           "LayerCAM", "HiResCAM", "ScoreCAM", "EigenCAM", "SmoothGrad", "IntegratedGradients",
           "GuidedBackprop", "GuidedGradCAM"]
