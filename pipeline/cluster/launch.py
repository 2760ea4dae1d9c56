"""The driver of a SLURM sweep (``hydra/launcher=slurm``), in four steps, one function each:

- :func:`plan`: the resume policy. Jobs done earlier in the sweep folder (same overrides,
  finished; shards too) are not submitted again; jobs an earlier driver submitted that SLURM
  still holds are waited for, never submitted twice; the rest are submitted.
- :func:`submit`: one SLURM array, named ``camsweep-<sweep>-<jobs>`` so that ``squeue``
  tells sweeps apart; an sbatch refusal, or no SLURM on this machine, is one line, exit 2.
- :func:`collect`: every job's end, whatever it was (done, failed, cancelled, timed out),
  recorded in ``slurm_jobs.json`` with SLURM's ids and final states and handed to Hydra as
  plain data, so the sweep ends with :class:`pipeline.callbacks.SweepReport`'s table.
- :func:`interrupted`: Ctrl-C (or a lost login) leaves the jobs to SLURM and says exactly
  what the same command will do when run again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .job import JobFailed, JobRunner
from .jobs_file import read_jobs, write_jobs
from .refusals import explain_sbatch_error, first_line, missing_slurm, refused
from .slurm import slurm_states
from .states import LIVE_STATES, OUT_OF_TIMEOUTS, OUT_OF_TIMEOUTS_REASON, TIME_LIMIT_REASON

log = logging.getLogger("camsweep")


@dataclass
class Plan:
    """What one driver does with each job of the sweep."""

    sweep_dir: Path
    jobs: dict[str, dict[str, Any]]  # slurm_jobs.json, kept up to date
    returns: dict[int, Any] = field(default_factory=dict)  # jobs settled without waiting
    waiting: list[tuple[int, list[str], Any]] = field(default_factory=list)  # (idx, o, handle)
    todo: list[tuple[int, list[str]]] = field(default_factory=list)  # to submit


def sweep_name(sweep_dir: Path) -> str:
    """``2026-11-30_12-00-00`` for ``multirun/2026-11-30/12-00-00``: the sweep in job names."""
    parts = [p for p in Path(sweep_dir).resolve().parts[-2:] if p not in ("/", "")]
    return re.sub(r"[^\w.-]+", "_", "_".join(parts)) or "sweep"


def job_name(sweep_dir: Path, numbers: Sequence[int]) -> str:
    """``camsweep-<sweep>-<job>`` (or ``-<first>-<last>`` for several) for ``squeue``."""
    nums = sorted(numbers)
    jobs = str(nums[0]) if len(nums) == 1 else f"{nums[0]}-{nums[-1]}"
    return f"camsweep-{sweep_name(sweep_dir)}-{jobs}"


def plan(launcher: Any, sweep_dir: Path, wanted: list[tuple[int, list[str]]]) -> Plan:
    import submitit
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides

    from ..jobs import already_done, job_folders

    p = Plan(sweep_dir, read_jobs(sweep_dir))
    folders = job_folders(sweep_dir)
    # A job of an earlier driver of this sweep (interrupted, or lost with its login
    # session) may still be queued or running: wait for it instead of starting a second
    # copy on the same results file.
    earlier = {i: p.jobs[str(i)]["slurm_job_id"] for i, o in wanted
               if p.jobs.get(str(i), {}).get("overrides") == o
               and p.jobs[str(i)].get("slurm_job_id")}
    alive = slurm_states(list(earlier.values())) if earlier else {}
    for idx, overrides in wanted:
        folder = folders.get(idx)
        done = already_done(folder, overrides)
        shown = " ".join(filter_overrides(overrides))
        job_id = earlier.get(idx, "")
        if done is not None:
            log.info("\t#%d : %s  (done earlier: not submitted)", idx, shown)
            p.returns[idx] = JobReturn(overrides=overrides, status=JobStatus.COMPLETED,
                                       _return_value=done, working_dir=str(folder))
            p.jobs.setdefault(str(idx), {"overrides": overrides}).update(outcome="done",
                                                                         error="")
        elif alive.get(job_id) in LIVE_STATES:
            log.info("\t#%d : %s  (still in SLURM as %s, %s: waiting for it)", idx, shown,
                     job_id, alive[job_id])
            handle = submitit.SlurmJob(folder=launcher.params["submitit_folder"], job_id=job_id)
            p.jobs[str(idx)].update(outcome="submitted", slurm_state=alive[job_id], error="")
            p.waiting.append((idx, overrides, handle))
        else:
            log.info("\t#%d : %s", idx, shown)
            p.todo.append((idx, overrides))
    return p


def submit(launcher: Any, p: Plan) -> None:
    """Submit ``p.todo`` as one SLURM array; its jobs join ``p.waiting``."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from omegaconf import OmegaConf

    if not p.todo:
        return
    params = dict(launcher.params)
    params["name"] = job_name(p.sweep_dir, [i for i, _ in p.todo])
    try:
        executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                         slurm_max_num_timeout=params["max_num_timeout"])
    except RuntimeError as e:  # submitit: 'Could not detect "srun"'
        refused(missing_slurm() or f"cannot submit to SLURM: {first_line(str(e))}", e)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{
        k if k in base else f"slurm_{k}": v for k, v in params.items()
        if k not in ("submitit_folder", "max_num_timeout")})
    # The pickled callable: the stock launcher (importable in every job) in a JobRunner.
    stock = SlurmLauncher(**launcher.params)
    stock.setup(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                config=launcher.config)
    runner = JobRunner(stock)
    args = [(o, "hydra.sweep.dir", i, f"job_id_for_{i}", Singleton.get_state())
            for i, o in p.todo]
    try:
        # submitit echoes sbatch's stderr on a refusal; the one line below says it all.
        with contextlib.redirect_stderr(io.StringIO()):
            handles = executor.map_array(runner, *zip(*args, strict=True))
    except submitit.core.utils.FailedJobError as e:
        refused(explain_sbatch_error(str(e), params), e)
    except FileNotFoundError as e:  # sbatch vanished since the executor was made
        refused(missing_slurm() or f"cannot submit to SLURM ({e.filename or e})", e)
    for (idx, overrides), handle in zip(p.todo, handles, strict=True):
        record = p.jobs.setdefault(str(idx), {})
        before = record.get("earlier_slurm_job_ids", [])
        if record.get("slurm_job_id") and record["slurm_job_id"] != handle.job_id:
            before = [*before, record["slurm_job_id"]]
        p.jobs[str(idx)] = {"overrides": overrides, "slurm_job_id": handle.job_id,
                            "earlier_slurm_job_ids": before, "slurm_state": "PENDING",
                            "outcome": "submitted", "error": "", "name": params["name"]}
        p.waiting.append((idx, overrides, handle))
    log.info("submitted %d job(s) to SLURM as %s (%s)", len(p.todo),
             handles[0].job_id.split("_")[0], params["name"])


