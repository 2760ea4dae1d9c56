"""Reload runs for analysis: ``load_run`` for one results file, ``load_sweep`` for a
multirun folder. Arrays are read lazily, when asked for."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from .errors import StoreError
from .locks import lock_is_held
from .store import (
    DONE,
    FAILED,
    PENDING,
    attr_list,
    is_scale,
    open_results,
    ragged_keys,
    read_layouts,
    read_map,
    stored_config,
)
from .store import categories as stored_categories
from .table import seen_boxes, sweep_table


class Run:
    """One results file. Use as a context manager, or call :meth:`close`.

    Row ``i`` of every array belongs to image ``paths[i]``; rows whose ``status`` is not
    done hold no valid values, and the ``done_only=True`` accessors drop them.

    A run at native resolution (:attr:`ragged`) stores maps of different sizes: its map
    accessors give each image's map in its own shape, a list of arrays (one array for an
    integer ``rows``); fixed-size runs give one ndarray with the image axis first.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "results.h5"
        self.path = path
        self.file: h5py.File = open_results(path)

    # -- metadata ---------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.file.attrs)

    @property
    def method(self) -> str:
        return str(self.file.attrs["method"])

    @property
    def model(self) -> str:
        return str(self.file.attrs["model"])

    @property
    def layers(self) -> list[str]:
        return [str(x) for x in attr_list(self.file.attrs.get("target_layers"))]

    @property
    def layouts(self) -> dict[str, dict[str, Any]]:
        """{layer: how its output became the stored (C, h, w)}, e.g. ``layout`` "tokens",
        ``text`` "tokens(prefix=1, grid=14x14)" (docs/FORMAT.md; empty for older files)."""
        return read_layouts(self.file)

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved config, read as plain data (a safe YAML load: never code)."""
        return stored_config(self.file, self.path)

    @property
    def categories(self) -> list[str]:
        """Class names, index = class (empty when the model has none)."""
        return stored_categories(self.file)

    def __len__(self) -> int:
        return int(self.file["images/status"].shape[0])

    # -- per-image tables -------------------------------------------------------------
    @property
    def paths(self) -> np.ndarray:
        return self.file["images/path"].asstr()[:]

    @property
    def labels(self) -> np.ndarray:
        return self.file["images/label"][:]

    @property
    def status(self) -> np.ndarray:
        return self.file["images/status"][:]

    @property
    def errors(self) -> np.ndarray:
        return self.file["images/error"].asstr()[:]

    @property
    def running(self) -> bool:
        """Whether a camsweep process is writing this file right now (rows may still change
        from pending to done; the done ones are final)."""
        return lock_is_held(self.path)

    @property
    def state(self) -> str:
        """``running``, ``done`` (no image pending) or ``incomplete`` (interrupted)."""
        if self.running:
            return "running"
        return "incomplete" if (self.status == PENDING).any() else "done"

    @property
    def done(self) -> np.ndarray:
        return self.status == DONE

    @property
    def sizes(self) -> np.ndarray:
        return self.file["images/size"][:]

    @property
    def predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """(classes, probabilities), each (N, k), best first."""
        return self.file["predictions/class"][:], self.file["predictions/prob"][:]

    @property
    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """(class explained, its pre-softmax score), each (N,)."""
        return self.file["targets/class"][:], self.file["targets/score"][:]

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) region of each original image the model saw (``/images/box``: y0, x0, y1,
        x1 in original pixels); a center crop is not the whole photo, and maps cover this
        region only. The whole image for files without ``/images/box``."""
        return seen_boxes(self.file)

    def table(self, metrics: bool = True, stats: bool = True, boxes: Any = None) -> Any:
        """The long table (pandas): a row per image x stored map (x class with topk), with
        the image's facts, the map's metrics and statistics; see :func:`pipeline.table.
        run_table` for the columns and ``boxes``."""
        from .table import run_table

        return run_table(self, metrics=metrics, stats=stats, boxes=boxes)

    def metrics(self) -> dict[str, Any]:
        """The metrics ``stage=evaluate`` stored, per map key (``gradcam/layer4``): an
        ``xarray.Dataset`` with an ``image`` coordinate (a dict of arrays without xarray);
        {} when the run has none."""
        from .table import metric_datasets

        return metric_datasets(self)

    def overlay(self, row: int, map: str | None = None, alpha: float = 0.5,
                cmap: str | None = None, k: int | None = None) -> np.ndarray:
        """Image ``row``'s picture for one map as uint8 RGB (H, W, 3): the very picture
        ``stage=render`` draws, without its title banner.

        Args:
            row: The image's row (``table()["row"]``); it must be done.
            map: ``"method/layer"`` (``table()["map"]``); None for the run's first map.
            alpha: The map's opacity over the photo, 0..1 (render's 0.5 by default).
            cmap: An OpenCV colormap name (jet, viridis, inferno, magma, turbo, hot, ...);
                None for render's (jet; hot for input-resolution maps, drawn beside the
                photo, where ``alpha`` does not apply).
            k: Which explained class of a target=topk run (``table()["rank"]``), 0 if None.
        """
        from .overlays import run_overlay

        return run_overlay(self, row, map, alpha, cmap, k)

    # -- arrays -------------------------------------------------------------------------
    @property
    def ragged(self) -> bool:
        """Whether maps are stored per image in their own shape (``data.resize=null``)."""
        return bool(ragged_keys(self.file))

    @property
    def input_sizes(self) -> np.ndarray:
        """(N, 2) model input height, width of each image: its own size at native
        resolution (0 where the image could not be read), else ``image_size`` for all."""
        if "images/input_size" in self.file:
            return self.file["images/input_size"][:]
        side = int(self.file.attrs.get("image_size", 0))
        return np.full((len(self), 2), side, dtype=np.int32)

    def _array(self, group: str, layer: str,
               rows: Any = slice(None)) -> h5py.Dataset | np.ndarray | list[np.ndarray]:
        g = self.file.get(group)
        if (g is None or layer not in g or not isinstance(g[layer], h5py.Dataset)
                or is_scale(g[layer])):
            have = ([k for k in g if isinstance(g[k], h5py.Dataset) and not is_scale(g[k])]
                    if g is not None else [])
            raise StoreError(f"{self.path} has no {group}/{layer}; it has {have or 'none'} "
                             f"(method={self.method})")
        return g[layer] if rows is None else read_map(self.file, f"{group}/{layer}", rows)

    def cams(self, layer: str | None = None,
             rows: Any = slice(None)) -> np.ndarray | list[np.ndarray]:
        """The run's CAMs (N, h, w) at the layer's resolution, not normalized (Grad-CAM,
        Grad-CAM++, Score-CAM, ... whichever method made the file); a ragged run: one
        (h, w) array per image."""
        return self._array(self.method, layer or self.layers[0], rows)

    def weights(self, layer: str | None = None, rows: Any = slice(None)) -> np.ndarray:
        """The CAM's channel weights (N, C), for the methods that have them."""
        return self._array(f"{self.method}_weights", layer or self.layers[0], rows)

    def saliency(self, rows: Any = slice(None)) -> np.ndarray | list[np.ndarray]:
        """The input-resolution map (N, H, W) of an input-gradient method (saliency,
        SmoothGrad, Integrated Gradients, Guided Backprop); a ragged run: one (H, W) array
        per image, at that image's input size."""
        return self._array(self.method, "input", rows)

    def activations(self, layer: str | None = None,
                    rows: Any = slice(None)) -> np.ndarray | list[np.ndarray]:
        """Layer outputs (N, C, h, w), or (N, C) pooled; a ragged run: one (C, h, w) array
        per image."""
        return self._array("activations", layer or self.layers[0], rows)

    def dataset(self, group: str, layer: str) -> h5py.Dataset:
        """The h5py dataset itself, for slicing huge arrays without reading them whole (of
        a ragged map: its flat values; see docs/FORMAT.md for the row index)."""
        return self._array(group, layer, None)

    def to_xarray(self, group: str | None = None, layer: str | None = None) -> Any:
        """The arrays of one group (default: the run's method, e.g. ``gradcam``) as a labelled
        ``xarray.Dataset``: named dims (``image``, ``class``, ``h``, ``w``, ``channel``, ...),
        image paths as the ``image`` coordinate; with ``layer``, that variable alone.

        Read lazily (dask-backed when dask is installed). Needs the ``analysis`` extra
        (xarray, h5netcdf); the file itself needs nothing but h5py.
        """
        import importlib.util

        import xarray as xr

        group = group or self.method
        if group not in self.file:
            raise StoreError(f"{self.path} has no group {group!r}; it has {sorted(self.file)}")
        ragged = [k for k in ragged_keys(self.file) if k.split("/")[0] == group]
        if ragged:
            raise StoreError(f"{self.path}: {', '.join(ragged)} hold maps of different sizes "
                             "(data.resize=null), which one labelled array cannot; use "
                             "Run.cams / saliency / activations (one array per image)")
        chunks = {} if importlib.util.find_spec("dask") else None
        ds = xr.open_dataset(self.path, engine="h5netcdf", group=group, chunks=chunks)
        return ds if layer is None else ds[layer]

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        st = self.status
        return (f"Run({str(self.path)!r}, method={self.method}, model={self.model}, "
                f"layers={self.layers}, state={self.state}, images={len(st)}, "
                f"done={(st == DONE).sum()}, "
                f"failed={(st == FAILED).sum()}, pending={(st == PENDING).sum()})")


