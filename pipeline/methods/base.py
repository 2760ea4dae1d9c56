"""The shape every method shares: forward, pick targets, compute maps, return arrays."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack, nullcontext
from types import TracebackType
from typing import Any, ClassVar

import torch
from torch import nn

from ..hooks import HookSet, LayerRecorder

# Picks the class to explain per image from the logits, e.g. argmax or the dataset label.
TargetFn = Callable[[torch.Tensor], torch.Tensor]
Batch = dict[str, torch.Tensor]  # keys are HDF5 paths: "gradcam/layer4", "targets/class", ...


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

    Subclasses set :attr:`name`, say whether they need gradients and implement
    :meth:`compute`. Hooks (if any) live exactly as long as the ``with`` block.
    """

    name: ClassVar[str]
    needs_grad: ClassVar[bool] = True
    uses_layers: ClassVar[bool] = True  # False: works on the input, target_layers unused
    # What the stored maps are, for readers and pictures: "cam" (N, h, w) per layer at the
    # layer's resolution, "input" (N, H, W) at the input's, or "activations".
    kind: ClassVar[str] = "cam"

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
        topk: int = 5,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._hooks.close()

    def autocast(self, x: torch.Tensor) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast_dtype)

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
        """Logits plus the prediction and target arrays every method stores."""
        with self.autocast(x):
            logits = self.model(x)
        logits = logits.float()
        prob, cls = logits.detach().softmax(1).topk(min(self.topk, logits.shape[1]), dim=1)
        # Targets are checked on the host before the batch (no device sync here).
        target = choose(logits.detach())
        score = logits.gather(1, target[:, None]).squeeze(1)
        out = {
            "predictions/class": cls.int(),
            "predictions/prob": prob,
            "targets/class": target.int(),
            "targets/score": score.detach(),
        }
        return score, out

    @abstractmethod
    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch: ...
