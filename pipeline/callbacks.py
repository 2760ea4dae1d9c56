"""Hydra callbacks: the sweep's record of its driver, and the table that ends every multirun."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("camsweep")


class SweepReport(Callback):
    """At the start of a sweep: its driver (pid, host) in the sweep's identity record, so
    that the table knows jobs not started yet are queued, not missing, and the same command
    knows whether the sweep is still being driven. After all jobs: a table of every job
    (the swept keys, its state, images done, SLURM's record, why it did not finish) and,
    when some did not finish, how to continue them; then exit status 1. Jobs run on when
    one fails, so one bad layer name does not stop a sweep. On SLURM the launcher
    (pipeline.cluster) hands every job's outcome here, cancelled and timed-out jobs
    included, instead of raising.

    The tasks of a multi-task srun step each drive the same sweep, one shard of every job
    each: a task that ends while its siblings still work leaves the table to the last one."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf

        from .folders import write_identity
        from .sweep import expected_jobs

        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # The job list as Hydra's own sweeper expands it (globs over config groups with
        # Hydra's config loader): the table lists jobs not started yet from it.
        hydra = GlobalHydra.instance()
        loader = hydra.config_loader() if hydra.is_initialized() else None
        jobs, swept = expected_jobs(OmegaConf.to_container(config.hydra, resolve=False),
                                    loader)
        write_identity(sweep_dir, kind="sweep", pid=os.getpid(), host=socket.gethostname(),
                       started=time.time(), ended=False, finished=False,
                       **({"jobs": jobs, "swept": swept} if jobs else {}))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .errors import StoreError
        from .folders import srun_step, write_identity
        from .sweep import load_sweep

        sweep_dir = Path(str(config.hydra.sweep.dir))
        write_identity(sweep_dir, ended=True)  # nothing more starts: unstarted jobs are missing
        try:
            # The launcher recorded every job's end: no need to ask SLURM again.
            sweep = load_sweep(sweep_dir, slurm=False)
        except StoreError as e:
            log.warning("no sweep report: %s", e)
            return
        if srun_step() and sweep.table["state"].isin(("running", "incomplete")).any():
            log.info("this task's shards are done; the last task of the srun step to finish "
                     "prints the sweep's table")
            return
        write_identity(sweep_dir, finished=not len(sweep.failed))
        # One block on stdout, after Hydra's log lines: a table reads badly with a log
        # prefix on every line.
        sys.stdout.flush()
        print("\n".join(sweep.report()), flush=True)
        if len(sweep.failed):
            raise SystemExit(1)
