"""The shape every method shares (forward, pick targets, compute maps, return arrays), the
options a method declares, and the registry of methods by config name.

A method is one module in this package: a :class:`Method` subclass decorated with
:func:`register` and, when it has options, a :class:`MethodOptions` dataclass beside it.
Its config schema, its name in the config's choices and the checks of its option values
all come from that declaration (see ``pipeline/config.py``); the package imports every
module in it, so nothing else lists the methods.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..errors import ConfigError, unknown
from ..hooks import HookSet, LayerRecorder
from ..runtime import loss_scale_of, scaled_grad

# Picks the class to explain per image from the logits, e.g. argmax or the dataset label.
TargetFn = Callable[[torch.Tensor], torch.Tensor]
Batch = dict[str, torch.Tensor]  # keys are HDF5 paths: "gradcam/layer4", "targets/class", ...

# What is explained of the target class t (``target.score``): every method backpropagates
# (or, gradient-free, compares) this one function of the logits z, and stores its value.
SCORES = ("logit", "prob", "logprob", "sigmoid")


def target_score(logits: torch.Tensor, target: torch.Tensor, kind: str = "logit") -> torch.Tensor:
    """The explained score of class ``target[i]`` for each row of (N, K) ``logits``.

    ``logit``: z_t (Grad-CAM's pre-softmax score; pytorch-grad-cam's ``ClassifierOutputTarget``);
    ``prob``: softmax(z)_t (its ``ClassifierOutputSoftmaxTarget``); ``logprob``:
    log_softmax(z)_t, whose gradient is dz_t - sum_k softmax(z)_k dz_k; ``sigmoid``:
    sigmoid(z_t), the probability of label t in a multi-label model.

    Args:
        logits: (N, K) float logits, with or without a graph.
        target: (N,) int64 class per row.
        kind: One of :data:`SCORES`.

    Returns:
        (N,) scores, differentiable where ``logits`` are.
    """
    index = target.view(-1, 1)
    if kind == "logit":
        return logits.gather(1, index).squeeze(1)
    if kind == "prob":
        return logits.softmax(1).gather(1, index).squeeze(1)
    if kind == "logprob":  # log_softmax, not log(softmax): finite where softmax underflows
        return logits.log_softmax(1).gather(1, index).squeeze(1)
    if kind == "sigmoid":
        return logits.gather(1, index).squeeze(1).sigmoid()
    raise ConfigError(unknown("target.score", kind, SCORES))


def target_fn(target: Any, labels: torch.Tensor | None = None) -> TargetFn:
    """``pred`` -> top-1; ``label`` -> the dataset labels; an int -> that class for all."""
    if target == "pred":
        return lambda logits: logits.argmax(1)
    if target == "label":
        if labels is None:
            raise ValueError("target=label needs labels")
        return lambda logits: labels.to(logits.device)
    cls = int(target)

    def fixed(logits: torch.Tensor) -> torch.Tensor:
        if not 0 <= cls < logits.shape[1]:  # shapes are on the host: no device sync
            raise ValueError(f"target class {cls} outside 0..{logits.shape[1] - 1}")
        return torch.full((logits.shape[0],), cls, dtype=torch.long, device=logits.device)

    return fixed


def reduce_channels(attribution: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): max over channels of |attribution| (Simonyan et al.)."""
    return attribution.abs().amax(dim=1)


def explain_topk(method: Method, x: torch.Tensor, k: int) -> Batch:
    """Maps for each image's k best classes, for any method, from one call.

    Every image is repeated k times (image-major), replica j explains the j-th class of the
    first replica's top k; outputs get a class axis: (N, k, ...). Predictions stay (N, topk).
    """
    n = x.shape[0]

    def choose(logits: torch.Tensor) -> torch.Tensor:
        # All replicas of an image share the classes of its first one, so near-ties in
        # floating point cannot give one image two orders.
        return logits.view(n, k, -1)[:, 0].topk(k, dim=1).indices.flatten()

    out = method(x.repeat_interleave(k, dim=0), choose)
    return {key: v[::k] if key.startswith("predictions/") else v.unflatten(0, (n, k))
            for key, v in out.items()}


# -- options ----------------------------------------------------------------------------------


