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
from .store import DONE, FAILED, PENDING, STATUS_NAMES, attr_list, is_scale, open_results
from .store import categories as stored_categories


class Run:
    """One results file. Use as a context manager, or call :meth:`close`.

    Row ``i`` of every array belongs to image ``paths[i]``; rows whose ``status`` is not
    done hold no valid values, and the ``done_only=True`` accessors drop them.
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
    def config(self) -> dict[str, Any]:
        """The run's resolved config, read as plain data (a safe YAML load: never code)."""
        try:
            value = yaml.safe_load(str(self.file.attrs.get("config", "")))
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StoreError(f"{self.path} is damaged: its stored config is not plain YAML "
                             f"({first})") from e
        if not isinstance(value, dict):
            raise StoreError(f"{self.path} is damaged: its stored config is not a mapping")
        return value

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

    def table(self) -> Any:
        """A pandas DataFrame: one row per image with path, label, status, top-1, target."""
        import pandas as pd

        cls, prob = self.predictions
        tcls, tscore = self.targets
        if tcls.ndim == 2:  # target=topk: the table shows the first explained class
            tcls, tscore = tcls[:, 0], tscore[:, 0]
        cats = self.categories
        return pd.DataFrame({
            "path": self.paths, "label": self.labels,
            "status": pd.Categorical.from_codes(self.status, list(STATUS_NAMES)),
            "error": self.errors, "pred": cls[:, 0], "prob": prob[:, 0],
            "pred_name": [cats[c] if 0 <= c < len(cats) else "" for c in cls[:, 0]],
            "target": tcls, "score": tscore,
        })

    # -- arrays -------------------------------------------------------------------------
    def _array(self, group: str, layer: str, rows: Any = slice(None)) -> h5py.Dataset | np.ndarray:
        g = self.file.get(group)
        if g is None or layer not in g or is_scale(g[layer]):
            have = [k for k in g if not is_scale(g[k])] if g is not None else []
            raise StoreError(f"{self.path} has no {group}/{layer}; it has {have or 'none'} "
                             f"(method={self.method})")
        return g[layer] if rows is None else g[layer][rows]

    def cams(self, layer: str | None = None, rows: Any = slice(None)) -> np.ndarray:
        """The run's CAMs (N, h, w) at the layer's resolution, not normalized (Grad-CAM,
        Grad-CAM++, Score-CAM, ... whichever method made the file)."""
        return self._array(self.method, layer or self.layers[0], rows)

    def weights(self, layer: str | None = None, rows: Any = slice(None)) -> np.ndarray:
        """The CAM's channel weights (N, C), for the methods that have them."""
        return self._array(f"{self.method}_weights", layer or self.layers[0], rows)

    def saliency(self, rows: Any = slice(None)) -> np.ndarray:
        """The input-resolution map (N, H, W) of an input-gradient method (saliency,
        SmoothGrad, Integrated Gradients, Guided Backprop)."""
        return self._array(self.method, "input", rows)

    def activations(self, layer: str | None = None, rows: Any = slice(None)) -> np.ndarray:
        return self._array("activations", layer or self.layers[0], rows)

    def dataset(self, group: str, layer: str) -> h5py.Dataset:
        """The h5py dataset itself, for slicing huge arrays without reading them whole."""
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
    yield from sorted(Path(root).rglob("results.h5"))


class Sweep:
    """A Hydra multirun folder: one row per job in :attr:`table`, arrays on demand.

    ``table`` (a pandas DataFrame) has the job number, the overrides each job was given
    (swept parameters as columns), its state (done / incomplete / failed / missing), the
    error of a failed job, image counts and summary figures: mean top-1 probability, mean
    target score and, where images carry labels, top-1 accuracy.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"no sweep folder at {self.root}")
        jobs = sorted((d for d in self.root.iterdir() if (d / ".hydra").is_dir()),
                      key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0,
                                     d.name))
        if not jobs:
            raise StoreError(f"{self.root} holds no Hydra job folders (<n>/.hydra)")
        self.table = self._table(jobs)

    @staticmethod
    def _job_row(job: Path) -> dict[str, Any]:
        row: dict[str, Any] = {"job": int(job.name) if job.name.isdigit() else job.name}
        overrides = job / ".hydra" / "overrides.yaml"
        for item in yaml.safe_load(overrides.read_text()) or [] if overrides.exists() else []:
            key, _, value = str(item).partition("=")
            row[key.lstrip("+~")] = value
        status_file = job / "camsweep.json"
        status = json.loads(status_file.read_text()) if status_file.exists() else {}
        results = job / "results.h5"
        # Swept `model=`/`method=` columns keep their values for jobs without results.
        for key in ("method", "model", "layers"):
            row.setdefault(key, "")
        row.update(state="missing", error=status.get("error", ""), n=0, done=0, failed=0,
                   pending=0, mean_prob=np.nan, mean_score=np.nan, accuracy=np.nan,
                   run_dir=str(job))
        if status.get("status") == "failed":
            row["state"] = "failed"
        if results.exists():
            try:
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
                if row["state"] != "failed":
                    row["state"] = "done" if row["pending"] == 0 else "incomplete"
            except StoreError as e:
                row.update(state="failed", error=str(e))
        return row

    def _table(self, jobs: list[Path]) -> Any:
        import pandas as pd

        return pd.DataFrame([self._job_row(j) for j in jobs])

    @property
    def failed(self) -> Any:
        """Rows of jobs that did not finish (failed, incomplete or without results)."""
        return self.table[self.table["state"] != "done"]

    def run(self, job: int | str) -> Run:
        """Open one job's results, by job number."""
        rows = self.table[self.table["job"] == job]
        if rows.empty:
            raise StoreError(f"no job {job!r} in {self.root}; jobs: {list(self.table['job'])}")
        return Run(Path(rows.iloc[0]["run_dir"]) / "results.h5")

    def runs(self) -> Iterator[tuple[Any, Run]]:
        """(table row, opened Run) for every job with results; each Run closes after its turn."""
        for _, row in self.table.iterrows():
            if row["state"] in ("done", "incomplete"):
                with Run(Path(row["run_dir"]) / "results.h5") as run:
                    yield row, run

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        counts = self.table["state"].value_counts().to_dict()
        return f"Sweep({str(self.root)!r}, jobs={len(self)}, {counts})"


def load_sweep(root: str | os.PathLike) -> Sweep:
    """Open a multirun folder (``multirun/<date>/<time>``) as one table over its jobs."""
    return Sweep(root)
