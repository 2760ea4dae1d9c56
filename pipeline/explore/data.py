"""The explorer's one table: :func:`pipeline.table.run_table` of a run, or
:func:`pipeline.table.sweep_table` of a sweep (every job, with ``job`` and the swept keys),
metrics and map statistics included. A ``target=topk`` run has a row per explained class;
the explorer shows the first (``rank`` 0). No torch."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..results import load_run, load_sweep
from ..table import run_table, sweep_table


def image_table(source: Path, sweep: bool, metrics: bool = True) -> pd.DataFrame:
    """The table of a run folder (``sweep=False``) or of a multirun folder. Raises
    StoreError for a damaged file or stale metrics (the caller may then ask again with
    ``metrics=False``)."""
    if sweep:
        frame = sweep_table(load_sweep(source, slurm=False), metrics=metrics, stats=True)
    else:
        with load_run(source) as run:
            frame = run_table(run, metrics=metrics, stats=True)
    if "rank" in frame.columns:
        frame = frame[frame["rank"] <= 0].drop(columns="rank")
    return frame.reset_index(drop=True)
