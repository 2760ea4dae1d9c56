"""Inside a SLURM job: the callable submitit pickles for each sweep job, and the signals that
stop a job for a requeue.

SLURM and submitit stop a job with several signals: SIGTERM (``scancel``, ``scontrol
requeue``, preemption), SIGUSR2 (submitit's ``--signal``, before the time limit), SIGUSR1
(clusters that set ``--signal=USR1``, or ``SUBMITIT_PREEMPT_SIGNAL=USR1``) and whatever
``SUBMITIT_PREEMPT_SIGNAL`` names. :data:`PREEMPT_SIGNALS` lists them: loader workers ignore
them all (:func:`pipeline.runtime.worker_init`), and in the job's main process every one of
them but SIGTERM goes to submitit's checkpoint-and-requeue handler, so the job stops cleanly
(the results writer flushes as the job exits) and is requeued, or, out of
``max_num_timeout``, ends as a time-out. SIGTERM stays submitit's: logged, then SLURM
requeues or cancels the job itself.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from .refusals import first_line

PREEMPT_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's setting: the signal that requeues


def preempt_signals() -> tuple[signal.Signals, ...]:
    """Every signal SLURM or submitit may send to stop a job for a requeue, here and now."""
    sigs = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    named = os.environ.get(PREEMPT_ENV, "").upper().removeprefix("SIG")
    extra = getattr(signal, f"SIG{named}", None) if named else None
    if isinstance(extra, signal.Signals) and extra not in sigs and extra != signal.SIGKILL:
        sigs.append(extra)
    return tuple(sigs)


def route_preempt_signals() -> None:
    """In a submitit job: the requeue signals submitit does not listen to (SIGUSR1 when its
    signal is SIGUSR2, and the other way round) go to the same handler as its own one, so
    none of them kills the job with the loader workers' or the writer's work half done."""
    from submitit.core.job_environment import JobEnvironment

    own = JobEnvironment._usr_sig()
    handler = signal.getsignal(own)
    if not callable(handler):  # not in a submitit job: nothing to route
        return
    for sig in preempt_signals():
        if sig not in (own, signal.SIGTERM):
            signal.signal(sig, handler)


class JobFailed(Exception):
    """Raised in a SLURM job whose Hydra job failed, so that the job's process exits non-zero
    (SLURM records FAILED) and the driver gets the reason; one line."""


class JobRunner:
    """The callable submitit pickles for each job: the stock launcher's job, plus a failed
    process for a failed job. ``checkpoint`` makes the job requeueable on a preemption or
    time-limit signal."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher  # a stock hydra_submitit_launcher SlurmLauncher, set up

    def __call__(self, *args: Any) -> Any:
        route_preempt_signals()
        ret = self.launcher(*args)  # hydra.core.utils.JobReturn
        reason = job_failure(ret)
        if reason:
            raise JobFailed(reason)
        return ret

    def checkpoint(self, *args: Any) -> Any:
        """submitit calls this on its signal: the same job again; it resumes from its file."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


def job_failure(ret: Any) -> str:
    """Why a Hydra JobReturn failed, in one line ("" when it did not)."""
    from hydra.core.utils import JobStatus

    if ret.status == JobStatus.FAILED:  # the task raised (not one of our one-line errors)
        e = ret._return_value
        return first_line(f"{type(e).__name__}: {e}")
    value = ret._return_value
    if isinstance(value, dict) and value.get("status") == "failed":  # cli.main's user errors
        return first_line(str(value.get("error") or "failed"))
    return ""
