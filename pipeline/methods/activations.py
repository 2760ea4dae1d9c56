"""Forward outputs of the target layers, under inference mode."""

from __future__ import annotations

import torch

from ..hooks import LayerRecorder
from .base import Batch, Method, TargetFn, register
from .catalog import ActivationsOptions

DTYPES = {"float16": torch.float16, "float32": torch.float32}  # catalog.ACTIVATION_DTYPES


@register
class Activations(Method):
    """The target layers' outputs, copied in the forward hooks (before any in-place op)."""

    name = "activations"
    needs_grad = False
    options: ActivationsOptions

    def _transform(self, t: torch.Tensor) -> torch.Tensor:
        # Reduce inside the hook: a new tensor, so no clone is needed, and the full-size
        # output is never held longer than the layer that consumes it.
        if self.reshape is not None:
            t = self.reshape(t)
        if self.options.max_channels is not None:
            t = t[:, : self.options.max_channels]
        if self.options.pool == "avg" and t.ndim == 4:
            t = t.float().mean(dim=(2, 3))
        out = t.to(DTYPES[self.options.dtype])
        return out if out.data_ptr() != t.data_ptr() else out.clone()

    def make_recorder(self) -> LayerRecorder:
        return LayerRecorder(self.layers, for_grad=False, transform=self._transform)

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        _, out = self.forward(x, choose)
        assert self.recorder is not None
        for name in self.layers:
            out[f"activations/{name}"] = self.recorder.outputs[name]
        return out
