"""Base of the gradient-free CAMs (Score-CAM, Eigen-CAM): maps from recorded activations."""

from __future__ import annotations

from typing import Any

import torch

from ..hooks import LayerRecorder
from .base import Batch, Method, TargetFn


class ActivationCAM(Method):
    """One forward under ``torch.inference_mode`` records every target layer; subclasses turn a
    layer's activations into a map with :meth:`combine`.

    Maps are stored under ``"<name>/<layer>"`` at the layer's resolution, not normalized;
    channel weights (where the method has them) under ``"<name>_weights/<layer>"``.
    Subclasses that run the model again (Score-CAM's masked inputs) do so inside
    :meth:`not_recording`, so those passes do not copy the target layers' outputs.
    """

    needs_grad = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._recording = True
        super().__init__(*args, **kwargs)

    def _keep(self, output: torch.Tensor) -> torch.Tensor:
        # A copy, so in-place ops after the layer (ReLU(inplace=True)) cannot change it; an
        # empty placeholder during extra passes, which need no copy of every layer.
        return output.clone() if self._recording else output.new_empty(0)

    def make_recorder(self) -> LayerRecorder:
        return LayerRecorder(self.layers, for_grad=False, transform=self._keep)

    def not_recording(self) -> _Paused:
        """Context in which the layer hooks keep nothing (extra forward passes)."""
        return _Paused(self)

    def combine(
        self, x: torch.Tensor, activation: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input (N, 3, H, W), float32 activations (N, C, h, w) and target classes (N,) ->
        (CAM (N, h, w), channel weights (N, C) or None)."""
        raise NotImplementedError

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        _, out = self.forward(x, choose)
        assert self.recorder is not None
        missing = [n for n in self.layers if n not in self.recorder.outputs]
        if missing:
            raise RuntimeError(f"target layers {missing} were not called in the forward pass")
        acts = {n: self.recorder.outputs[n] for n in self.layers}
        self.recorder.clear()  # the dict above holds the layers' outputs now
        target = out["targets/class"].long()
        for name, act in acts.items():
            act = act.float()
            if self.reshape is not None:
                act = self.reshape(act)
            self.add_map(out, name, *self.combine(x, act, target))
        return out


class _Paused:
    def __init__(self, method: ActivationCAM) -> None:
        self.method = method

    def __enter__(self) -> None:
        self.method._recording = False

    def __exit__(self, *exc: object) -> None:
        self.method._recording = True
