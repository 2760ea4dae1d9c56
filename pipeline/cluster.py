"""Sweeps on SLURM as clusters really behave: preemption, time limits, cancellation, refusals.

The camsweep SLURM launcher (``hydra/launcher=slurm``, class
``hydra_plugins.camsweep_launcher.CamsweepSlurmLauncher``) is hydra-submitit-launcher's with
the sweep's two ends replaced by :func:`launch`:

- **Submission**: jobs already done in the sweep folder (same overrides, finished) are not
  submitted again, so rerunning a sweep with ``hydra.sweep.dir=<old>`` continues exactly the
  unfinished jobs. An sbatch refusal (no GPUs on the partition, too much memory, ...) becomes
  one line naming the launcher key to change, exit 2.
- **The end**: every job's outcome is collected, whatever it was (done, failed, cancelled,
  timed out), written to ``<sweep>/slurm_jobs.json`` with SLURM's ids and states, and handed
  to Hydra as plain data, so the sweep ends with :class:`pipeline.callbacks.SweepReport`'s
  table and exit status 1 when a job did not finish, never with a traceback.

Inside the job, :class:`JobRunner` runs the Hydra job through the stock launcher (the
pickled callable must be importable in the job: this module is part of the installed
package) and turns a failed job into a failed process, so SLURM's own records say FAILED.
Signals are left to submitit's handler, which this module relies on: SIGUSR2 (sent
``signal_delay_s`` before the time limit) checkpoints :class:`JobRunner` (same arguments),
requeues the job with ``scontrol requeue`` and exits, up to ``max_num_timeout`` times;
SIGTERM (scancel, requeue, preemption) is logged and ignored until SLURM's SIGKILL. Loader
workers ignore both (:func:`pipeline.runtime.worker_init`). The results file is safe to
stop at any moment, and the requeued job resumes with the images not yet done.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("camsweep")

JOBS_FILE = "slurm_jobs.json"  # in the sweep folder: SLURM ids, states and outcomes per job
STATUS_FILE = "camsweep.json"  # per job, written by pipeline.cli (status "ok" when it finished)
# SLURM states of jobs not finished yet (sacct/squeue spellings).
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING",
               "CONFIGURING", "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED")


class JobFailed(Exception):
    """Raised in a SLURM job whose Hydra job failed, so that the job's process exits non-zero
    (SLURM records FAILED) and the driver gets the reason; one line."""


# -- inside the job --------------------------------------------------------------------------

class JobRunner:
    """The callable submitit pickles for each job: the stock launcher's job, plus a failed
    process for a failed job. ``checkpoint`` makes the job requeueable on SIGUSR2."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher  # a stock hydra_submitit_launcher SlurmLauncher, set up

    def __call__(self, *args: Any) -> Any:
        ret = self.launcher(*args)  # hydra.core.utils.JobReturn
        reason = job_failure(ret)
        if reason:
            raise JobFailed(reason)
        return ret

    def checkpoint(self, *args: Any) -> Any:
        """submitit calls this on SIGUSR2: the same job again; it resumes from its file."""
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


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


# -- sbatch refusals -------------------------------------------------------------------------

# sbatch's reason (regex) -> launcher keys that ask for it, and what to do about it.
_REFUSALS: list[tuple[str, tuple[str, ...], str]] = [
    (r"generic resource|gres", ("gpus_per_node", "gpus_per_task", "gres", "cpus_per_gpu"),
     "the partition has no such GPUs: use {fix_null} (or hydra/launcher=slurm_cpu), or a GPU "
     "partition with hydra.launcher.partition=NAME"),
    (r"[Mm]emory", ("mem_gb", "mem_per_cpu", "mem_per_gpu"),
     "ask for less memory: {fix_less} ({fix_null} takes the cluster's default)"),
    (r"processors|CPU count", ("cpus_per_task", "tasks_per_node", "nodes"),
     "ask for fewer CPUs: {fix_less}"),
    (r"node configuration is not available", ("mem_gb", "cpus_per_task", "constraint"),
     "no node has what is asked for: {fix_less}"),
    (r"[Pp]artition", ("partition",), "use one of the cluster's partitions: "
     "hydra.launcher.partition=NAME (null: the default partition)"),
    (r"[Aa]ccount", ("account",), "use an account you belong to: hydra.launcher.account=NAME"),
    (r"[Qq]os|QOS", ("qos",), "use a QOS you may use: hydra.launcher.qos=NAME"),
    (r"time limit", ("timeout_min",), "ask for a shorter time: {fix_less}"),
    (r"feature", ("constraint",), "use a feature the nodes have: {fix_null} or another"),
]


