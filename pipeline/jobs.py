"""A sweep's job folders: which folder holds which job (whatever ``hydra.sweep.subdir``
names them), what each job recorded when it ended, and whether it is done. Read by the
sweep table, the SLURM launcher's resume policy and the sweep report; no torch."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from .cluster.states import SHARD_STATUS_GLOB, STATUS_FILE

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SHARD = re.compile(r"camsweep\.shard-(\d+)-of-(\d+)\.json$")


def job_number(folder: Path) -> int | None:
    """``hydra.job.num`` of a job folder, from the record Hydra left in ``.hydra``; a folder
    without one counts by its name when that is a number (the default subdir)."""
    try:
        hydra = yaml.load((folder / ".hydra" / "hydra.yaml").read_text(), Loader=_LOADER)
        return int(hydra["hydra"]["job"]["num"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return int(folder.name) if folder.name.isdigit() else None


def job_folders(sweep_dir: Path, depth: int = 3) -> dict[int | str, Path]:
    """Job number -> folder of every job folder (``<folder>/.hydra``) of a sweep, down to
    ``depth`` levels (``hydra.sweep.subdir`` may nest them; a job folder itself is not
    searched); a folder whose number cannot be told is keyed by its path in the sweep."""
    found: dict[int | str, Path] = {}
    level = [Path(sweep_dir)]
    for _ in range(depth):
        below = []
        for parent in level:
            try:
                children = sorted(d for d in parent.iterdir() if d.is_dir()
                                  and not d.name.startswith("."))
            except OSError:
                continue
            for folder in children:
                if (folder / ".hydra").is_dir():
                    num = job_number(folder)
                    found[num if num is not None
                          else str(folder.relative_to(sweep_dir))] = folder
                else:
                    below.append(folder)
        level = below
    return found


def folder_overrides(folder: Path) -> list[str] | None:
    path = folder / ".hydra" / "overrides.yaml"
    try:
        return [str(o) for o in yaml.load(path.read_text(), Loader=_LOADER) or []]
    except (OSError, yaml.YAMLError):
        return None


def _read(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # absent, or being replaced right now
        return {}


def shard_statuses(folder: Path) -> tuple[int, dict[int, dict[str, Any]]]:
    """(number of shards, shard -> recorded status) of a job run as srun shards; (1, {})
    for an unsharded job."""
    shards: dict[int, dict[str, Any]] = {}
    total = 1
    for path in folder.glob(SHARD_STATUS_GLOB):
        m = _SHARD.search(path.name)
        if m:
            total = max(total, int(m.group(2)))
            shards[int(m.group(1))] = _read(path)
    return total, shards


def job_status(folder: Path) -> dict[str, Any]:
    """What a job recorded when it ended (``camsweep.json``): ``status`` ok or failed, the
    error. A job run as srun shards is ok when every shard is, failed when one failed, and
    has no status while a shard has not ended."""
    own = _read(folder / STATUS_FILE)
    if own:
        return own
    total, shards = shard_statuses(folder)
    failed = [s for s in shards.values() if s.get("status") == "failed"]
    if failed:
        return {**failed[0], "shards": total}
    if total > 1 and len(shards) == total and all(s.get("status") == "ok"
                                                   for s in shards.values()):
        return {"status": "ok", "shards": total,
                "done": sum(int(s.get("done", 0)) for s in shards.values()),
                "n": sum(int(s.get("n", 0)) for s in shards.values())}
    return {}


def already_done(folder: Path | None, overrides: list[str]) -> dict[str, Any] | None:
    """The job's recorded result when it finished with exactly these overrides."""
    if folder is None:
        return None
    done = job_status(folder)
    if done.get("status") == "ok" and folder_overrides(folder) == list(overrides):
        return done
    return None
