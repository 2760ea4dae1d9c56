"""The shape every method shares (forward, pick targets, compute maps, return arrays) and
the registry of method implementations by config name.

A method is declared torch-free (``declare.py``: name, options, kind; the shipped ones in
``catalog.py``) and implemented by a :class:`Method` subclass decorated with
:func:`register` in ``pipeline/methods/<name>.py``. A method defined elsewhere (a plugin, a
test) is declared by its class alone: :func:`register` declares it from the class's
attributes, so it is complete once its module is imported.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..errors import ConfigError, unknown
from ..hooks import HookSet, LayerRecorder
from ..runtime import loss_scale_of, scaled_grad
from .declare import SCORES, SPECS, MethodOptions, declare

# Picks the class to explain per image from the logits, e.g. argmax or the dataset label.
TargetFn = Callable[[torch.Tensor], torch.Tensor]
Batch = dict[str, torch.Tensor]  # keys are HDF5 paths: "gradcam/layer4", "targets/class", ...

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


class Method(ABC):
    """A context manager around a model whose call maps an input batch to stored arrays.

    Subclasses set :attr:`name` and :attr:`kind`, declare their options as :attr:`Options`,
    say whether they need gradients and implement :meth:`compute`; :func:`register` makes
    them a config choice. Hooks (if any) live exactly as long as the ``with`` block.
    """

    name: ClassVar[str]
    needs_grad: ClassVar[bool] = True
    uses_layers: ClassVar[bool] = True  # False: works on the input, target_layers unused
    kind: ClassVar[str] = "cam"  # one of declare.KINDS: what the stored maps are
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
_DECLARED = ("Options", "kind", "uses_layers")  # what a declaration states about a class
_M = TypeVar("_M", bound="type[Method]")


def register(cls: _M) -> _M:
    """Class decorator: make ``cls`` the implementation of method ``cls.name``.

    A method declared already (the shipped ones, ``catalog.py``) gives the class its
    :attr:`Method.Options`, :attr:`Method.kind` and :attr:`Method.uses_layers`; the class
    must be in the declared module and may not state them otherwise. An undeclared one (a
    plugin, a test) is declared from the class's own attributes (``declare`` checks them:
    a lower-case name not taken yet, a known kind, options as a :class:`MethodOptions`
    dataclass without a ``name`` field). Nothing is recorded when a check fails.
    """
    name = cls.__dict__.get("name")
    if name in METHODS:
        raise TypeError(f"method {name!r} is registered already ({METHODS[name].__name__})")
    spec = SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        declare(name, cls.Options, kind=cls.kind, uses_layers=cls.uses_layers,
                module=cls.__module__)
    else:
        if spec.module != cls.__module__:
            raise TypeError(f"method {name!r} is registered already ({spec.module})")
        for attr in _DECLARED:
            if attr in cls.__dict__ and cls.__dict__[attr] != getattr(spec, attr):
                raise TypeError(f"{cls.__name__}.{attr} differs from the declaration of "
                                f"{name!r} in catalog.py; state it there only")
            setattr(cls, attr, getattr(spec, attr))
    METHODS[name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget method ``name``: its class and its declaration (tests register toy methods)."""
    METHODS.pop(name, None)
    SPECS.pop(name, None)
