"""Declared options of a plug-in (a method, a metric): one dataclass whose fields, with their
types, defaults and allowed values, are the single declaration the Hydra schema is built
from and configs are checked against. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .errors import ConfigError, unknown


def option(default: Any, *, choices: tuple[Any, ...] | None = None,
           at_least: float | None = None, above: float | None = None) -> Any:
    """A field of an :class:`Options` dataclass with the values it accepts.

    Args:
        default: The value when the config (or the caller) gives none (a list is copied per
            instance).
        choices: The only values allowed (an enumerated option).
        at_least: The smallest value allowed (``>=``).
        above: A bound the value must exceed (``>``).

    Returns:
        A ``dataclasses.field``; :meth:`Options.check` enforces the bounds.
    """
    meta = {"choices": choices, "at_least": at_least, "above": above}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Options:
    """Base of declared options; ``GROUP`` is the config group the keys live in (``method``,
    ``evaluate``), named in the errors."""

    GROUP: ClassVar[str] = ""

    def check(self) -> None:
        """Raise :class:`ConfigError` (one line, naming ``<group>.<option>``) for the first
        value the declaration does not allow."""
        for f in fields(self):
            value, key = getattr(self, f.name), f"{self.GROUP}.{f.name}"
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(unknown(key, value, choices))
            if value is None or isinstance(value, (str, list, tuple)):
                continue
            low = f.metadata.get("at_least")
            if low is not None and value < low:
                raise ConfigError(f"{key} must be >= {low:g}, got {value}")
            bound = f.metadata.get("above")
            if bound is not None and value <= bound:
                raise ConfigError(f"{key} must be > {bound:g}, got {value}")
