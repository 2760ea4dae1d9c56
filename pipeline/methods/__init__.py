"""Methods by config name: ``declare.py`` and ``catalog.py`` say what each method is (torch-free),
``<name>.py`` implements it, ``base.py`` holds the shared mechanics and the registry.

Importing this package declares every shipped method and imports no torch, so the config
(and every read-only stage) can list and check methods without loading it. The names that
need torch (``METHODS``, the classes, ``build_method``, ...) are imported on first use: then
every module of the package is imported, and each ``@register`` binds its class.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from . import catalog as _catalog  # noqa: F401 (declares the shipped methods)
from .declare import (
    SCORES,
    SPECS,
    AttributionOptions,
    CAMWeightOptions,
    MethodOptions,
    MethodSpec,
    declare,
    method_spec,
    on_declare,
    option,
)

if TYPE_CHECKING:
    from torch import nn

    from .base import Method

# The names that need torch, by the module that defines them.
_LAZY = {
    **dict.fromkeys(("METHODS", "Method", "Batch", "TargetFn", "target_score", "target_fn",
                     "explain_topk", "reduce_channels", "register", "unregister"), "base"),
    **dict.fromkeys(("GradientCAM", "GradCAM", "cam_from_gradients", "weighted_cam"), "gradcam"),
    "Activations": "activations", "EigenCAM": "eigencam", "GradCAMPlusPlus": "gradcampp",
    "GuidedBackprop": "guided_backprop", "GuidedGradCAM": "guided_gradcam",
    "HiResCAM": "hirescam", "InputGradient": "input_gradient",
    "IntegratedGradients": "integrated_gradients", "LayerCAM": "layercam",
    "Saliency": "saliency", "ScoreCAM": "scorecam", "SmoothGrad": "smoothgrad",
    "XGradCAM": "xgradcam",
}


def load_all() -> None:
    """Import every module of the package (torch): each ``@register`` binds its class."""
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    load_all()  # METHODS must hold every shipped method, whichever name came first
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def method_class(name: str) -> type[Method]:
    """The class that implements method ``name`` (imported now), or a one-line
    :class:`ConfigError` for a name nobody declared."""
    spec = method_spec(name)
    from .base import METHODS

    if name not in METHODS:
        importlib.import_module(spec.module)
    if name not in METHODS:
        raise TypeError(f"{spec.module} has no @register class named {name!r}")
    return METHODS[name]


def build_method(cfg: Any, model: nn.Module, layers: Any, **kwargs: Any) -> Method:
    """``cfg`` is the ``method`` config group: its name plus that method's options."""
    options = {k: v for k, v in dict(cfg).items() if k != "name"}
    return method_class(cfg.name)(model, layers, **options, **kwargs)


__all__ = [
    "SCORES", "SPECS", "MethodSpec", "MethodOptions", "CAMWeightOptions", "AttributionOptions",
    "declare", "method_spec", "on_declare", "option", "load_all", "method_class",
    "build_method", *_LAZY,
]
