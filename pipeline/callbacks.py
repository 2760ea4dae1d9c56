"""Hydra callbacks: the table that ends every multirun."""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("camsweep")


class SweepReport(Callback):
    """After all jobs of a sweep: a table of every job (the swept keys, its state, images
    done, SLURM's record, why it did not finish) and, when some did not finish, the command
    that continues them; then exit status 1. Jobs run on when one fails, so one bad layer
    name does not stop a sweep. On SLURM the launcher (pipeline.cluster) hands every job's
    outcome here, cancelled and timed-out jobs included, instead of raising."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .errors import StoreError
        from .results import load_sweep

        try:
            # The launcher recorded every job's end: no need to ask SLURM again.
            sweep = load_sweep(config.hydra.sweep.dir, slurm=False)
        except StoreError as e:
            log.warning("no sweep report: %s", e)
            return
        # One block on stdout, after Hydra's log lines: a table reads badly with a log
        # prefix on every line.
        sys.stdout.flush()
        print("\n".join(sweep.report()), flush=True)
        if len(sweep.failed):
            raise SystemExit(1)
