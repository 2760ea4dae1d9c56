"""A Hydra multirun folder as one table over its jobs: :func:`load_sweep`, :class:`Sweep`.

Read while the sweep runs: results files open with HDF5 locking off, writer locks tell
which jobs are being written, SLURM (squeue, sacct) tells what the cluster does with the
jobs the launcher has not seen end. No torch.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .cluster.states import (
    JOB_STATES,
    OUT_OF_TIMEOUTS,
    OUT_OF_TIMEOUTS_REASON,
    RUN_LOG,
    SLURM_ENDED,
    SLURM_RUNNING,
    SLURM_WAITING,
)
from .errors import StoreError
from .jobs import folder_overrides, job_folders, job_status, shard_statuses
from .locks import lock_is_held
from .results import Run
from .store import DONE, FAILED, PENDING

__all__ = ["JOB_STATES", "Sweep", "load_sweep"]

# Errors cli.main records when a job was stopped (a signal, Ctrl-C) rather than failed.
_INTERRUPTED = ("SystemExit", "KeyboardInterrupt")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _override_key(item: str) -> tuple[str, str]:
    key, _, value = str(item).partition("=")
    return key.lstrip("+~"), value


def _expand_globs(overrides: list[Any]) -> list[Any]:
    """``model=glob(*)`` over a config group -> the group's options, as Hydra's sweeper
    expands it with its config loader (the options are this repo's ``conf/<group>/``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    out = []
    for o in overrides:
        value = o.value()
        group = CONF_DIR / o.key_or_group
        if isinstance(value, Glob) and group.is_dir():
            options = sorted(p.stem for p in group.glob("*.yaml"))
            chosen = value.filter(options)
            o = OverridesParser.create().parse_override(
                f"{o.get_key_element()}={','.join(chosen)}")
        out.append(o)
    return out


def _writer_holds(path: Path) -> str:
    """What a live process holding ``path``'s writer lock does ("" when none holds it). A
    reader that may not open the lock file (someone else's sweep) cannot tell: ""."""
    try:
        if not lock_is_held(path):
            return ""
        what = path.with_name(f".{path.name}.lock").read_text(errors="replace")
    except OSError:
        return ""
    return "evaluating" if "evaluating" in what else "running"


def _tail_error(path: Path, size: int = 16384) -> str:
    """The last line of a log that reads like an error ("" when none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if any(w in line for w in ("Error", "error:", "ERROR", "Exception", "Traceback",
                                   "killed", "CANCELLED", "DUE TO TIME LIMIT")):
            return line.strip()[:200]
    return ""


def expected_jobs(hydra: dict[str, Any], config_loader: Any = None
                  ) -> tuple[list[list[str]], list[str] | None]:
    """The jobs a sweep's ``hydra`` config node asks for (overrides, in job-number order)
    and the keys it sweeps, expanded as Hydra's basic sweeper does (globs over config groups
    with ``config_loader``, as the driver has it; without one, from ``conf/<group>/``);
    ([], keys) for another sweeper, ([], None) for a sweep this cannot parse."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        sweeper = hydra.get("sweeper") or {}
        args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        args += list((hydra.get("overrides") or {}).get("task") or [])
        overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(args)
        if config_loader is None:
            overrides = _expand_globs(overrides)
        swept = [_override_key(o.get_key_element())[0] for o in overrides
                 if o.is_sweep_override()]
        if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return [], swept
        batches = BasicSweeper.split_arguments(overrides, None)
    except Exception:  # an unusual sweep: its job folders say what ran
        return [], None
    return [list(job) for batch in batches for job in batch], swept


