"""Moved to :mod:`pipeline.store.metrics` (the store package owns both file formats); this
name stays for importers not yet updated (the report) and can go once none is left."""

from ..store.metrics import *  # noqa: F403
from ..store.metrics import __all__  # noqa: F401
