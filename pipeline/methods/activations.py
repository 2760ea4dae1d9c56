"""Forward outputs of the target layers, under inference mode."""

from __future__ import annotations

import torch

from ..hooks import LayerRecorder
from .base import Batch, Method, TargetFn

DTYPES = {"float16": torch.float16, "float32": torch.float32}


class Activations(Method):
    name = "activations"
    needs_grad = False
    kind = "activations"

    def __init__(
        self,
        *args,
        dtype: str = "float16",
        pool: str = "none",
        max_channels: int | None = None,
        **kwargs,
    ) -> None:
        self.dtype = DTYPES[dtype]
        self.pool = pool
        self.max_channels = max_channels
        super().__init__(*args, **kwargs)

    def _transform(self, t: torch.Tensor) -> torch.Tensor:
        # Reduce inside the hook: a new tensor, so no clone is needed, and the full-size
        # output is never held longer than the layer that consumes it.
        if self.reshape is not None:
            t = self.reshape(t)
        if self.max_channels is not None:
            t = t[:, : self.max_channels]
        if self.pool == "avg" and t.ndim == 4:
            t = t.float().mean(dim=(2, 3))
        out = t.to(self.dtype)
        return out if out.data_ptr() != t.data_ptr() else out.clone()

    def make_recorder(self) -> LayerRecorder:
        return LayerRecorder(self.layers, for_grad=False, transform=self._transform)

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        _, out = self.forward(x, choose)
        assert self.recorder is not None
        for name in self.layers:
            out[f"activations/{name}"] = self.recorder.outputs[name]
        return out
