"""camsweep's SLURM launcher (``hydra/launcher=slurm``): Hydra instantiates launchers only
from the ``hydra_plugins`` namespace, so the class lives here; what it does is in
:mod:`pipeline.cluster`. Jobs never unpickle this class (they run
:class:`pipeline.cluster.JobRunner`), so it is needed only where sweeps are started."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # the optional [slurm] extra is not installed: no launcher to offer
    SlurmLauncher = None

if SlurmLauncher is not None:

    class CamsweepSlurmLauncher(SlurmLauncher):
        """hydra-submitit-launcher's SLURM launcher; submission and the sweep's end by
        :func:`pipeline.cluster.launch` (jobs done earlier skipped, sbatch refusals in one
        line, every job's outcome collected for the sweep report)."""

        def launch(self, job_overrides: Sequence[Sequence[str]],
                   initial_job_idx: int) -> Sequence[Any]:
            from pipeline.cluster import launch

            return launch(self, job_overrides, initial_job_idx)
