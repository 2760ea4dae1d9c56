"""Asking SLURM about jobs: ``squeue`` for the jobs the controller holds, ``sacct`` for the
ones it has forgotten, ``sinfo`` for error messages. Every query is one subprocess with a
timeout; no SLURM at all answers nothing."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence

from .states import SLURM_REQUEUED


def expand_job_ids(text: str) -> list[str]:
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


_expand_job_ids = expand_job_ids  # the name tests and older code use


def _lines(cmd: list[str]) -> list[str] | None:
    """stdout lines of one SLURM command; None when it is missing or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def _query_states(cmd: list[str], ids: set[str]) -> dict[str, str] | None:
    """``JobID|State`` lines of one SLURM command, for the asked ids; None when it fails."""
    lines = _lines(cmd)
    if lines is None:
        return None
    states: dict[str, str] = {}
    for line in lines:  # oldest first: a requeued job's last wins
        job, _, state = line.strip().partition("|")
        for one in expand_job_ids(job):
            if one in ids and state:
                states[one] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


def _roots(ids: set[str]) -> str:
    # Ask by array: tasks cancelled before they started exist only as a range of the array.
    return ",".join(sorted({i.split("_")[0] for i in ids}))


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM's current state of each job id (``12_3`` for array tasks). The controller
    (squeue) answers for the jobs it still holds: accounting records a start or an end
    only when slurmdbd gets round to it, so sacct may still say PENDING for a job that
    runs. sacct answers for the jobs the controller has forgotten. Ids SLURM does not
    know are left out; no SLURM at all gives {}."""
    ids = {str(i) for i in job_ids if i}
    if not ids:
        return {}
    live = _query_states(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", _roots(ids)],
                         ids) or {}
    rest = ids - live.keys()
    if not rest:
        return live
    recorded = _query_states(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j",
                              _roots(ids)], rest) or {}
    return {**recorded, **live}


def requeue_counts(job_ids: Sequence[str]) -> dict[str, int]:
    """How often SLURM requeued each job (earlier runs recorded as REQUEUED or PREEMPTED in
    ``sacct -D``); jobs never requeued, and everything without accounting, are left out."""
    ids = {str(i) for i in job_ids if i}
    lines = _lines(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", _roots(ids)]
                   ) if ids else None
    counts: dict[str, int] = {}
    for line in lines or []:
        job, _, state = line.strip().partition("|")
        if state.split(" ")[0] in SLURM_REQUEUED:
            for one in expand_job_ids(job):
                if one in ids:
                    counts[one] = counts.get(one, 0) + 1
    return counts


def partitions() -> str:
    """The cluster's partitions as sinfo sees them, for error messages ("" if unknown)."""
    lines = _lines(["sinfo", "-h", "-o", "%P|%c|%m|%G"])
    parts = []
    for line in dict.fromkeys(" ".join(lines or []).split()):
        name, cpus, mem, gres = (line.split("|") + ["", "", "", ""])[:4]
        gpus = "no GPUs" if gres in ("(null)", "") else gres
        parts.append(f"{name} ({cpus} CPUs, {mem} MB, {gpus})")
    return "; ".join(parts)
