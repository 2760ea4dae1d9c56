"""The peer libraries (pytorch-grad-cam, Captum) for the tests that compare with them.

Each such test imports its peer itself through :func:`require`, so a missing peer hides
only the tests that need it. Under CI (``CI`` set, as ``.ci/run`` does after installing
the dev extras) a missing peer is a failure, not a skip: there it means a broken install.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    """Import ``module`` for the calling test: skip the test where it is missing, raise
    ``ImportError`` (the test fails) where ``CI`` is set."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)
