"""Capture layer outputs with forward hooks that are always removed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_H = TypeVar("_H", bound="HookSet")


class HookSet:
    """Forward hooks registered on ``__enter__`` and removed on exit, also when the body or
    the registration itself raises. Subclasses say which hook goes on which module."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def hooks(self) -> Iterable[tuple[nn.Module, Callable[..., torch.Tensor | None]]]:
        raise NotImplementedError

    def __enter__(self: _H) -> _H:
        try:
            for module, hook in self.hooks():
                self._handles.append(module.register_forward_hook(hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class LayerRecorder(HookSet):
    """Context manager that records the outputs of named modules during forward passes.

    ``for_grad=True`` (Grad-CAM): each hook keeps a tensor to differentiate against and
    returns a clone of it in place of the module's output, so in-place operations that
    follow (``ReLU(inplace=True)``, ``out += identity``) change the clone, never what was
    kept. Where the output has no graph yet (the first target layer; parameters frozen) the
    kept tensor is a fresh leaf, so nothing upstream of it builds a graph; where it already
    has one (later layers) the output itself is kept, which leaves the gradient path to the
    earlier layers intact.

    ``for_grad=False`` (activations, under ``torch.inference_mode``): each hook stores
    ``transform(output)``, or a clone of the output when no transform is given.

    Recorded tensors live in :attr:`outputs` until :meth:`clear` or exit; nothing is kept on
    the instance across batches unless the caller leaves it there.
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        for_grad: bool,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.layers = dict(layers)
        self.for_grad = for_grad
        self.transform = transform
        self.outputs: dict[str, torch.Tensor] = {}

    def hooks(self) -> Iterable[tuple[nn.Module, Callable[..., torch.Tensor | None]]]:
        return [(module, self._hook(name)) for name, module in self.layers.items()]

    def _hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor | None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
            if not self.for_grad:
                self.outputs[name] = (
                    self.transform(output) if self.transform else output.clone()
                )
                return None
            kept = output if output.requires_grad else output.detach().requires_grad_()
            self.outputs[name] = kept
            return kept.clone()

        # Under torch.compile the hook runs eagerly, as a graph break: inside one compiled
        # graph a kept later layer would be another output of the graph's single autograd
        # node, a sibling of the score rather than one of its inputs, and its gradient None.
        # Split at each hooked layer, every kept tensor is an input of the graph after it.
        return torch.compiler.disable(hook) if self.for_grad else hook

    def remove(self) -> None:
        """Remove every hook and drop recorded tensors."""
        super().remove()
        self.outputs.clear()

    def clear(self) -> None:
        self.outputs.clear()
