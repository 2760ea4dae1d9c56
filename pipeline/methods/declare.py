"""What a method is, without its torch code: its config name, its options, the kind of maps
it stores and whether it reads target layers.

A declaration (:class:`MethodSpec`) is all the config needs (the Hydra schema, the checks of
option values, the list of choices) and all that read-only stages need, so this module and
``catalog.py`` (the shipped methods' declarations) import no torch: ``python run.py
stage=report`` composes and checks its config without loading torch. The implementation, a
:class:`~pipeline.methods.base.Method` subclass in ``pipeline/methods/<name>.py``, is imported
only when a method runs (``pipeline.methods.method_class``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass

from ..errors import ConfigError, unknown
from ..options import Options, option  # noqa: F401  (option: part of this API)

# What is explained of the target class t (``target.score``): every method backpropagates
# (or, gradient-free, compares) this one function of the logits z, and stores its value.
SCORES = ("logit", "prob", "logprob", "sigmoid")
# What the stored maps are, for readers and pictures: "cam" (N, h, w) per layer at the
# layer's resolution, "input" (N, H, W) at the input's, or "activations". The results file
# keys each dataset's dimension names and ``kind`` attribute by it.
KINDS = ("cam", "input", "activations")
_NAME = re.compile(r"[a-z][a-z0-9_]*")  # an HDF5 group, a Hydra schema and a config value


@dataclass
class MethodOptions(Options):
    """A method's options: every key of its ``method`` config group except ``name``.

    Subclasses are dataclasses whose fields (with types, defaults and, through
    :func:`option`, the values allowed) are the single declaration of a method's options:
    the Hydra schema is built from them, ``validate`` checks configs with :meth:`check`,
    and the method receives them as ``self.options``. Options that constrain each other
    add their rule by overriding :meth:`check`.
    """

    GROUP = "method"


@dataclass
class CAMWeightOptions(MethodOptions):
    """The option of the CAMs that have per-channel weights."""

    save_weights: bool = True  # also store the channel weights under /<method>_weights


@dataclass
class AttributionOptions(MethodOptions):
    """The option of the methods with a signed (N, C, H, W) attribution to the input."""

    save_attribution: bool = False  # also store it under /<method>_attribution


@dataclass(frozen=True)
class MethodSpec:
    """One method's declaration: everything about it but its torch code."""

    name: str  # the config name: ``method=<name>``, the HDF5 group of its maps
    Options: type[MethodOptions] = MethodOptions  # its config keys besides ``name``
    kind: str = "cam"  # one of KINDS
    uses_layers: bool = True  # False: works on the input, model.target_layers unused
    module: str = ""  # the module whose @register class implements it


SPECS: dict[str, MethodSpec] = {}  # config name -> declaration, in the order declared
_listeners: list[Callable[[MethodSpec], None]] = []


def declare(
    name: str,
    Options: type[MethodOptions] = MethodOptions,  # noqa: N803 (the attribute's name)
    *,
    kind: str = "cam",
    uses_layers: bool = True,
    module: str | None = None,
) -> MethodSpec:
    """Declare method ``name``, implemented in ``module`` (default
    ``pipeline.methods.<name>``), and tell every listener (``pipeline.config`` stores its
    Hydra schema). Raises TypeError for a declaration that cannot work, before anything
    is recorded."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TypeError(f"a method's name must be a lower-case identifier, got {name!r}")
    if name in SPECS:
        raise TypeError(f"method {name!r} is registered already ({SPECS[name].module})")
    if kind not in KINDS:
        raise TypeError(f"method {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if not (is_dataclass(Options) and isinstance(Options, type)
            and issubclass(Options, MethodOptions)):
        raise TypeError(f"method {name!r}: Options must be a MethodOptions dataclass")
    if any(f.name == "name" for f in fields(Options)):
        raise TypeError(f"{Options.__name__} may not declare 'name' (the config's method name)")
    spec = MethodSpec(name, Options, kind, uses_layers, module or f"{__package__}.{name}")
    SPECS[name] = spec
    for listener in _listeners:
        listener(spec)
    return spec


def on_declare(listener: Callable[[MethodSpec], None]) -> None:
    """Call ``listener`` with every declared method, now and when one is declared."""
    if listener in _listeners:
        return
    _listeners.append(listener)
    for spec in list(SPECS.values()):
        listener(spec)


def method_spec(name: str) -> MethodSpec:
    """The declaration of method ``name``, or a one-line :class:`ConfigError`."""
    if name not in SPECS:
        raise ConfigError(unknown("method", name, SPECS))
    return SPECS[name]