def _partitions() -> str:
    """The cluster's partitions as sinfo sees them, for error messages ("" if unknown)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    parts = []
    for line in dict.fromkeys(out.split()):
        name, cpus, mem, gres = (line.split("|") + ["", "", "", ""])[:4]
        gpus = "no GPUs" if gres in ("(null)", "") else gres
        parts.append(f"{name} ({cpus} CPUs, {mem} MB, {gpus})")
    return "; ".join(parts)


def explain_sbatch_error(message: str, params: dict[str, Any]) -> str:
    """One line for an sbatch refusal: sbatch's reason, the launcher key that asked for it
    and what to set instead (``params``: the launcher's settings, e.g. gpus_per_node=1)."""
    errors = [m.group(1).strip() for m in re.finditer(r"error:\s*(.+)", message)]
    reason = next((e.split("failed:", 1)[1].strip() for e in errors if "failed:" in e),
                  errors[0] if errors else first_line(message) or "sbatch failed")
    text = " ".join(errors) or message
    for pattern, keys, advice in _REFUSALS:
        if not re.search(pattern, text):
            continue
        asked = [k for k in keys if params.get(k) not in (None, "", {}, [])]
        if not asked:
            continue
        key = asked[0]
        settings = ", ".join(f"hydra.launcher.{k}={params[k]}" for k in asked)
        advice = advice.format(fix_null=f"hydra.launcher.{key}=null",
                               fix_less=f"a smaller hydra.launcher.{key}")
        where = _partitions()
        return (f"sbatch refused the jobs ({reason}) asked for with {settings}; {advice}"
                + (f" [partitions: {where}]" if where else ""))
    return (f"sbatch refused the jobs: {reason}; check the hydra.launcher.* settings "
            f"(hydra/launcher=slurm_cpu for partitions without GPUs)")


# -- the sweep's jobs file -----------------------------------------------------------------------

def read_jobs(sweep_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``slurm_jobs.json`` of a sweep: job number (str) -> record; empty when absent."""
    path = Path(sweep_dir) / JOBS_FILE
    try:
        return dict(json.loads(path.read_text()).get("jobs", {}))
    except (OSError, ValueError):
        return {}


def _write_jobs(sweep_dir: Path, jobs: dict[str, dict[str, Any]]) -> None:
    """Replace the jobs file atomically: a notebook may read it while the sweep runs."""
    path = sweep_dir / JOBS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    ordered = dict(sorted(jobs.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0))
    tmp.write_text(json.dumps({"format": "camsweep-slurm-jobs", "version": 1,
                               "jobs": ordered}, indent=1))
    os.replace(tmp, path)


def _expand_job_ids(text: str) -> list[str]:
    """sacct/squeue job ids, array ranges expanded: ``12_[1-3,7%2]`` -> 12_1 12_2 12_3 12_7
    (how SLURM lists array tasks that never started)."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", text)
    if not m:
        return [text]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            out += [f"{m.group(1)}_{i}" for i in range(int(first), int(last or first) + 1)]
    return out


def _query_states(cmd: list[str], ids: set[str]) -> dict[str, str] | None:
    """``JobID|State`` lines of one SLURM command, for the asked ids; None when it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    states: dict[str, str] = {}
    for line in proc.stdout.splitlines():  # oldest first: a requeued job's last wins
        job, _, state = line.strip().partition("|")
        for one in _expand_job_ids(job):
            if one in ids and state:
                states[one] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM's current state of each job id (``12_3`` for array tasks). The controller
    (squeue) answers for the jobs it still holds: accounting records a start or an end
    only when slurmdbd gets round to it, so sacct may still say PENDING for a job that
    runs. sacct answers for the jobs the controller has forgotten. Ids SLURM does not
    know are left out; no SLURM at all gives {}."""
    ids = {str(i) for i in job_ids if i}
    if not ids:
        return {}
    # Ask by array: tasks cancelled before they started exist only as a range of the array.
    roots = ",".join(sorted({i.split("_")[0] for i in ids}))
    live = _query_states(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", roots], ids) or {}
    rest = ids - live.keys()
    if not rest:
        return live
    recorded = _query_states(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", roots],
                             rest) or {}
    return {**recorded, **live}


# -- the driver: submission and collection -------------------------------------------------------

def _already_done(job_dir: Path, overrides: Sequence[str]) -> dict[str, Any] | None:
    """The job's recorded result when it finished with exactly these overrides."""
    import yaml

    try:
        done = json.loads((job_dir / STATUS_FILE).read_text())
        given = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if done.get("status") == "ok" and list(given or []) == list(overrides):
        return done
    return None


def _outcome(job: Any) -> tuple[str, Any, str, str]:
    """Wait for a submitit job: (outcome, JobReturn or None, error, SLURM state)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return "done", job.results()[0], "", ""
    except FailedJobError as e:  # the job ran and raised (JobFailed, or a crash)
        found = re.findall(rf"{re.escape(JobFailed.__module__)}\.JobFailed: (.+)", str(e))
        trace = [ln for ln in str(e).splitlines() if re.match(r"^\w[\w.]*(Error|Exception)", ln)]
        reason = found[-1] if found else (trace[-1] if trace else first_line(str(e)))
        state = job.state.split()[0] if job.state else ""
        return ("timeout" if "timed-out" in reason else "failed"), None, reason, state
    except UncompletedJobError:  # ended without a result: cancelled, killed, timed out
        state = (job.state or "UNKNOWN").split()[0]
        outcome = {"CANCELLED": "cancelled", "TIMEOUT": "timeout",
                   "DEADLINE": "timeout"}.get(state, "failed")
        why = {"OUT_OF_MEMORY": "out of memory (hydra.launcher.mem_gb)",
               "NODE_FAIL": "its node failed"}.get(state, f"ended as {state}")
        return outcome, None, "" if outcome == "cancelled" else f"SLURM: {why}", state


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[Any]:
    """hydra-submitit-launcher's ``launch`` for a SLURM sweep, with every job's end
    collected (see the module doc). Returns one Hydra JobReturn per job; jobs that did not
    finish return ``{"status": <outcome>, "error": ...}`` as plain data."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from omegaconf import OmegaConf

    config = launcher.config
    params = dict(launcher.params)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
    # Job folders are findable without composing each job only under the default subdir.
    plain_subdirs = OmegaConf.to_container(config.hydra.sweep)["subdir"] == "${hydra.job.num}"

    jobs = read_jobs(sweep_dir)
    returns: dict[int, Any] = {}
    wanted = [(i, list(o)) for i, o in enumerate(job_overrides, start=initial_job_idx)]
    # A job of an earlier driver of this sweep (one that was interrupted, or lost with its
    # login session) may still be queued or running: wait for it instead of starting a
    # second copy on the same results file.
    earlier = {i: jobs[str(i)]["slurm_job_id"] for i, o in wanted
               if jobs.get(str(i), {}).get("overrides") == o
               and jobs[str(i)].get("slurm_job_id")}
    alive = slurm_states(list(earlier.values())) if earlier else {}
    todo: list[tuple[int, list[str]]] = []
    submitted: list[tuple[int, list[str], Any]] = []
    for idx, overrides in wanted:
        done = _already_done(sweep_dir / str(idx), overrides) if plain_subdirs else None
        shown = " ".join(filter_overrides(overrides))
        job_id = earlier.get(idx, "")
        if done is not None:
            log.info("\t#%d : %s  (done earlier: not submitted)", idx, shown)
            returns[idx] = JobReturn(overrides=overrides, status=JobStatus.COMPLETED,
                                     _return_value=done, working_dir=str(sweep_dir / str(idx)))
            jobs.setdefault(str(idx), {"overrides": overrides}).update(outcome="done", error="")
        elif alive.get(job_id) in LIVE_STATES:
            log.info("\t#%d : %s  (still in SLURM as %s, %s: waiting for it)", idx, shown,
                     job_id, alive[job_id])
            handle = submitit.SlurmJob(folder=params["submitit_folder"], job_id=job_id)
            jobs[str(idx)].update(outcome="submitted", slurm_state=alive[job_id], error="")
            submitted.append((idx, overrides, handle))
        else:
            log.info("\t#%d : %s", idx, shown)
            todo.append((idx, overrides))

    if todo:
        executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                         slurm_max_num_timeout=params["max_num_timeout"])
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{
            k if k in base else f"slurm_{k}": v for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout")})
        # The pickled callable: the stock launcher (importable in every job) in a JobRunner.
        stock = SlurmLauncher(**params)
        stock.setup(hydra_context=launcher.hydra_context,
                    task_function=launcher.task_function, config=config)
        runner = JobRunner(stock)
        args = [(o, "hydra.sweep.dir", i, f"job_id_for_{i}", Singleton.get_state())
                for i, o in todo]
        try:
            # submitit echoes sbatch's stderr on a refusal; the one line below says it all.
            with contextlib.redirect_stderr(io.StringIO()):
                handles = executor.map_array(runner, *zip(*args, strict=True))
        except submitit.core.utils.FailedJobError as e:
            _refused(explain_sbatch_error(str(e), params), e)
        except FileNotFoundError as e:  # no sbatch here
            _refused(f"cannot submit to SLURM ({e.filename or e}: not found); "
                     "hydra/launcher=slurm needs a SLURM cluster: run the sweep here with "
                     "hydra/launcher=basic (the default) or submitit_local", e)
        for (idx, overrides), handle in zip(todo, handles, strict=True):
            record = jobs.setdefault(str(idx), {})
            before = record.get("earlier_slurm_job_ids", [])
            if record.get("slurm_job_id") and record["slurm_job_id"] != handle.job_id:
                before = [*before, record["slurm_job_id"]]
            jobs[str(idx)] = {"overrides": overrides, "slurm_job_id": handle.job_id,
                              "earlier_slurm_job_ids": before, "slurm_state": "PENDING",
                              "outcome": "submitted", "error": ""}
            submitted.append((idx, overrides, handle))
        log.info("submitted %d job(s) to SLURM as %s", len(todo),
                 handles[0].job_id.split("_")[0])
    submitted.sort(key=lambda item: item[0])
    _write_jobs(sweep_dir, jobs)
    if submitted:
        log.info("watch the sweep with pipeline.results.load_sweep(%r)", str(sweep_dir))

    try:
        for idx, overrides, handle in submitted:
            outcome, ret, error, state = _outcome(handle)
            record = jobs[str(idx)]
            record.update(outcome=outcome, error=error, slurm_state=state)
            if ret is None:  # plain data: Hydra then calls the report instead of raising
                ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED,
                                _return_value={"status": outcome, "error": error,
                                               "slurm_job_id": handle.job_id},
                                working_dir=str(sweep_dir / str(idx)))
            returns[idx] = ret
            _write_jobs(sweep_dir, jobs)
        _settle(sweep_dir, jobs, [str(i) for i, _, _ in submitted])
    except KeyboardInterrupt:
        _write_jobs(sweep_dir, jobs)
        ids = sorted({h.job_id.split("_")[0] for _, _, h in submitted})
        print(f"\ninterrupted: the sweep's jobs go on in SLURM (scancel {' '.join(ids)} stops "
              f"them); pipeline.results.load_sweep({str(sweep_dir)!r}) shows where they are, "
              "and the same command run again waits for them", file=sys.stderr)
        raise SystemExit(130) from None
    return [returns[i] for i in sorted(returns)]


def _settle(sweep_dir: Path, jobs: dict[str, dict[str, Any]], names: list[str],
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
    _write_jobs(sweep_dir, jobs)


def _refused(message: str, error: BaseException) -> None:
    """A submission error is the user's to fix: one line, exit 2, no traceback (the trace
    with HYDRA_FULL_ERROR=1, as for every camsweep error)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None
