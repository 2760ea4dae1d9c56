"""The sanity check: cascading model-parameter randomization (Adebayo et al., 2018). Layers
are re-initialized from the logits down, the map is recomputed after each step and compared
with the stored one by Spearman rank correlation."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from .batch import Evaluation, MetricBatch


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks (1-based) of (N, P) values, ties given their average rank (as
    ``scipy.stats.rankdata``), batched without Python loops."""
    n, p = values.shape
    s, order = values.sort(dim=1, stable=True)
    pos = torch.arange(p, device=values.device).expand(n, p)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.cummax(torch.where(starts, pos, 0), dim=1).values
    last = torch.where(ends, pos, p).flip(1).cummin(dim=1).values.flip(1)
    avg = (first + last).double() / 2 + 1
    ranks = torch.empty_like(avg)
    ranks.scatter_(1, order, avg)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of two (N, ...) batches; NaN where either is
    constant (no order to compare)."""
    ra = rankdata(torch.nan_to_num(a.flatten(1).float()))
    rb = rankdata(torch.nan_to_num(b.flatten(1).float()))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / den.clamp_min(1e-300)
    return torch.where(den > 0, rho, torch.full_like(rho, math.nan)).float()


def randomization_units(model: nn.Module, example: torch.Tensor,
                        names: Sequence[str] | None = None,
                        depth: int = 2) -> dict[str, nn.Module]:
    """The modules cascading randomization re-initializes, top (logits) first.

    With ``names`` (``evaluate.sanity_layers``; patterns as ``model.target_layers``) they are
    used in the order given. Otherwise: every module with parameters that is a leaf or sits
    at ``depth`` (``layer4.1`` is depth 2), ordered by when a forward pass first calls it,
    reversed, so that the last layer to run (the classifier) is randomized first.
    """
    from ..models import resolve_layers

    if names:
        units = resolve_layers(model, list(names))
        empty = [n for n, m in units.items() if next(m.parameters(), None) is None]
        if empty:
            raise ConfigError(f"evaluate.sanity_layers {empty} have no parameters to randomize")
        return units
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        d = name.count(".") + 1
        if not name or d > depth or next(module.parameters(), None) is None:
            continue
        if d == depth or next(module.children(), None) is None:
            found[name] = module
    order: dict[str, int] = {}

    def seen(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object) -> None:  # returns None: input unchanged
            order.setdefault(name, len(order))

        return hook

    handles = [m.register_forward_pre_hook(seen(name)) for name, m in found.items()]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    called = sorted((n for n in found if n in order), key=order.__getitem__, reverse=True)
    return {n: found[n] for n in called}


def _reinitialized(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialized copy's state (CPU): ``reset_parameters`` of every submodule that
    has one (PyTorch's default initializations; batch norms back to identity statistics), and
    parameters no such method covers re-drawn from a normal of their own mean and std."""
    clone = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        covered: set[int] = set()
        for m in clone.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in m.parameters(recurse=False))
        for p in clone.parameters():
            if id(p) not in covered:
                values = p.detach().float()
                std = float(values.std()) if values.numel() > 1 else 0.0
                p.normal_(float(values.mean()), std if std > 0 else 0.02)
    return {k: v.detach().clone() for k, v in clone.state_dict().items()}


class CascadingRandomization:
    """Holds the original and a re-initialized state of each unit, so every batch sees the
    same randomized networks: :meth:`randomize` unit i after units 0..i-1 (cascading), and
    :meth:`restore` puts the original weights back (in place: hooks stay valid)."""

    def __init__(self, units: dict[str, nn.Module], seed: int) -> None:
        self.units = units
        self.original = {n: {k: v.detach().clone() for k, v in m.state_dict().items()}
                         for n, m in units.items()}
        self.random = {}
        for i, (n, m) in enumerate(units.items()):
            device = next(m.parameters()).device
            self.random[n] = {k: v.to(device) for k, v in _reinitialized(m, seed + i).items()}

    @staticmethod
    def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, tensor in module.state_dict(keep_vars=True).items():
                tensor.data.copy_(state[key])

    def randomize(self, name: str) -> None:
        self._load(self.units[name], self.random[name])

    def restore(self) -> None:
        for name, module in self.units.items():
            self._load(module, self.original[name])


def prepare(ctx: Evaluation) -> str | None:
    """Choose the units to randomize (top first) and rebuild the stored method."""
    ev = ctx.ev
    units = randomization_units(ctx.model, ctx.example, ev.sanity_layers, ev.sanity_depth)
    if ev.sanity_max_steps is not None:
        units = dict(list(units.items())[: max(0, int(ev.sanity_max_steps))])
    ctx.settings["sanity_units"] = list(units)
    if not units:
        return "sanity check skipped: no layer with parameters to randomize"
    ctx.state["sanity"] = (units, CascadingRandomization(units, int(ev.seed)), ctx.build_method())
    return None


def sanity(ctx: Evaluation, b: MetricBatch) -> dict[str, torch.Tensor]:
    """The ``sanity`` metric: Spearman rho of each stored map with the map recomputed after
    each cascading randomization step."""
    units, randomizer, method = ctx.state["sanity"]
    rho = {key: torch.empty(len(b.x), len(units), device=b.x.device) for key in b.maps}
    try:
        with method:
            for j, name in enumerate(units):
                randomizer.randomize(name)  # cascading: earlier units stay random
                maps = method(b.x, lambda _logits: b.target)
                for key, original in b.maps.items():
                    rho[key][:, j] = spearman(original, maps[key])
    finally:
        randomizer.restore()
    return {f"{key}/sanity_spearman": value for key, value in rho.items()}
