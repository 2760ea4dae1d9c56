"""The report stage: one self-contained HTML page for a run or for a whole sweep.

``python run.py stage=report run_dir=DIR`` writes ``DIR/report/index.html`` with its pictures
and plots beside it (``DIR/report/img``, ``DIR/report/plots``). Links are relative, nothing
is fetched from the network and there is no JavaScript framework: the page opens from a
laptop, a cluster's file browser or an archive the same way. No torch is imported.

- A run (``DIR/results.h5``): :mod:`.run_page`.
- A sweep (a Hydra multirun folder): :mod:`.sweep_page`.

Where things are: :mod:`.page` (jinja2 environment, figures, table data), :mod:`.plots`
(matplotlib SVGs), ``templates/`` (HTML, CSS and the page's few lines of JavaScript; HTML
autoescaped). Files are read through :func:`pipeline.store.open_results` and
:func:`pipeline.metrics.file.read_metrics`: a damaged results file, or metrics of an
earlier results file, stop the report with one line.

The page is rebuilt from scratch in a temporary folder and swapped in at the end, so an
interrupted report never leaves a half-written page behind.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .run_page import RunPage
from .sweep_page import REPORT, SweepPage

__all__ = ["REPORT", "report"]


def report(run_dir: str | Path, cfg: Any = None) -> Path:
    """Write the report of a run or a sweep folder; returns the path of ``index.html``.

    Args:
        run_dir: A run folder (with ``results.h5``) or a multirun folder (``<n>/.hydra``).
        cfg: The invocation's config (uses ``report.max_images`` and ``render.*``); None for
            the defaults.

    Raises:
        StoreError: Neither a run nor a sweep; a damaged results file; stale metrics.
    """
    run_dir = Path(run_dir)
    if (run_dir / "results.h5").is_file():
        return _write(run_dir, lambda out: RunPage(run_dir, out, cfg).build())
    if run_dir.is_dir() and any((d / ".hydra").is_dir() for d in run_dir.iterdir()
                                if d.is_dir() and d.name != ".hydra"):
        return _write(run_dir, lambda out: SweepPage(run_dir, out).build())
    raise StoreError(f"{run_dir} is neither a run (no results.h5) nor a sweep folder "
                     "(no <job>/.hydra); give run_dir=<run or multirun folder>")


def _write(run_dir: Path, build: Callable[[Path], str]) -> Path:
    """Build the page in a fresh temporary folder, then swap it in place of the old one."""
    final = run_dir / REPORT
    tmp = run_dir / f".{REPORT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img").mkdir(parents=True)
    (tmp / "plots").mkdir()
    try:
        page = build(tmp)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        old = run_dir / f".{REPORT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "index.html"
