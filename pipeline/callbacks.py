"""Hydra callbacks: a report at the end of a multirun."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("camsweep")


class SweepReport(Callback):
    """After all jobs of a sweep: one line per job that did not finish, and a non-zero exit
    status when any failed (jobs run on, so one bad layer name does not stop a sweep)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .errors import StoreError
        from .results import load_sweep

        try:
            sweep = load_sweep(config.hydra.sweep.dir)
        except StoreError as e:
            log.warning("no sweep report: %s", e)
            return
        bad = sweep.failed
        log.info("sweep %s: %d jobs, %d done, %d not done", sweep.root, len(sweep),
                 len(sweep) - len(bad), len(bad))
        for _, row in bad.iterrows():
            log.error("job %s %s: %s", row["job"], row["state"], row["error"] or row["run_dir"])
        if len(bad):
            raise SystemExit(1)
