"""Errors a user can cause. ``run.py`` prints them as one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CamsweepError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ConfigError(CamsweepError):
    """A config value that does not exist or does not fit (model, layer, device, ...)."""


class DataError(CamsweepError):
    """Input data that cannot be used (empty glob, missing root, no image decodes)."""


class StoreError(CamsweepError):
    """A results file that cannot be read or must not be written."""


def unknown(
    kind: str, value: object, valid: Iterable[str], show: int = 12, keep_order: bool = False
) -> str:
    """One line naming a bad value, its closest valid spellings and some valid values."""
    valid = list(dict.fromkeys(valid)) if keep_order else sorted(set(valid))
    close = difflib.get_close_matches(str(value), valid, n=3, cutoff=0.5)
    msg = f"unknown {kind} {str(value)!r}"
    if close:
        msg += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    listed = ", ".join(valid[:show]) + (f", ... ({len(valid)} in all)" if len(valid) > show else "")
    return msg + f" valid: {listed}"


class RunRefused(StoreError):
    """A run that must not start (another config or writer, a changed image list): nothing
    was touched, so the run's own status is not rewritten either."""


def printable(text: object) -> str:
    """``text`` for one log line: control characters (a newline in a file name) escaped, so
    a name cannot forge lines of its own."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
