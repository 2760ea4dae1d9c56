"""How a layer's output becomes the (N, C, h, w) map a CAM needs, detected per layer.

CNN layers give (N, C, h, w) already. Transformers give tokens, (N, L, C): some prefix
tokens (class, distillation, registers) and then the patch tokens row by row; Swin stages
and the insides of ConvNeXt blocks give channels last, (N, h, w, C). Each target layer's
layout is read once from a probe pass at the run's input size: the number of prefix tokens
from the model (timm's ``num_prefix_tokens``, torchvision's class token), the grid from
the patch embedding (or, for hierarchical models, the factorization of the token count
whose aspect matches the input), channels last where the first two dims form the grid
and the last does not. ``model.reshape`` overrides the detection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from .errors import ConfigError, unknown

# null and auto detect; none keeps outputs as they are; vit reads tokens, nhwc/swin
# channels last (the overrides of before detection, kept).
RESHAPES = ("auto", "none", "vit", "nhwc", "swin")


@dataclass(frozen=True)
class Layout:
    """The layout of one layer's output (per image) and how it was decided.

    Attributes:
        kind: ``nchw`` (a map already), ``nhwc`` (channels last), ``tokens`` (prefix tokens,
            then h*w patch tokens, channels last) or ``none`` (used as it is: a vector).
        shape: The layer's output per image at the probe's input size.
        channels: C of the map.
        grid: (h, w) of the map; None for ``none``.
        prefix: Tokens before the patch tokens (class, distillation, registers).
        source: ``auto`` or the ``model.reshape=...`` that forced it.
    """

    kind: str
    shape: tuple[int, ...]
    channels: int
    grid: tuple[int, int] | None
    prefix: int = 0
    source: str = "auto"

    def describe(self) -> str:
        """E.g. ``tokens(prefix=1, grid=14x14)``, ``nhwc(grid=7x7)``, ``none``."""
        if self.grid is None:
            return self.kind
        grid = f"grid={self.grid[0]}x{self.grid[1]}"
        return f"tokens(prefix={self.prefix}, {grid})" if self.kind == "tokens" else (
            f"{self.kind}({grid})")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the results file (``layer_layouts``)."""
        return {"layout": self.kind, "text": self.describe(), "shape": list(self.shape),
                "channels": self.channels, "grid": None if self.grid is None else list(self.grid),
                "prefix": self.prefix, "source": self.source}

    def to_map(self, t: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, *shape) -> (N, C, h, w); ``grid`` replaces the probe's (other input sizes)."""
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        if self.kind != "tokens":
            return t
        h, w = grid or self.grid or (0, 0)
        return t[:, self.prefix:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


def prefix_tokens(model: nn.Module) -> int | None:
    """Tokens before the patch tokens, as the model says; None where it does not say."""
    n = getattr(model, "num_prefix_tokens", None)  # timm's ViT family (class, dist, reg)
    if isinstance(n, int):
        return n
    if isinstance(model, torchvision.models.VisionTransformer):
        return 1  # the class token
    return None


def patch_grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
    """The patch embedding's grid for an input of ``size`` (H, W); None without one."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and hasattr(embed, "dynamic_feat_size"):  # timm's PatchEmbed
        return tuple(int(v) for v in embed.dynamic_feat_size(size))  # type: ignore[return-value]
    if isinstance(model, torchvision.models.VisionTransformer):
        return size[0] // model.patch_size, size[1] // model.patch_size
    return None


def _grid_like(h: int, w: int, size: tuple[int, int]) -> bool:
    """Whether an (h, w) could be the input (H, W) at some stride: within it, same aspect
    up to the rounding of a few border pixels per side."""
    big_h, big_w = size
    return 1 <= h <= big_h and 1 <= w <= big_w and abs(h * big_w - w * big_h) <= 2 * max(size)


def _token_grid(n: int, size: tuple[int, int],
                expected: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (h, w) of ``n`` patch tokens: the patch grid when it holds n, else the
    factorization whose aspect is closest to the input's; None if none is grid-like."""
    if expected is not None and expected[0] * expected[1] == n:
        return expected
    pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    pairs = [p for p in pairs if _grid_like(*p, size)]
    if not pairs:
        return None
    return min(pairs, key=lambda p: abs(math.log(p[0] * size[1] / (p[1] * size[0]))))


def _guess_prefix(length: int, size: tuple[int, int], expected: tuple[int, int] | None,
                  default: int) -> int:
    """Prefix tokens of a model that does not say: of 0..8, the count whose remaining tokens
    are the patch grid, else form the grid closest to the input's aspect (fewer on ties)."""
    best: tuple[tuple[bool, float, int], int] | None = None
    for p in range(min(length, 9)):
        grid = _token_grid(length - p, size, expected)
        if grid is None:
            continue
        aspect = abs(math.log(grid[0] * size[1] / (grid[1] * size[0])))
        key = (grid != expected, round(aspect, 6), p)
        if best is None or key < best[0]:
            best = (key, p)
    return default if best is None else best[1]


def _last_dim_channels(module: nn.Module) -> int | None:
    """C of a module that works on the last dimension (LayerNorm, Linear)."""
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return None


def detect(name: str, module: nn.Module, model: nn.Module, shape: tuple[int, ...],
           size: tuple[int, int], setting: str | None = None) -> Layout:
    """The layout of ``module``'s output, ``shape`` per image, for an input of ``size``.

    Args:
        name: The layer as configured (for messages).
        module: The layer.
        model: The whole network (prefix tokens, patch grid).
        shape: The layer's output per image (batch dim dropped).
        size: The input's (H, W).
        setting: ``model.reshape``: None/auto detect; none, vit, nhwc, swin force.

    Raises:
        ConfigError: A forced layout that the output cannot have (one line, naming the
            layer and its shape).
    """
    setting = "auto" if setting is None else setting
    if setting not in RESHAPES:
        raise ConfigError(unknown("model.reshape", setting, RESHAPES))
    source = "auto" if setting == "auto" else f"model.reshape={setting}"
    dims = tuple(int(d) for d in shape)
    as_is = (Layout("nchw", dims, dims[0], (dims[1], dims[2]), source=source)
             if len(dims) == 3 else Layout("none", dims, dims[0] if dims else 0, None,
                                           source=source))
    if setting == "none":
        return as_is
    if setting in ("nhwc", "swin") or (setting == "auto" and len(dims) == 3):
        if len(dims) != 3:
            raise ConfigError(f"model.reshape={setting}: layer {name!r} outputs {dims} per "
                              f"image, not (h, w, C)")
        if setting == "auto":
            first, last = _grid_like(dims[0], dims[1], size), _grid_like(dims[1], dims[2], size)
            hint = _last_dim_channels(module)
            # Channels last where only the first two dims form the grid, or both could and
            # the module works on the last dim (a LayerNorm of C inside a ConvNeXt block).
            if not (first and (not last or (hint == dims[2] and hint != dims[0]))):
                return as_is
        return Layout("nhwc", dims, dims[2], (dims[0], dims[1]), source=source)
    if len(dims) != 2:
        if setting == "vit":
            raise ConfigError(f"model.reshape=vit: layer {name!r} outputs {dims} per image, "
                              f"not tokens (L, C)")
        return as_is
    length, channels = dims
    expected = patch_grid(model, size)
    prefix = prefix_tokens(model)
    if prefix is None:
        prefix = _guess_prefix(length, size, expected, 1 if setting == "vit" else 0)
    grid = _token_grid(length - prefix, size, expected) if length > prefix else None
    if grid is None:  # not tokens of a grid: used as they are (activations store them)
        if setting == "vit":
            raise ConfigError(f"model.reshape=vit: layer {name!r} outputs {length} tokens of "
                              f"{channels} channels; with {prefix} prefix tokens the rest form "
                              f"no grid for a {size[0]}x{size[1]} input")
        return as_is
    return Layout("tokens", dims, channels, grid, prefix, source)


def detect_layouts(model: nn.Module, layers: Mapping[str, nn.Module], size: tuple[int, int],
                   setting: str | None = None,
                   device: torch.device | str = "cpu") -> dict[str, Layout]:
    """Every target layer's :class:`Layout`, from one probe pass of a zero image of ``size``.

    Layers the pass does not reach, or that return no tensor, get no entry (the method says
    what is wrong with them).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape[1:])
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *size, device=device))
    finally:
        for h in handles:
            h.remove()
    return {n: detect(n, layers[n], model, shapes[n], size, setting) for n in layers
            if n in shapes}


class LayoutReshape:
    """The ``reshape`` a method applies to every target layer's output and gradient.

    Methods call it with a tensor only, so it finds the layer's layout by the tensor's
    shape. A shape the probe did not see (another input size) is matched by rank and
    channel count, and token grids are re-derived from the latest input's size (see
    :meth:`watch`).
    """

    def __init__(self, layouts: Mapping[str, Layout], size: tuple[int, int]) -> None:
        self.layouts = dict(layouts)
        self.size = size  # the latest input's (H, W)
        self.expected: tuple[int, int] | None = None
        self.by_shape: dict[tuple[int, ...], Layout] = {}
        for name, lay in self.layouts.items():
            other = self.by_shape.setdefault(lay.shape, lay)
            if other.kind != lay.kind or other.prefix != lay.prefix:
                first = next(n for n, v in self.layouts.items() if v is other)
                raise ConfigError(f"layers {first!r} and {name!r} output the same shape "
                                  f"{lay.shape} in different layouts ({other.describe()}, "
                                  f"{lay.describe()}); set model.reshape or target them in "
                                  f"separate runs")

    def watch(self, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Track the input size of ``model``'s passes (a forward pre-hook), for token grids
        at sizes other than the probe's; returns the hook's handle."""
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
                size = (int(args[0].shape[-2]), int(args[0].shape[-1]))
                if size != self.size:
                    self.size, self.expected = size, patch_grid(model, size)
        self.expected = patch_grid(model, self.size)
        return model.register_forward_pre_hook(pre_hook)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        shape = tuple(t.shape[1:])
        lay = self.by_shape.get(shape)
        if lay is not None:
            return lay.to_map(t)
        for lay in self.layouts.values():
            if len(lay.shape) != len(shape) or lay.kind == "none":
                continue
            if lay.kind == "nchw" and shape[0] == lay.channels:
                return t
            if lay.kind == "nhwc" and shape[-1] == lay.channels:
                return lay.to_map(t)
            if lay.kind == "tokens" and shape[-1] == lay.channels:
                grid = _token_grid(shape[0] - lay.prefix, self.size, self.expected)
                if grid is not None:
                    return lay.to_map(t, grid)
        known = ", ".join(v.describe() for v in self.layouts.values())
        raise ConfigError(f"a target layer output {shape} per image, which fits none of the "
                          f"detected layouts ({known})")


def layer_reshape(model: nn.Module, layers: Mapping[str, nn.Module], size: tuple[int, int],
                  setting: str | None = None, device: torch.device | str = "cpu",
                  ) -> tuple[LayoutReshape | None, dict[str, Layout]]:
    """The reshape for a method over ``layers`` (None where every output is a map or a
    vector already: nothing to do per batch) and the detected layouts."""
    if not layers:  # input methods (saliency): nothing to probe
        return None, {}
    layouts = detect_layouts(model, layers, size, setting, device)
    if all(lay.kind in ("nchw", "none") for lay in layouts.values()):
        return None, layouts
    reshape = LayoutReshape(layouts, size)
    if any(lay.kind == "tokens" for lay in layouts.values()):
        reshape.watch(model)
    return reshape, layouts
