"""Sweeps on SLURM as clusters really behave: preemption, time limits, cancellation, refusals,
and the same command continuing its sweep.

The camsweep SLURM launcher (``hydra/launcher=slurm``, class
``hydra_plugins.camsweep_launcher.CamsweepSlurmLauncher``) is hydra-submitit-launcher's with
the sweep's two ends replaced by :func:`launch` (:mod:`.launch`: resume policy, submission,
collection, Ctrl-C). Inside each job :class:`JobRunner` (:mod:`.job`) runs the Hydra job,
turns a failed job into a failed process (SLURM records FAILED) and routes every preemption
signal to submitit's requeue. :mod:`.slurm` asks squeue/sacct/sinfo, :mod:`.refusals` turns
submission errors into one line, :mod:`.jobs_file` keeps ``slurm_jobs.json``, and
:mod:`.states` is the one home of SLURM state names and of the files a sweep leaves.
"""

from __future__ import annotations

from .job import JobFailed, JobRunner, job_failure, preempt_signals
from .jobs_file import read_jobs, write_jobs
from .launch import launch
from .refusals import explain_sbatch_error, first_line
from .slurm import _expand_job_ids, expand_job_ids, requeue_counts, slurm_states
from .states import JOBS_FILE, LIVE_STATES, STATUS_FILE

__all__ = ["JOBS_FILE", "LIVE_STATES", "STATUS_FILE", "JobFailed", "JobRunner",
           "_expand_job_ids", "expand_job_ids", "explain_sbatch_error", "first_line",
           "job_failure", "launch", "preempt_signals", "read_jobs", "requeue_counts",
           "slurm_states", "write_jobs"]