class Sweep:
    """A Hydra multirun folder: one row per job in :attr:`table`, arrays on demand.

    The jobs are the sweep's job folders (found by the job number Hydra recorded in each,
    whatever ``hydra.sweep.subdir`` names them), the jobs its ``multirun.yaml`` asks for
    (jobs not started yet are listed) and those in ``slurm_jobs.json`` (camsweep's SLURM
    launcher). ``table`` (a pandas DataFrame) has the job number, the overrides each job
    was given (one column per key; :attr:`swept` names the keys the sweep varies), its
    ``state``, the error of a job that did not finish, image counts, summary figures (mean
    top-1 probability, mean target score, top-1 accuracy where images carry labels), the
    job's folder and logs (``logs``), and for sweeps run on SLURM ``slurm_job``,
    ``slurm_state`` and ``requeued`` (how often SLURM requeued it).

    States (:data:`JOB_STATES`): ``done``; ``running`` (its writer holds the results file,
    or SLURM says it runs); ``evaluating`` (stage=evaluate holds it); ``pending`` (queued in
    SLURM, requeued and waiting, or not started yet while the sweep's driver runs);
    ``incomplete`` (stopped with images left: continue it); ``failed``; ``timeout``;
    ``cancelled``; ``missing`` (never started, and the driver is gone).

    ``slurm``: ask SLURM (squeue, else sacct) for the live state of jobs the launcher has not
    seen end: None (default) asks when the sweep ran on SLURM, False never does.
    """

    def __init__(self, root: str | os.PathLike, slurm: bool | None = None) -> None:
        from .cluster.jobs_file import read_jobs
        from .folders import process_alive, read_identity

        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"no sweep folder at {self.root}")
        expected, self._swept = self._expected_jobs()
        self.slurm_jobs = read_jobs(self.root)
        self.identity = read_identity(self.root)
        # The driver still runs: jobs without a folder are queued, not missing.
        self.driver_alive = bool(self.identity) and process_alive(self.identity)
        folders = job_folders(self.root)
        names: set[int | str] = set(folders) | set(range(len(expected)))
        names |= {int(n) if n.isdigit() else n for n in self.slurm_jobs}
        if not names:
            raise StoreError(f"{self.root} holds no Hydra job folders (<n>/.hydra) and no "
                             "multirun.yaml listing jobs")
        live, self._requeues = self._live_states(slurm)
        rows = []
        self._overrides: list[dict[str, str]] = []  # per job, for :attr:`swept` without yaml
        for name in sorted(names, key=lambda n: (isinstance(n, str), n if isinstance(n, int)
                                                 else 0, str(n))):
            folder = folders.get(name)
            overrides = folder_overrides(folder) if folder is not None else None
            if overrides is None:
                overrides = (expected[name] if isinstance(name, int) and name < len(expected)
                             else self.slurm_jobs.get(str(name), {}).get("overrides", []))
            self._overrides.append(dict(_override_key(o) for o in overrides))
            rows.append(self._job_row(name, folder, overrides, live))
        import pandas as pd

        self.table = pd.DataFrame(rows)
        if not self.slurm_jobs:
            self.table = self.table.drop(columns=["slurm_job", "slurm_state", "requeued"])

    # -- what the sweep is --------------------------------------------------------------------
    def _expected_jobs(self) -> tuple[list[list[str]], list[str] | None]:
        """The jobs the sweep asks for (overrides, in job-number order) and the keys it
        sweeps: as its driver recorded them (globs expanded by Hydra itself), else from
        ``multirun.yaml``; ([], None) when neither tells."""
        from .folders import read_identity

        record = read_identity(self.root)
        if isinstance(record.get("jobs"), list):
            return [list(map(str, j)) for j in record["jobs"]], record.get("swept")
        path = self.root / "multirun.yaml"
        if not path.is_file():
            return [], None
        return expected_jobs((yaml.safe_load(path.read_text()) or {}).get("hydra", {}))

    @property
    def swept(self) -> list[str]:
        """The keys the sweep varies, as written on its command line (``model``,
        ``model.target_layers``), from ``multirun.yaml``; without it, the override keys whose
        values differ between jobs."""
        if self._swept is not None:
            return list(dict.fromkeys(self._swept))
        keys = list(dict.fromkeys(k for job in self._overrides for k in job))
        return [k for k in keys if len({job.get(k) for job in self._overrides}) > 1]

    def _live_states(self, slurm: bool | None) -> tuple[dict[str, str], dict[str, int]]:
        """SLURM's state of the jobs whose end the launcher has not recorded (id -> state),
        and how often SLURM requeued them."""
        if slurm is False or not self.slurm_jobs:
            return {}, {}
        from .cluster.slurm import requeue_counts, slurm_states

        open_ids = [r.get("slurm_job_id", "") for r in self.slurm_jobs.values()
                    if r.get("outcome") == "submitted"]
        if not open_ids:
            return {}, {}
        return slurm_states(open_ids), requeue_counts(open_ids)

    # -- one job --------------------------------------------------------------------------------
    def logs(self, name: int | str, folder: Path | None) -> list[Path]:
        """The job's logs: SLURM's (``.submitit/<id>/<id>_0_log.out/.err``) and Hydra's
        ``run.log``, those that exist."""
        found = []
        slurm_id = self.slurm_jobs.get(str(name), {}).get("slurm_job_id", "")
        if slurm_id:
            base = self.root / ".submitit" / slurm_id
            found += [base / f"{slurm_id}_0_log.out", base / f"{slurm_id}_0_log.err"]
        if folder is not None:
            found.append(folder / RUN_LOG)
        return [p for p in found if p.exists()]

    def _job_row(self, name: int | str, folder: Path | None, overrides: list[str],
                 live: dict[str, str]) -> dict[str, Any]:
        job = folder if folder is not None else self.root / str(name)
        row: dict[str, Any] = {"job": name}
        for item in overrides:
            key, value = _override_key(item)
            row[key] = value
        # Swept `model=`/`method=` columns keep their values for jobs without results.
        for key in ("method", "model", "layers"):
            row.setdefault(key, "")
        status = job_status(job) if folder is not None else {}
        error = str(status.get("error", ""))
        interrupted = status.get("status") == "failed" and error.startswith(_INTERRUPTED)
        record = self.slurm_jobs.get(str(name), {})
        slurm_id = record.get("slurm_job_id", "")
        now = live.get(slurm_id, "")  # asked just now (jobs whose end is not recorded)
        logs = self.logs(name, folder)
        row.update(state="missing", error="" if interrupted else error, n=0, done=0, failed=0,
                   pending=0, mean_prob=np.nan, mean_score=np.nan, accuracy=np.nan,
                   run_dir=str(job), logs=[str(p) for p in logs], slurm_job=slurm_id,
                   slurm_state=now or record.get("slurm_state", ""),
                   requeued=self._requeues.get(slurm_id, 0))
        results = job / "results.h5"
        shards = sorted(job.glob("results.shard-*.h5")) if folder is not None else []
        holders = {_writer_holds(p) for p in [results, *shards]} - {""}
        if folder is not None and lock_is_held(job / "metrics.h5"):
            holders.add("evaluating")
        readable = False
        sources = [results] if results.exists() else shards
        if sources:
            try:
                self._read_counts(sources, row)
                readable = True
            except StoreError as e:
                if not holders:  # a file being created may not be readable yet
                    row.update(state="failed", error=str(e))
                    return row
        if holders:
            row["state"] = "evaluating" if holders == {"evaluating"} else "running"
        elif now in SLURM_RUNNING:
            row["state"] = "running"
        elif now in SLURM_WAITING:  # queued, requeued, or resubmitted after a failure
            row["state"] = "pending"
            row["error"] = ""
        elif status.get("status") == "failed" and not interrupted:
            row["state"] = "failed"
            if OUT_OF_TIMEOUTS in error:  # submitit's word for a job out of requeues
                row.update(state="timeout", error=OUT_OF_TIMEOUTS_REASON)
        elif readable and row["pending"] == 0 and results.exists():  # shards: once merged
            row["state"] = "done"
        elif folder is not None and record.get("outcome") in ("failed", "timeout", "cancelled"):
            row["state"] = record["outcome"]
            row["error"] = row["error"] or record.get("error", "")
        elif folder is not None and now in SLURM_ENDED:  # ended, and the driver did not see it
            row["state"] = SLURM_ENDED[now]
        elif readable:
            row["state"] = "pending" if self.driver_alive and self._sharded_wait(job) \
                else "incomplete"
        elif self.driver_alive:
            row["state"] = "pending"  # not started yet: the driver will get to it
        if row["state"] in ("failed", "timeout") and not row["error"]:
            row["error"] = next((e for p in logs if (e := _tail_error(p))), "")
        return row

    @staticmethod
    def _sharded_wait(job: Path) -> bool:
        """A sharded job some of whose shards have not ended (their tasks still run)."""
        total, shards = shard_statuses(job)
        return total > 1 and len(shards) < total

    @staticmethod
    def _read_counts(sources: list[Path], row: dict[str, Any]) -> None:
        """Image counts and summary figures of a job: its results file, or the sum over its
        shard files while they are not merged."""
        cls_all, prob_all, score_all, labels_all = [], [], [], []
        for source in sources:
            with Run(source) as run:
                st = run.status
                done = st == DONE
                row.update(method=run.method, model=run.model, layers=",".join(run.layers))
                row["n"] += len(st)
                row["done"] += int(done.sum())
                row["failed"] += int((st == FAILED).sum())
                row["pending"] += int((st == PENDING).sum())
                if done.any():
                    cls, prob = run.predictions
                    _, score = run.targets
                    cls_all.append(cls[done, 0])
                    prob_all.append(prob[done, 0])
                    score_all.append(np.asarray(score[done]).reshape(int(done.sum()), -1)[:, 0])
                    labels_all.append(run.labels[done])
        if prob_all:
            row["mean_prob"] = float(np.concatenate(prob_all).mean())
            row["mean_score"] = float(np.concatenate(score_all).mean())
            labels, cls = np.concatenate(labels_all), np.concatenate(cls_all)
            if (labels >= 0).any():
                row["accuracy"] = float((cls[labels >= 0] == labels[labels >= 0]).mean())

    # -- the whole sweep ------------------------------------------------------------------------
    @property
    def failed(self) -> Any:
        """Rows of jobs that did not finish (any state but done)."""
        return self.table[self.table["state"] != "done"]

    @property
    def live(self) -> bool:
        """Whether jobs still run or wait (or the driver runs): the table will change."""
        return self.driver_alive or bool(
            self.table["state"].isin(("running", "evaluating", "pending")).any())

    def counts(self) -> dict[str, int]:
        """Jobs per state, in :data:`JOB_STATES` order, states without jobs left out."""
        found = self.table["state"].value_counts().to_dict()
        return {s: int(found[s]) for s in JOB_STATES if found.get(s)}

    def run(self, job: int | str) -> Run:
        """Open one job's results, by job number."""
        rows = self.table[self.table["job"] == job]
        if rows.empty:
            raise StoreError(f"no job {job!r} in {self.root}; jobs: {list(self.table['job'])}")
        return Run(Path(rows.iloc[0]["run_dir"]) / "results.h5")

    def runs(self) -> Iterator[tuple[Any, Run]]:
        """(table row, opened Run) for every job with results; each Run closes after its turn."""
        for _, row in self.table.iterrows():
            if row["n"] > 0 and (Path(row["run_dir"]) / "results.h5").exists():
                with Run(Path(row["run_dir"]) / "results.h5") as run:
                    yield row, run

    def rerun_command(self) -> str:
        """The command that runs this sweep again in its folder, continuing unfinished jobs:
        the original overrides (from ``multirun.yaml``) and ``hydra.sweep.dir=<this folder>``."""
        args: list[str] = []
        path = self.root / "multirun.yaml"
        if path.is_file():
            overrides = (yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get(
                "overrides") or {}
            args = [str(o) for o in overrides.get("hydra") or []
                    if not str(o).startswith(("hydra.mode=", "hydra.sweep.dir="))]
            args += [str(o) for o in overrides.get("task") or []]
        else:
            args = ["<the sweep's overrides>"]
        args.append(f"hydra.sweep.dir={self.root.resolve()}")
        return "python run.py -m " + " ".join(
            a if a.startswith("<") else shlex.quote(a) for a in args)

    def report(self, max_rows: int = 40, logs: bool = False) -> list[str]:
        """The sweep as lines of text: a count per state, a table of the jobs (the swept keys,
        state, images done, SLURM's record, the error; with ``logs``, where each job's logs
        are) and, when jobs did not finish, what comes next: while jobs still run or wait,
        how to follow them; after, the command that continues them. Done jobs are left out
        beyond ``max_rows`` jobs."""
        t = self.table
        counts = self.counts()
        words = ", ".join(f"{n} {s}" + (" (never ran)" if s == "missing" else "")
                          for s, n in counts.items())
        lines = [f"sweep {self.root}: {len(t)} job{'s' * (len(t) != 1)}: {words}"]
        swept = [k for k in self.swept if k in t.columns]
        shown = t if len(t) <= max_rows else t[t["state"] != "done"].head(max_rows)
        head = ["job", *swept, "state", "images"] + (["slurm"] if self.slurm_jobs else [])
        cells = []
        for _, row in shown.iterrows():
            images = f"{int(row['done'])}/{int(row['n'])}" if row["n"] else "-"
            cell = [str(row["job"]), *(str(row[k]) for k in swept), str(row["state"]), images]
            if self.slurm_jobs:
                cell.append(f"{row['slurm_job']} {row['slurm_state']}".strip() or "-")
            note = str(row["error"] or "")
            if self.slurm_jobs and row["requeued"]:
                note = f"preempted, requeued {int(row['requeued'])}x" + (f"; {note}" if note
                                                                         else "")
            cells.append((cell, note, row["logs"] if logs else []))
        widths = [max(len(c) for c in col) for col in zip(head, *(c for c, _, _ in cells),
                                                          strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        errors = any(note for _, note, _ in cells)
        lines.append(("  " + fmt.format(*head) + ("  error" if errors else "")).rstrip())
        for cell, note, paths in cells:
            line = "  " + fmt.format(*cell)
            lines.append((line + ("  " + note[:160] if note else "")).rstrip())
            lines += [f"      log: {p}" for p in paths]
        if len(shown) < len(t):
            lines.append(f"  ... and {len(t) - len(shown)} more jobs, all done")
        unfinished = len(t) - counts.get("done", 0)
        if self.live and unfinished:
            busy = sum(counts.get(s, 0) for s in ("running", "evaluating", "pending"))
            lines.append(f"{busy} job{'s' * (busy != 1)} still running or queued; follow "
                         f"them with: python run.py stage=status run_dir={self.root}")
        elif unfinished:
            lines.append(f"{unfinished} job{'s' * (unfinished != 1)} did not finish; the "
                         "same command run again continues "
                         f"{'them' if unfinished != 1 else 'it'} in this folder (done jobs "
                         "are kept), as does:")
            lines.append("  " + self.rerun_command())
        return lines

    def images(self, **kw: Any) -> Any:
        """The long per-image table of every job (:func:`pipeline.table.sweep_table`): one
        row per image x map, plus ``job`` and the swept keys; ``kw`` go to ``run_table``."""
        from .table import sweep_table

        return sweep_table(self, **kw)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Sweep({str(self.root)!r}, jobs={len(self)}, {self.counts()})"


def load_sweep(root: str | os.PathLike, slurm: bool | None = None) -> Sweep:
    """Open a multirun folder (``multirun/<date>/<time>``) as one table over its jobs; also
    while it runs (see :class:`Sweep` for the states, and ``slurm``)."""
    return Sweep(root, slurm=slurm)
