"""A run or a sweep has an identity, not just a time stamp: the same command finds its folder.

``hydra.run.dir`` and ``hydra.sweep.dir`` default to new time-stamped folders
(``outputs/<date>/<time>``, ``multirun/<date>/<time>``). Their resolvers call
:func:`claim`, which first looks, under the same root (``outputs/``, ``multirun/``), for the
latest *unfinished* folder made by the same command (same config name, same overrides, as
recorded in its ``camsweep.identity.json``) whose process is gone: an interrupted run (no
``camsweep.json`` saying ok) or a sweep whose driver did not see every job done. That folder
is continued; otherwise a new one is claimed (an atomic ``mkdir``: runs started in the same
second get ``-2``, ``-3``) and the command's identity recorded in it. ``run_dir=`` and
``hydra.sweep.dir=`` given on the command line still win: the resolvers are not called.

The tasks of one ``srun`` step share one folder: they all pick the same unfinished folder,
or the step's own ``<root>/<date>/slurm-<job id>.<step id>``, so their shards meet and the
last to finish merges.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .cluster.states import IDENTITY_FILE
from .errors import ConfigError

log = logging.getLogger("camsweep")
_CLAIMED: dict[tuple[str, str], str] = {}  # (kind, default folder) -> the folder claimed
# The driver's choice, passed on to the sweep's jobs in other processes (submitit_local,
# SLURM: sbatch exports the environment): each job resolves hydra.sweep.dir again.
CLAIMED_ENV = "CAMSWEEP_CLAIMED"
FORMAT = "camsweep-identity"


def command_identity(overrides: list[str], config_name: str, kind: str) -> str:
    """A digest of what makes two commands the same: the kind (run or sweep), the config
    and the task overrides in their order (Hydra's own settings, ``hydra.*``, are not part
    of it: another launcher or time limit continues the same sweep)."""
    text = json.dumps([kind, config_name, [str(o) for o in overrides]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hydra_identity(kind: str, config: Any) -> tuple[str, list[str]] | None:
    """The identity of the command that composed ``config`` (the root of the config being
    resolved); None without Hydra's record of it."""
    from omegaconf import OmegaConf

    overrides = OmegaConf.select(config, "hydra.overrides.task") if config is not None else None
    if overrides is None:
        return None
    overrides = [str(o) for o in overrides]
    name = str(OmegaConf.select(config, "hydra.job.config_name") or "")
    return command_identity(overrides, name, kind), overrides


def srun_step() -> str | None:
    """``<job id>.<step id>`` of a multi-task srun step this process is a task of (not of a
    submitit job: its folder comes from the sweep)."""
    env = os.environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if "SLURM_STEP_ID" not in env or "SLURM_JOB_ID" not in env or tasks < 2:
        return None
    if "SUBMITIT_FOLDER" in env or env.get("SUBMITIT_EXECUTOR") == "slurm":
        return None
    return f"{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"


def read_identity(folder: Path) -> dict[str, Any]:
    try:
        record = json.loads((Path(folder) / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("format") == FORMAT else {}


def write_identity(folder: Path, **fields: Any) -> None:
    """Create or update the folder's identity record (the driver's pid and host, whether it
    finished, ...)."""
    from .store.atomic import write_text_atomic

    record = read_identity(folder) or {"format": FORMAT}
    record.update(fields)
    write_text_atomic(Path(folder) / IDENTITY_FILE, json.dumps(record, indent=1))


def process_alive(record: dict[str, Any]) -> bool:
    """Whether the process that recorded itself (``pid`` on ``host``) still runs. On another
    host nobody can tell: counted as alive unless the record says it ended."""
    if record.get("ended"):
        return False
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished(folder: Path, kind: str, record: dict[str, Any]) -> bool:
    """A run whose status says ok (every shard's, for shards), a sweep whose driver saw
    every job done."""
    if kind == "sweep":
        return bool(record.get("finished"))
    from .jobs import job_status

    return job_status(folder).get("status") == "ok"


def _writing(folder: Path) -> bool:
    from .locks import lock_is_held

    try:
        return any(lock_is_held(p) for p in Path(folder).glob("results*.h5"))
    except OSError:
        return False


def find_unfinished(root: Path, identity: str, kind: str, exclude: str | None = None,
                    step: str | None = None) -> Path | None:
    """The latest folder under ``root`` (``<root>/<date>/<time>``) made by the command with
    this identity and not finished, whose process is gone (or is a task of the same srun
    ``step``, which shares it); None if there is none."""
    best: tuple[float, Path] | None = None
    for path in Path(root).glob(f"*/*/{IDENTITY_FILE}"):
        folder = path.parent
        if str(folder) == exclude:
            continue
        record = read_identity(folder)
        if record.get("identity") != identity or record.get("kind") != kind:
            continue
        sibling = step is not None and record.get("step") == step
        if finished(folder, kind, record) or (not sibling and (
                process_alive(record) or _writing(folder))):
            continue
        created = float(record.get("created") or 0)
        if best is None or created > best[0]:
            best = (created, folder)
    return best[1] if best else None


def _mkdir_free(default: str) -> str:
    Path(default).parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        candidate = default if i == 1 else f"{default}-{i}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"cannot find a free folder next to {default}")


def claim(default: str, kind: str, config: Any = None) -> str:
    """The folder of this run (``kind`` "run") or sweep ("sweep") when none was given:
    see the module doc. ``config``: the composed config (its ``hydra.overrides.task`` say
    which command this is). One answer per process and default folder."""
    key = (kind, default)
    if key in _CLAIMED:
        return _CLAIMED[key]
    inherited = _inherited().get(f"{kind}:{default}")
    if inherited:
        _CLAIMED[key] = inherited
        return inherited
    step = srun_step()
    step_dir = str(Path(default).parent / f"slurm-{step}") if step else None
    found = _hydra_identity(kind, config)
    if found is None:  # not under Hydra (a test, a notebook): a new folder, as before
        if step_dir is not None:
            Path(step_dir).mkdir(parents=True, exist_ok=True)
        _CLAIMED[key] = step_dir or _mkdir_free(default)
        return _CLAIMED[key]
    identity, overrides = found
    folder = find_unfinished(Path(default).parent.parent, identity, kind, step_dir, step)
    if folder is not None:
        log.info("continuing %s %s (the same command, interrupted earlier)", kind, folder)
        chosen = str(folder)
    elif step_dir is not None:  # every task of the step computes the same folder
        Path(step_dir).mkdir(parents=True, exist_ok=True)
        chosen = step_dir
    else:
        chosen = _mkdir_free(default)
    created = read_identity(Path(chosen)).get("created") or time.time()
    write_identity(Path(chosen), identity=identity, kind=kind, overrides=overrides,
                   pid=os.getpid(), host=socket.gethostname(), created=created,
                   step=step, ended=False)
    _CLAIMED[key] = chosen
    if kind == "sweep":
        os.environ[CLAIMED_ENV] = json.dumps({**_inherited(), f"{kind}:{default}": chosen})
    return chosen


def _inherited() -> dict[str, str]:
    try:
        found = json.loads(os.environ.get(CLAIMED_ENV) or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
