"""Guided Backpropagation (Springenberg et al., 2015): only positive gradients pass ReLUs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..hooks import HookSet
from .base import Batch, Method, TargetFn, register
from .declare import AttributionOptions
from .input_gradient import InputGradient


class GuidedReLUs(HookSet):
    """Forward hooks on every ``nn.ReLU`` module that, while :meth:`guiding`, make the
    backward pass through that ReLU pass only positive gradients.

    The hook registers a tensor hook on the ReLU's output that clamps the incoming gradient
    at 0; the ReLU's own backward then applies its mask, so the gradient to its input is
    relu(dY/dout) * (in > 0): pytorch-grad-cam's ``GuidedBackpropReLU`` and Captum's
    ``GuidedBackprop`` (which applies relu after the mask; the same numbers). Nothing in the
    model is replaced or switched: ``ReLU(inplace=True)`` works as is (the hook sees the
    output, whatever storage it shares with the input), and a module called twice per forward
    (torchvision's BasicBlock) is guided at both calls. ``F.relu`` called in a ``forward``
    cannot be hooked and stays a plain ReLU there, as in Captum.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        if not self.modules:
            kinds = sorted({type(m).__name__ for m in model.modules()
                            if type(m).__module__.startswith("torch.nn.modules.activation")})
            raise ConfigError(
                "guided backprop changes the backward pass of nn.ReLU modules and this model "
                f"has none (its activations: {', '.join(kinds) or 'none found'}); "
                "use saliency, smoothgrad or integrated_gradients"
            )
        super().__init__()
        self.active = False

    def _hook(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        if self.active and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: grad.clamp_min(0))

    def hooks(self) -> list[tuple[nn.Module, Any]]:
        return [(module, self._hook) for module in self.modules]

    def remove(self) -> None:
        super().remove()
        self.active = False

    @contextmanager
    def guiding(self) -> Iterator[None]:
        """Forward passes inside are guided (their backward passes, that is)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False


class GuidedHooksMixin(Method):
    """Owns a :class:`GuidedReLUs` whose hooks live exactly as long as the ``with`` block."""

    guided: GuidedReLUs

    def hook_sets(self) -> list[HookSet]:
        return [*super().hook_sets(), self.guided]

    def guided_gradient(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Guided dY_t/dx (N, C, H, W): one forward and one ``autograd.grad``."""
        x = x.detach().requires_grad_()
        with self.guided.guiding(), self.autocast(x):
            logits = self.model(x)
        score = self.score_of(logits, target)
        (grad,) = self.score_gradients(score, [x])
        return grad.float()


@register
class GuidedBackprop(GuidedHooksMixin, InputGradient):
    """dY_t/dx with every ReLU passing only positive gradients, reduced as ``/saliency``."""

    name = "guided_backprop"
    options: AttributionOptions

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        self.guided = GuidedReLUs(model)
        super().__init__(model, *args, **kwargs)

    def compute(self, x: torch.Tensor, choose: TargetFn) -> Batch:
        x = x.detach().requires_grad_()
        with self.guided.guiding():
            score, out = self.forward(x, choose)
        (grad,) = self.score_gradients(score, [x])
        self.add_attribution(out, "input", grad)
        return out