def option(
    default: Any,
    *,
    choices: tuple[Any, ...] | None = None,
    at_least: float | None = None,
    above: float | None = None,
) -> Any:
    """A field of a :class:`MethodOptions` dataclass with the values it accepts.

    Args:
        default: The value when the config (or the caller) gives none.
        choices: The only values allowed (an enumerated option).
        at_least: The smallest value allowed (``>=``).
        above: A bound the value must exceed (``>``).

    Returns:
        A ``dataclasses.field``; :meth:`MethodOptions.check` enforces the bounds.
    """
    return field(default=default,
                 metadata={"choices": choices, "at_least": at_least, "above": above})


@dataclass
class MethodOptions:
    """A method's options: every key of its ``method`` config group except ``name``.

    Subclasses are dataclasses whose fields (with types, defaults and, through
    :func:`option`, the values allowed) are the single declaration of a method's options:
    the Hydra schema is built from them, ``validate`` checks configs with :meth:`check`,
    and the method receives them as ``self.options``. Options that constrain each other
    add their rule by overriding :meth:`check`.
    """

    def check(self) -> None:
        """Raise :class:`ConfigError` (one line, naming ``method.<option>``) for the first
        value the declaration does not allow."""
        for f in fields(self):
            value, key = getattr(self, f.name), f"method.{f.name}"
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(unknown(key, value, choices))
            if value is None or isinstance(value, str):
                continue
            low = f.metadata.get("at_least")
            if low is not None and value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
            bound = f.metadata.get("above")
            if bound is not None and value <= bound:
                raise ConfigError(f"{key} must be > {bound}, got {value}")


@dataclass
class CAMWeightOptions(MethodOptions):
    """The option of the CAMs that have per-channel weights."""

    save_weights: bool = True  # also store the channel weights under /<method>_weights


@dataclass
class AttributionOptions(MethodOptions):
    """The option of the methods with a signed (N, C, H, W) attribution to the input."""

    save_attribution: bool = False  # also store it under /<method>_attribution


