"""Submission errors a user can fix, as one line naming the launcher key to change: sbatch
refusals, and a SLURM launcher chosen where there is no SLURM."""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, NoReturn

from .slurm import partitions

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
NO_SLURM = ("hydra/launcher=slurm needs a SLURM cluster, and this machine has no {what} on "
            "its PATH: run it on a SLURM login node, or here with hydra/launcher=basic (the "
            "default, one job after another) or hydra/launcher=submitit_local")


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


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
        where = partitions()
        return (f"sbatch refused the jobs ({reason}) asked for with {settings}; {advice}"
                + (f" [partitions: {where}]" if where else ""))
    return (f"sbatch refused the jobs: {reason}; check the hydra.launcher.* settings "
            f"(hydra/launcher=slurm_cpu for partitions without GPUs)")


def missing_slurm() -> str:
    """Why this machine cannot submit to SLURM ("" when it can): submitit needs both."""
    lacking = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
    return NO_SLURM.format(what=" and ".join(f"'{c}'" for c in lacking)) if lacking else ""


def refused(message: str, error: BaseException | None = None) -> NoReturn:
    """A submission error is the user's to fix: one line, exit 2, no traceback (the trace
    with HYDRA_FULL_ERROR=1, as for every camsweep error)."""
    if error is not None and os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None
