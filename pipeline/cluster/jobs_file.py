"""``slurm_jobs.json``: the SLURM launcher's record of a sweep's jobs (overrides, SLURM ids,
states, outcomes), written by the driver alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..store.atomic import write_text_atomic
from .states import JOBS_FILE

FORMAT = {"format": "camsweep-slurm-jobs", "version": 1}


def read_jobs(sweep_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``slurm_jobs.json`` of a sweep: job number (str) -> record; empty when absent."""
    path = Path(sweep_dir) / JOBS_FILE
    try:
        return dict(json.loads(path.read_text()).get("jobs", {}))
    except (OSError, ValueError):
        return {}


def write_jobs(sweep_dir: Path, jobs: dict[str, dict[str, Any]]) -> None:
    """Replace the jobs file atomically: a notebook may read it while the sweep runs."""
    ordered = dict(sorted(jobs.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0))
    write_text_atomic(Path(sweep_dir) / JOBS_FILE,
                      json.dumps({**FORMAT, "jobs": ordered}, indent=1))