class Method(ABC):
    """A context manager around a model whose call maps an input batch to stored arrays.

    Subclasses set :attr:`name` and :attr:`kind`, declare their options as :attr:`Options`,
    say whether they need gradients and implement :meth:`compute`; :func:`register` makes
    them a config choice. Hooks (if any) live exactly as long as the ``with`` block.
    """

    name: ClassVar[str]
    needs_grad: ClassVar[bool] = True
    uses_layers: ClassVar[bool] = True  # False: works on the input, target_layers unused
    # What the stored maps are, for readers and pictures: "cam" (N, h, w) per layer at the
    # layer's resolution, "input" (N, H, W) at the input's, or "activations". The results
    # file keys each dataset's dimension names and ``kind`` attribute by it.
    kind: ClassVar[str] = "cam"
    # The method's options (its config keys besides ``name``); none by default.
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    options: MethodOptions

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
        topk: int = 5,
        autocast_dtype: torch.dtype | None = None,
        score: str = "logit",
        **options: Any,
    ) -> None:
        """Declare the method; its hooks are registered on ``__enter__``.

        Args:
            model: The network, in eval mode; parameters frozen or not (no parameter
                gradients are ever computed).
            layers: Target layers by name (``resolve_layers``); empty for input methods.
            reshape: Turns a token layer's output into (N, C, h, w), or None.
            topk: Predictions (classes, probabilities) returned per image.
            autocast_dtype: bf16/fp16 autocast for the model's passes, or None (fp32).
            score: What is explained of the target class (``target.score``, one of
                :data:`SCORES`): every pass of the method scores through :meth:`score_of`.
            **options: The method's :attr:`Options`, checked here as the config is.
        """
        self.options = self.Options(**options)
        self.options.check()
        if score not in SCORES:
            raise ConfigError(unknown("target.score", score, SCORES))
        self.score_kind = score
        self.model = model
        self.layers = dict(layers)
        self.reshape = reshape
        self.topk = topk
        self.autocast_dtype = autocast_dtype
        self.recorder: LayerRecorder | None = self.make_recorder()
        self._hooks = ExitStack()

    def make_recorder(self) -> LayerRecorder | None:
        return LayerRecorder(self.layers, for_grad=True) if self.layers else None

    def hook_sets(self) -> list[HookSet]:
        """The hooks this method needs while its ``with`` block lasts."""
        return [self.recorder] if self.recorder is not None else []

    def __enter__(self) -> Method:
        with ExitStack() as stack:  # a set that fails to register unwinds the ones before
            for hooks in self.hook_sets():
                stack.enter_context(hooks)
            self._hooks = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.close()

    def autocast(self, x: torch.Tensor) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast_dtype)

    def score_of(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The explained score (:func:`target_score` of :attr:`score_kind`), in float32."""
        return target_score(logits.float(), target, self.score_kind)

    def __call__(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        """Run one batch; every returned tensor has the batch as its first axis."""
        grad_mode = torch.enable_grad() if self.needs_grad else torch.inference_mode()
        try:
            with grad_mode:
                out = self.compute(x, choose)
        finally:
            if self.recorder is not None:
                self.recorder.clear()
        return out

    def forward(self, x: torch.Tensor, choose: TargetFn) -> tuple[torch.Tensor, Batch]:
        """The explained score (N,) plus the prediction and target arrays every method
        stores (``targets/score``: the value of that score, not always the logit)."""
        with self.autocast(x):
            logits = self.model(x)
        logits = logits.float()
        prob, cls = logits.detach().softmax(1).topk(min(self.topk, logits.shape[1]), dim=1)
        # Targets are checked on the host before the batch (no device sync here).
        target = choose(logits.detach())
        score = self.score_of(logits, target)
        out = {
            "predictions/class": cls.int(),
            "predictions/prob": prob,
            "targets/class": target.int(),
            "targets/score": score.detach(),
        }
        return score, out

    def score_gradients(self, score: torch.Tensor, inputs: Sequence[torch.Tensor],
                        allow_unused: bool = False) -> tuple[torch.Tensor | None, ...]:
        """d(sum of the scores)/d inputs; loss-scaled under fp16 autocast (runtime.scaled_grad)."""
        return scaled_grad(score.sum(), inputs, loss_scale_of(self.autocast_dtype), allow_unused)

    @abstractmethod
    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        """One batch (N, C, H, W) -> every array to store, keyed by its HDF5 path."""

    def add_map(self, out: Batch, key: str, cam: torch.Tensor,
                weights: torch.Tensor | None = None) -> None:
        """Put ``"<name>/<key>"`` into ``out``, and ``"<name>_weights/<key>"`` where there are
        channel weights and the method's ``save_weights`` option (if it has one) is on."""
        out[f"{self.name}/{key}"] = cam
        if weights is not None and getattr(self.options, "save_weights", False):
            out[f"{self.name}_weights/{key}"] = weights

    def add_attribution(self, out: Batch, key: str, attribution: torch.Tensor) -> None:
        """Put ``"<name>/<key>"`` (N, H, W), the attribution (N, C, H, W) reduced as saliency
        is, into ``out``; and the signed attribution as ``"<name>_attribution/<key>"`` where
        the method's ``save_attribution`` option (if it has one) is on."""
        attribution = attribution.float()
        out[f"{self.name}/{key}"] = reduce_channels(attribution)
        if getattr(self.options, "save_attribution", False):
            out[f"{self.name}_attribution/{key}"] = attribution


# -- the registry ---------------------------------------------------------------------------

METHODS: dict[str, type[Method]] = {}  # config name -> class, filled by @register
KINDS = ("cam", "input", "activations")
_NAME = re.compile(r"[a-z][a-z0-9_]*")  # an HDF5 group, a Hydra schema and a config value
_listeners: list[Callable[[type[Method]], None]] = []
_M = TypeVar("_M", bound="type[Method]")


def register(cls: _M) -> _M:
    """Class decorator: make ``cls`` the method of config name ``cls.name``.

    Checks the declaration (a lower-case name not taken yet, a known :attr:`Method.kind`,
    options as a :class:`MethodOptions` dataclass without a ``name`` field), then tells
    every listener (``pipeline.config`` stores the method's Hydra schema), so a method
    defined outside this package (a plugin, a test) is complete once its module is imported.
    """
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TypeError(f"{cls.__name__}.name must be a lower-case identifier, got {name!r}")
    if name in METHODS:
        raise TypeError(f"method {name!r} is registered already ({METHODS[name].__name__})")
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    opts = cls.Options
    if not (is_dataclass(opts) and issubclass(opts, MethodOptions)):
        raise TypeError(f"{cls.__name__}.Options must be a MethodOptions dataclass")
    if any(f.name == "name" for f in fields(opts)):
        raise TypeError(f"{opts.__name__} may not declare 'name' (the config's method name)")
    METHODS[name] = cls
    for listener in _listeners:
        listener(cls)
    return cls


def on_register(listener: Callable[[type[Method]], None]) -> None:
    """Call ``listener`` with every registered method class, now and when one registers."""
    if listener in _listeners:
        return
    _listeners.append(listener)
    for cls in list(METHODS.values()):
        listener(cls)

