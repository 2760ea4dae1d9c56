"""``python run.py stage=status run_dir=<sweep or run>``: where a sweep's jobs (or one run)
are, from the files, squeue and sacct, in about a second: state, images done of all, rate
and time left of the jobs being written, their logs and the last error line. Read-only, no
torch, no Hydra composition (``run.py`` calls :func:`main` before anything else)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .cluster.states import RUN_LOG
from .errors import CamsweepError, StoreError

USAGE = "usage: python run.py stage=status run_dir=<a sweep or run folder>"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress(folder: Path, done: int, total: int, now: float | None = None) -> str:
    """``2.5 img/s, ETA 1m20s`` for a job being written: rows done since its writer took the
    results file's lock (the lock file's time) over the time since; "" when not known. A
    resumed job counts its earlier rows too, so its rate reads high until it has run a
    while."""
    now = time.time() if now is None else now
    locks = [p for p in (folder / ".results.h5.lock", *folder.glob(".results.shard-*.lock"))
             if p.exists()]
    if not locks or not done:
        return ""
    elapsed = now - min(p.stat().st_mtime for p in locks)
    if elapsed <= 0:
        return ""
    rate = done / elapsed
    eta = f", ETA {_duration((total - done) / rate)}" if total > done else ""
    return f"{rate:.3g} img/s{eta}"


def is_sweep(folder: Path) -> bool:
    from .cluster.states import IDENTITY_FILE, JOBS_FILE
    from .folders import read_identity

    if (folder / "multirun.yaml").exists() or (folder / JOBS_FILE).exists():
        return True
    if (folder / IDENTITY_FILE).exists():
        return read_identity(folder).get("kind") == "sweep"
    return not (folder / ".hydra").is_dir() and any(folder.glob("*/.hydra"))


def sweep_lines(folder: Path) -> list[str]:
    from .sweep import load_sweep

    sweep = load_sweep(folder)
    lines = sweep.report(max_rows=200, logs=True)
    busy = sweep.table[sweep.table["state"].isin(("running", "evaluating"))]
    for _, row in busy.iterrows():
        rate = progress(Path(row["run_dir"]), int(row["done"]), int(row["n"]))
        if rate:
            lines.insert(-1, f"  job {row['job']}: {int(row['done'])}/{int(row['n'])}, {rate}")
    return lines


def run_lines(folder: Path) -> list[str]:
    """One run (``outputs/<date>/<time>``, or a job folder of a sweep)."""
    from .jobs import job_status
    from .results import Run
    from .sweep import _tail_error, _writer_holds

    results = folder / "results.h5"
    sources = [results] if results.exists() else sorted(folder.glob("results.shard-*.h5"))
    if not sources:
        raise StoreError(f"{folder} holds no results file (results.h5) and no sweep's jobs")
    done = n = 0
    for source in sources:
        with Run(source) as run:
            done += int(run.done.sum())
            n += len(run)
    holders = {_writer_holds(p) for p in sources} - {""}
    status = job_status(folder)
    if holders:
        state = "evaluating" if holders == {"evaluating"} else "running"
    elif status.get("status") == "failed" and not str(status.get("error")).startswith(
            ("SystemExit", "KeyboardInterrupt")):
        state = "failed"
    else:
        state = "done" if done == n else "incomplete"
    line = f"run {folder}: {state}, {done}/{n} images"
    rate = progress(folder, done, n) if state == "running" else ""
    lines = [line + (f", {rate}" if rate else "")]
    log = folder / RUN_LOG
    if log.exists():
        lines.append(f"  log: {log}")
    error = str(status.get("error") or "") if state == "failed" else ""
    error = error or (_tail_error(log) if state in ("failed", "incomplete") else "")
    if error:
        lines.append(f"  error: {error}")
    if state == "incomplete":
        lines.append("  the same command run again continues it (or run_dir=" f"{folder})")
    return lines


def print_status(folder: str | Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"no run or sweep folder at {folder}")
    lines = sweep_lines(folder) if is_sweep(folder) else run_lines(folder)
    print("\n".join(lines), flush=True)
    return lines


def requested(argv: list[str]) -> bool:
    """Whether the command line asks for stage=status (run.py's fast path)."""
    return "stage=status" in argv and "-m" not in argv and "--multirun" not in argv


def main(argv: list[str]) -> int:
    """run.py's fast path: ``stage=status run_dir=DIR``; exit 2 with one line otherwise."""
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    other = [a for a in argv if a != "stage=status" and not a.startswith("run_dir=")]
    try:
        if len(run_dirs) != 1 or not run_dirs[0]:
            raise CamsweepError(f"stage=status needs run_dir=<folder>; {USAGE}")
        if other:
            raise CamsweepError(f"stage=status takes only run_dir (got {' '.join(other)}); "
                                f"{USAGE}")
        print_status(run_dirs[0])
    except CamsweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def status_stage(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """``stage=status``: print the job table of a run or sweep (read-only, no torch)."""
    return {"lines": print_status(run_dir)}