def outcome(job: Any) -> tuple[str, Any, str, str]:
    """Wait for a submitit job: (outcome, JobReturn or None, error, SLURM state)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return "done", job.results()[0], "", ""
    except FailedJobError as e:  # the job ran and raised (JobFailed, or a crash)
        text = str(e)
        state = job.state.split()[0] if job.state else ""
        if OUT_OF_TIMEOUTS in text:  # submitit: requeued max_num_timeout times already
            return "timeout", None, OUT_OF_TIMEOUTS_REASON, state
        found = re.findall(rf"{re.escape(JobFailed.__module__)}\.JobFailed: (.+)", text)
        trace = [ln for ln in text.splitlines() if re.match(r"^\w[\w.]*(Error|Exception)", ln)]
        reason = found[-1] if found else (trace[-1] if trace else first_line(text))
        return ("timeout" if "timed-out" in reason else "failed"), None, reason, state
    except UncompletedJobError:  # ended without a result: cancelled, killed, timed out
        state = (job.state or "UNKNOWN").split()[0]
        result = {"CANCELLED": "cancelled", "TIMEOUT": "timeout",
                  "DEADLINE": "timeout"}.get(state, "failed")
        why = {"OUT_OF_MEMORY": "SLURM: out of memory (hydra.launcher.mem_gb)",
               "NODE_FAIL": "SLURM: its node failed", "TIMEOUT": TIME_LIMIT_REASON,
               }.get(state, f"SLURM: ended as {state}")
        return result, None, "" if result == "cancelled" else why, state


def collect(p: Plan) -> None:
    """Wait for every job of ``p.waiting``, recording each end as it comes."""
    from hydra.core.utils import JobReturn, JobStatus

    for idx, overrides, handle in p.waiting:
        result, ret, error, state = outcome(handle)
        p.jobs[str(idx)].update(outcome=result, error=error, slurm_state=state)
        if ret is None:  # plain data: Hydra then calls the report instead of raising
            ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED,
                            _return_value={"status": result, "error": error,
                                           "slurm_job_id": handle.job_id},
                            working_dir=str(p.sweep_dir / str(idx)))
        p.returns[idx] = ret
        write_jobs(p.sweep_dir, p.jobs)
    settle(p.sweep_dir, p.jobs, [str(i) for i, _, _ in p.waiting])


def interrupted(p: Plan) -> None:
    """Ctrl-C in the driver: the jobs go on in SLURM; say what the same command does next."""
    from ..folders import write_identity

    write_jobs(p.sweep_dir, p.jobs)
    write_identity(p.sweep_dir, ended=True)  # the same command, from any login node, adopts it
    ids = sorted({h.job_id.split("_")[0] for _, _, h in p.waiting})
    print(f"\ninterrupted: the sweep's {len(p.waiting)} job(s) go on in SLURM (scancel "
          f"{' '.join(ids)} stops them). The same command run again finds this sweep "
          f"({p.sweep_dir}), waits for the jobs still queued or running, keeps the done ones "
          f"and submits only the others; python run.py stage=status run_dir={p.sweep_dir} "
          "shows where they are", file=sys.stderr)
    raise SystemExit(130) from None


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[Any]:
    """hydra-submitit-launcher's ``launch`` for a SLURM sweep (see the module doc). Returns
    one Hydra JobReturn per job; jobs that did not finish return ``{"status": <outcome>,
    "error": ...}`` as plain data."""
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    if missing_slurm():  # before anything is written
        refused(missing_slurm())
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
    wanted = [(i, list(o)) for i, o in enumerate(job_overrides, start=initial_job_idx)]
    p = plan(launcher, sweep_dir, wanted)
    try:
        submit(launcher, p)
        p.waiting.sort(key=lambda item: item[0])
        write_jobs(sweep_dir, p.jobs)
        if p.waiting:
            log.info("watch the sweep: python run.py stage=status run_dir=%s", sweep_dir)
        collect(p)
    except KeyboardInterrupt:
        interrupted(p)
    return [p.returns[i] for i in sorted(p.returns)]


def settle(sweep_dir: Path, jobs: dict[str, dict[str, Any]], names: list[str],
           timeout: float = 30) -> None:
    """Record SLURM's final state of each job. A job's result arrives before its process
    has exited and before SLURM has recorded the end, so ask (one query for all) until every
    state is final, for at most ``timeout`` seconds: a state not final by then is left as
    SLURM last gave it."""
    deadline = time.monotonic() + timeout
    while True:
        ids = {jobs[n]["slurm_job_id"]: n for n in names
               if jobs[n].get("slurm_state", "") in ("", *LIVE_STATES)}
        if not ids:
            break
        for job_id, state in slurm_states(list(ids)).items():
            jobs[ids[job_id]]["slurm_state"] = state
        if time.monotonic() > deadline or not any(
                jobs[n]["slurm_state"] in ("", *LIVE_STATES) for n in ids.values()):
            break
        time.sleep(1)  # sacct polling interval, as submitit's own watcher does
    write_jobs(sweep_dir, jobs)