def load_run(path: str | os.PathLike) -> Run:
    """Open a results file (or a run directory holding ``results.h5``) for reading."""
    return Run(path)


def iter_runs(root: str | os.PathLike) -> Iterator[Path]:
    """Every ``results.h5`` below ``root`` (a sweep, a folder of runs), sorted."""
    yield from sorted(Path(root).rglob("results.h5"))


# States of a sweep job, in the order the report counts them.
JOB_STATES = ("done", "running", "pending", "incomplete", "failed", "timeout", "cancelled",
              "missing")
_SLURM_RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING")
_SLURM_WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED",
                  "SUSPENDED")
_SLURM_ENDED = {"CANCELLED": "cancelled", "TIMEOUT": "timeout", "DEADLINE": "timeout",
                "FAILED": "failed", "OUT_OF_MEMORY": "failed", "NODE_FAIL": "failed",
                "BOOT_FAIL": "failed"}
# Errors cli.main records when a job was stopped (a signal, Ctrl-C) rather than failed.
_INTERRUPTED = ("SystemExit", "KeyboardInterrupt")


def _override_key(item: str) -> tuple[str, str]:
    key, _, value = str(item).partition("=")
    return key.lstrip("+~"), value


class Sweep:
    """A Hydra multirun folder: one row per job in :attr:`table`, arrays on demand.

    The jobs are the sweep's job folders, the jobs its ``multirun.yaml`` asks for (so jobs
    that never started are listed, as ``missing``) and those in ``slurm_jobs.json`` (written
    by camsweep's SLURM launcher). ``table`` (a pandas DataFrame) has the job number, the
    overrides each job was given (one column per key; :attr:`swept` names the keys the sweep
    varies), its ``state``, the error of a job that did not finish, image counts and summary
    figures: mean top-1 probability, mean target score and, where images carry labels, top-1
    accuracy; for sweeps run on SLURM also ``slurm_job`` and ``slurm_state``.

    States: ``done`` (every image done), ``running`` (its writer holds the results file, or
    SLURM says so), ``pending`` (queued or requeued in SLURM), ``incomplete`` (stopped with
    images left: rerun to continue), ``failed``, ``timeout``, ``cancelled`` (SLURM's record),
    ``missing`` (never started). A sweep being written can be read: results files open with
    HDF5 locking off and show the images done so far.

    ``slurm``: ask SLURM (sacct, else squeue) for the live state of jobs the launcher has not
    seen end: None (default) asks when the sweep ran on SLURM, False never does.
    """

    def __init__(self, root: str | os.PathLike, slurm: bool | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"no sweep folder at {self.root}")
        from .cluster import read_jobs

        expected, self._swept = self._expected_jobs()
        self.slurm_jobs = read_jobs(self.root)
        folders = {d.name: d for d in self.root.iterdir() if (d / ".hydra").is_dir()}
        names = set(folders) | set(self.slurm_jobs) | {str(i) for i in range(len(expected))}
        if not names:
            raise StoreError(f"{self.root} holds no Hydra job folders (<n>/.hydra) and no "
                             "multirun.yaml listing jobs")
        live = self._live_states(slurm)
        rows = []
        self._overrides: list[dict[str, str]] = []  # per job, for :attr:`swept` without yaml
        for name in sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0,
                                                 n)):
            overrides = (self._folder_overrides(folders[name]) if name in folders else None)
            if overrides is None:
                overrides = (expected[int(name)] if name.isdigit() and int(name) < len(expected)
                             else self.slurm_jobs.get(name, {}).get("overrides", []))
            self._overrides.append(dict(_override_key(o) for o in overrides))
            rows.append(self._job_row(name, folders.get(name, self.root / name), overrides,
                                      live))
        import pandas as pd

        self.table = pd.DataFrame(rows)
        if not self.slurm_jobs:
            self.table = self.table.drop(columns=["slurm_job", "slurm_state"])

    # -- what the sweep is --------------------------------------------------------------------
    def _expected_jobs(self) -> tuple[list[list[str]], list[str] | None]:
        """The jobs ``multirun.yaml`` asks for (overrides, in job-number order) and the keys it
        sweeps, expanded as Hydra's basic sweeper does; ([], None) when there is no such file
        or another sweeper made the sweep (then only job folders say what ran)."""
        path = self.root / "multirun.yaml"
        if not path.is_file():
            return [], None
        try:
            from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
            from hydra.core.override_parser.overrides_parser import OverridesParser

            hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
            sweeper = hydra.get("sweeper") or {}
            args = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
            args += list((hydra.get("overrides") or {}).get("task") or [])
            overrides = OverridesParser.create().parse_overrides(args)
            swept = [_override_key(o.get_key_element())[0] for o in overrides
                     if o.is_sweep_override()]
            if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
                return [], swept
            batches = BasicSweeper.split_arguments(overrides, None)
        except Exception:  # an unusual sweep (e.g. a glob over config groups): folders only
            return [], None
        return [list(job) for batch in batches for job in batch], swept

    @property
    def swept(self) -> list[str]:
        """The keys the sweep varies, as written on its command line (``model``,
        ``model.target_layers``), from ``multirun.yaml``; without it, the override keys whose
        values differ between jobs."""
        if self._swept is not None:
            return list(dict.fromkeys(self._swept))
        keys = list(dict.fromkeys(k for job in self._overrides for k in job))
        return [k for k in keys if len({job.get(k) for job in self._overrides}) > 1]

    @staticmethod
    def _folder_overrides(job: Path) -> list[str] | None:
        path = job / ".hydra" / "overrides.yaml"
        return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.exists() else None

    def _live_states(self, slurm: bool | None) -> dict[str, str]:
        """SLURM's state of the jobs whose end the launcher has not recorded (id -> state)."""
        if slurm is False or not self.slurm_jobs:
            return {}
        from .cluster import slurm_states

        open_ids = [r.get("slurm_job_id", "") for r in self.slurm_jobs.values()
                    if r.get("outcome") == "submitted"]
        return slurm_states(open_ids) if open_ids else {}

    # -- one job --------------------------------------------------------------------------------
    def _job_row(self, name: str, job: Path, overrides: list[str],
                 live: dict[str, str]) -> dict[str, Any]:
        from .cluster import STATUS_FILE

        row: dict[str, Any] = {"job": int(name) if name.isdigit() else name}
        for item in overrides:
            key, value = _override_key(item)
            row[key] = value
        # Swept `model=`/`method=` columns keep their values for jobs without results.
        for key in ("method", "model", "layers"):
            row.setdefault(key, "")
        status_file = job / STATUS_FILE
        try:
            status = json.loads(status_file.read_text()) if status_file.exists() else {}
        except ValueError:  # being rewritten right now
            status = {}
        error = str(status.get("error", ""))
        interrupted = status.get("status") == "failed" and error.startswith(_INTERRUPTED)
        record = self.slurm_jobs.get(name, {})
        slurm_id = record.get("slurm_job_id", "")
        now = live.get(slurm_id, "")  # asked just now (jobs whose end is not recorded)
        slurm_state = now or record.get("slurm_state", "")
        row.update(state="missing", error="" if interrupted else error, n=0, done=0, failed=0,
                   pending=0, mean_prob=np.nan, mean_score=np.nan, accuracy=np.nan,
                   run_dir=str(job), slurm_job=slurm_id, slurm_state=slurm_state)
        results = job / "results.h5"
        writing = any(_writer_holds(p) for p in [results, *job.glob("results.shard-*.h5")])
        readable = False
        if results.exists():
            try:
                self._read_counts(results, row)
                readable = True
            except StoreError as e:
                if not writing:  # a file being created may not be readable yet
                    row.update(state="failed", error=str(e))
                    return row
        started = job.is_dir()
        if writing or now in _SLURM_RUNNING:
            row["state"] = "running"
        elif status.get("status") == "failed" and not interrupted:
            row["state"] = "failed"
        elif readable and row["pending"] == 0:
            row["state"] = "done"
        elif now in _SLURM_WAITING:
            row["state"] = "pending"
        elif started and record.get("outcome") in ("failed", "timeout", "cancelled"):
            row["state"] = record["outcome"]
            row["error"] = row["error"] or record.get("error", "")
        elif started and now in _SLURM_ENDED:  # ended, and the driver did not see it
            row["state"] = _SLURM_ENDED[now]
        elif readable:
            row["state"] = "incomplete"
        return row

    @staticmethod
    def _read_counts(results: Path, row: dict[str, Any]) -> None:
        with Run(results) as run:
            st = run.status
            done = st == DONE
            row.update(method=run.method, model=run.model, layers=",".join(run.layers),
                       n=len(st), done=int(done.sum()), failed=int((st == FAILED).sum()),
                       pending=int((st == PENDING).sum()))
            if done.any():
                cls, prob = run.predictions
                _, score = run.targets
                row["mean_prob"] = float(prob[done, 0].mean())
                row["mean_score"] = float(score[done].mean())
                labeled = done & (run.labels >= 0)
                if labeled.any():
                    row["accuracy"] = float((cls[labeled, 0] == run.labels[labeled]).mean())

    # -- the whole sweep ------------------------------------------------------------------------
    @property
    def failed(self) -> Any:
        """Rows of jobs that did not finish (any state but done)."""
        return self.table[self.table["state"] != "done"]

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
            if row["n"] > 0:
                with Run(Path(row["run_dir"]) / "results.h5") as run:
                    yield row, run

    def rerun_command(self) -> str:
        """The command that runs this sweep again in its folder, continuing unfinished jobs:
        the original overrides (from ``multirun.yaml``) and ``hydra.sweep.dir=<this folder>``."""
        import shlex

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

    def report(self, max_rows: int = 40) -> list[str]:
        """The sweep as lines of text: a count per state, a table of the jobs (the swept keys,
        state, images done, SLURM's record, the error) and, when jobs did not finish, the
        command that continues them. Done jobs are left out beyond ``max_rows`` jobs."""
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
            cells.append((cell, str(row["error"] or "")))
        widths = [max(len(c) for c in col) for col in zip(head, *(c for c, _ in cells),
                                                          strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        errors = any(error for _, error in cells)
        lines.append(("  " + fmt.format(*head) + ("  error" if errors else "")).rstrip())
        for cell, error in cells:
            line = "  " + fmt.format(*cell)
            lines.append((line + ("  " + error[:160] if error else "")).rstrip())
        if len(shown) < len(t):
            lines.append(f"  ... and {len(t) - len(shown)} more jobs, all done")
        unfinished = len(t) - counts.get("done", 0)
        if unfinished:
            lines.append(f"{unfinished} job{'s' * (unfinished != 1)} did not finish; the "
                         "same sweep run again in this folder continues "
                         f"{'them' if unfinished != 1 else 'it'} (done jobs are kept):")
            lines.append("  " + self.rerun_command())
        return lines

    def images(self, **kw: Any) -> Any:
        return sweep_table(self, **kw)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Sweep({str(self.root)!r}, jobs={len(self)}, {self.counts()})"


def _writer_holds(results: Path) -> bool:
    """Whether a live process is writing ``results`` (its writer lock is held). A reader
    that may not open the lock file (someone else's sweep, read-only) cannot tell: no."""
    try:
        return lock_is_held(results)
    except OSError:  # a lock file we may not even read
        return False


def load_sweep(root: str | os.PathLike, slurm: bool | None = None) -> Sweep:
    """Open a multirun folder (``multirun/<date>/<time>``) as one table over its jobs; also
    while it runs (see :class:`Sweep` for the states, and ``slurm``)."""
    return Sweep(root, slurm=slurm)
