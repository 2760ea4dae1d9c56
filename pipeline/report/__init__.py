"""The report stage: one self-contained HTML page for a run or for a whole sweep.

``python run.py stage=report run_dir=DIR`` writes ``DIR/report/index.html`` with its pictures
and plots beside it (``DIR/report/img``, ``DIR/report/plots``). Links are relative, nothing
is fetched from the network and there is no JavaScript framework: the page opens from a
laptop, a cluster's file browser or an archive the same way. No torch is imported.

- A run (``DIR/results.h5``): :mod:`.run_page`.
- A sweep (a Hydra multirun folder): :mod:`.sweep_page`.

Where things are: :mod:`.page` (jinja2 environment, figures, table data), :mod:`.plots`
(matplotlib SVGs), :mod:`.gallery` (which images a run's page shows), :mod:`.metrics_view`
(missing metric datasets, the per-image values ranked by), ``templates/`` (HTML, CSS and
the page's few lines of JavaScript; HTML autoescaped). Files are read through
:func:`pipeline.store.open_results` and :func:`pipeline.store.metrics.read_metrics`: a
damaged results file, or metrics of an earlier results file, stop the report with one line.

The page is rebuilt from scratch in a private temporary folder and swapped in at the end
(:func:`pipeline.store.atomic.atomic_output`), so an interrupted report never leaves a
half-written page behind. One report of a folder is written at a time: a second one waits
for the first (it says so in one line), then writes its own.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..locks import run_dir_lock
from ..store.atomic import atomic_output, remove_temporaries
from .run_page import RunPage
from .sweep_page import REPORT, SweepPage

__all__ = ["REPORT", "report", "report_lock"]

log = logging.getLogger(__name__)


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


@contextmanager
def report_lock(run_dir: Path) -> Iterator[None]:
    """The one place the report takes its lock: the run directory's (one writer per
    run_dir, :func:`pipeline.locks.run_dir_lock`). A report being written makes a second one
    wait, saying so in one line; any other writer (extract, merge, evaluate) refuses it at
    once."""
    with run_dir_lock(run_dir, "writing the report", wait_for="writing the report"):
        yield


def _write(run_dir: Path, build: Callable[[Path], str]) -> Path:
    """Build the page in a private temporary folder, then swap it in place of the old one."""
    final = run_dir / REPORT
    with report_lock(run_dir):
        # Left by a report that was killed (no other is running: we hold the lock).
        remove_temporaries(final)
        remove_temporaries(final, "old")
        for legacy in (f".{REPORT}.tmp", f".{REPORT}.old"):  # camsweep before atomic_output
            shutil.rmtree(run_dir / legacy, ignore_errors=True)
        with atomic_output(final, directory=True) as tmp:
            (tmp / "img").mkdir()
            (tmp / "plots").mkdir()
            page = build(tmp)
            (tmp / "index.html").write_text(page, encoding="utf-8")
    return final / "index.html"
