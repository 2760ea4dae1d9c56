"""What the explorer serves: a run or a sweep opened read-only, its one table, and the
per-image reads behind the detail view and the overlays. Requests name images by table
coordinates (job, row, map), checked here against what the run lists, so no request ever
names a file. No torch."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from ..errors import CamsweepError, StoreError, unknown
from ..pictures import pixel_box
from ..render import load_photo
from ..store import (
    ACTIVATIONS,
    DONE,
    STATUS_NAMES,
    categories,
    open_results,
    read_column,
    read_map,
    stored_maps,
)
from ..store.metrics import read_metrics
from . import draw
from .data import image_table

log = logging.getLogger(__name__)

PHOTO_SIDE = 1024  # photos are decoded at most this large: the page shows them smaller
FIXED = ("row", "path", "file", "label", "label_name", "pred", "pred_name", "correct",
         "target", "score", "status", "error", "method", "layer", "map", "job")


class RequestError(CamsweepError):
    """A request the explorer refuses, with its HTTP status and a one-line reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class LRU:
    """A small thread-safe least-recently-used cache of computed values."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any, make: Any) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


@dataclass
class Job:
    """One results file: its folder, its open file and the per-image facts it lists."""

    name: str  # "" for a lone run
    run_dir: Path
    file: h5py.File
    maps: dict[str, Any]  # key -> MapInfo (layer and input maps)
    status: np.ndarray
    state: str


class Source:
    """A run folder (``results.h5``) or a multirun folder, opened for reading only.

    Raises:
        StoreError: No run or sweep there, or a damaged results file (one line).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.sweep = not (self.root / "results.h5").is_file()
        if self.sweep and not self.root.is_dir():
            raise StoreError(f"no run or sweep at {self.root}: give run_dir=<a run folder with "
                             "results.h5, or a multirun folder>")
        self.warnings: list[str] = []
        self.jobs = self._open_jobs()
        try:
            frame = image_table(self.root, self.sweep)
        except StoreError as e:  # stale or damaged metrics: browse the maps without them
            if "metrics" not in str(e):
                raise
            self.warnings.append(str(e))
            frame = image_table(self.root, self.sweep, metrics=False)
        if "job" not in frame.columns:
            frame.insert(0, "job", "")
        frame["job"] = frame["job"].astype(str)
        # What the queries compare: status as text, correct as 1.0 / 0.0 / NaN (whatever
        # dtype the table gives: bool, nullable boolean, float).
        frame["status"] = frame["status"].astype(str)
        frame["correct"] = frame["correct"].to_numpy(dtype=np.float64, na_value=np.nan)
        self.frame = frame.reset_index(drop=True)
        self.columns = list(self.frame.columns)
        self.numeric = [c for c in self.columns if c not in FIXED
                        and pd.api.types.is_float_dtype(self.frame[c])]
        self.texts = [c for c in self.columns if c not in self.numeric]
        self.map_names = list(dict.fromkeys(self.frame["map"].astype(str)))
        # Ties of a sort fall in (job, row, map) order; each column's sort key is made once.
        by = self.frame[["job", "row", "map"]].assign(n=np.arange(len(self.frame)))
        self.tie = np.empty(len(by), np.int64)
        self.tie[by.sort_values(["job", "row", "map"], kind="stable")["n"].to_numpy()] = \
            np.arange(len(by))
        self._keys: dict[str, np.ndarray] = {}
        self._photos = LRU(64)
        self.overlays = LRU(1024)

    def _open_jobs(self) -> dict[str, Job]:
        if not self.sweep:
            return {"": self._job("", self.root)}
        from ..results import load_sweep

        sweep = load_sweep(self.root, slurm=False)
        jobs = {}
        for _, row in sweep.table.iterrows():
            if row["n"] > 0:
                jobs[str(row["job"])] = self._job(str(row["job"]), Path(row["run_dir"]))
        if not jobs:
            raise StoreError(f"{self.root} is a sweep with no results yet: "
                             + "; ".join(sweep.report()[:1]))
        return jobs

    def _job(self, name: str, run_dir: Path) -> Job:
        # No chunk cache: rows are read once each (pictures are cached), and damage to the
        # file while it is served shows at the next read.
        f = open_results(run_dir / "results.h5", rdcc_nbytes=0)
        status = read_column(f, "images/status")
        from ..locks import lock_is_held

        state = "done"
        try:
            if lock_is_held(run_dir / "results.h5"):
                state = "running"
        except OSError:
            pass
        pending = int((status == 0).sum())
        where = f"job {name}" if name else "this run"
        if state == "running":
            self.warnings.append(f"{where} is being written ({int((status == DONE).sum())} of "
                                 f"{len(status)} images done): restart explore to see the rest")
        elif pending:
            self.warnings.append(f"{where} was interrupted with {pending} images pending: "
                                 "rerun the same command to finish it")
        maps = {m.key: m for m in stored_maps(f) if m.kind != ACTIVATIONS}
        return Job(name, run_dir, f, maps, status, state)

    def sort_key(self, column: str) -> np.ndarray:
        """Float64 values of ``column`` that sort as it does (text: its rank), NaN for
        missing, so that any sort is one ``np.lexsort``."""
        if column not in self._keys:
            values = self.frame[column]
            if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
                key = values.to_numpy(dtype=np.float64, na_value=np.nan)
            else:
                codes, _ = pd.factorize(values.astype(str), sort=True)
                key = codes.astype(np.float64)
            self._keys[column] = key
        return self._keys[column]

    def close(self) -> None:
        for job in self.jobs.values():
            job.file.close()

    # -- checking what a request names ------------------------------------------------------
    def job(self, name: str | None) -> Job:
        name = "" if name is None else name
        if name not in self.jobs:
            if not self.sweep:
                raise RequestError(f"job {name!r}: this is one run, not a sweep; leave job out")
            raise RequestError(unknown("job", name, list(self.jobs), keep_order=True), 404)
        return self.jobs[name]

    def row(self, job: Job, value: str | None, done: bool = True) -> int:
        row = parse_int("row", value, 0, len(job.status) - 1)
        if done and job.status[row] != DONE:
            state = STATUS_NAMES[int(job.status[row])]
            why = str(read_column(job.file, "images/error", row)) if state == "failed" else (
                "not computed yet" if job.state == "running" else "not computed: the run "
                "stopped before it")
            raise RequestError(f"row {row} is {state}: {why}", 409)
        return row

    def map_of(self, job: Job, key: str | None) -> Any:
        if key is None:
            key = next(iter(job.maps), "")
        if key not in job.maps:
            raise RequestError(unknown("map", key, list(job.maps), keep_order=True), 404)
        return job.maps[key]

    # -- pictures -----------------------------------------------------------------------------
    def photo(self, job: Job, row: int) -> tuple[np.ndarray | None, np.ndarray, tuple[int, int]]:
        """The photo (None when gone), the box in its pixels and the box's size."""
        def make() -> tuple[np.ndarray | None, np.ndarray, tuple[int, int]]:
            f = job.file
            path = str(read_column(f, "images/path", row))
            size = read_column(f, "images/size", row)
            box = read_column(f, "images/box", row) if "images/box" in f else np.full(4, np.nan)
            image, shown = load_photo(path, size, box, max_side=PHOTO_SIDE)
            y0, x0, y1, x1 = pixel_box(box, *(int(v) for v in size))  # for a photo gone
            return image, shown, (y1 - y0, x1 - x0)
        return self._photos.get((job.name, row), make)

    def overlay(self, job: Job, row: int, info: Any, alpha: float, cmap: str, size: int,
                fmt: str) -> bytes:
        def make() -> bytes:
            photo, box, box_hw = self.photo(job, row)
            try:
                value = np.asarray(read_map(job.file, info.key, row), dtype=np.float32)
            except (OSError, ValueError, KeyError) as e:
                raise StoreError(f"{job.run_dir / 'results.h5'} is damaged: cannot read "
                                 f"/{info.key} row {row}: {str(e).splitlines()[0][:120]}") from e
            value = value[0] if value.ndim == 3 else value  # target=topk: the first class
            picture = draw.overlay(photo, box, value, info.kind, alpha, cmap, box_hw)
            return draw.encode(draw.shrink(picture, size), fmt)
        return self.overlays.get((job.name, row, info.key, alpha, cmap, size, fmt), make)

    def photo_bytes(self, job: Job, row: int, crop: bool, size: int) -> bytes:
        photo, box, _ = self.photo(job, row)
        if photo is None:
            raise RequestError(f"the photo of row {row} cannot be read (moved or deleted?)",
                               404)
        if crop:
            y0, x0, y1, x1 = pixel_box(box, *photo.shape[:2])
            photo = photo[y0:y1, x0:x1]
        return draw.encode(draw.shrink(photo, size), "jpeg")

    # -- one image in detail ------------------------------------------------------------------
    def detail(self, job: Job, row: int) -> dict[str, Any]:
        f = job.file
        t = self.frame
        mine = t[(t["job"] == job.name) & (t["row"] == row)]
        if mine.empty:
            raise RequestError(f"row {row} is not in the table", 404)
        first = mine.iloc[0]
        cats = categories(f)
        cls = read_column(f, "predictions/class", row)
        prob = read_column(f, "predictions/prob", row)
        done = job.status[row] == DONE
        topk = [{"class": int(c), "name": cats[c] if 0 <= c < len(cats) else "",
                 "prob": float(p)} for c, p in zip(cls, prob, strict=True)] if done else []
        same = t[t["path"] == first["path"]]  # the same image in every job of a sweep
        views = []
        curves = {name: self._curves(self.jobs[name], int(r))
                  for name, r in same[["job", "row"]].drop_duplicates().itertuples(index=False)}
        for rec in same.to_dict("records"):
            views.append({
                "job": rec["job"], "row": int(rec["row"]), "map": rec["map"],
                "method": rec["method"], "layer": rec["layer"], "status": rec["status"],
                "swept": {k: rec[k] for k in self.swept()},
                "values": {k: _num(rec[k]) for k in self.numeric},
                "curves": curves[rec["job"]].get(rec["map"], []),
            })
        facts = {k: _plain(first[k]) for k in self.texts if k not in ("map", "method", "layer")}
        return {**facts, "size": [int(v) for v in read_column(f, "images/size", row)], "topk": topk,
                "views": views}

    def swept(self) -> list[str]:
        return [c for c in self.texts if c not in FIXED]

    def _curves(self, job: Job, row: int) -> dict[str, list[dict[str, Any]]]:
        """Every per-image curve evaluate stored for this row, by map: name, x, y, axes."""
        out: dict[str, list[dict[str, Any]]] = {}
        try:
            with read_metrics(job.run_dir, job.file) as g:
                if g is None:
                    return out
                road = json.loads(str(g.attrs.get("road_removed_percent", "[]")) or "[]")
                for key in job.maps:
                    if key not in g:
                        continue
                    for name, ds in g[key].items():
                        dims = json.loads(ds.attrs.get("dims", "[]") or "[]")
                        if not isinstance(ds, h5py.Dataset) or ds.ndim < 2 or dims[-1] in (
                                "class", "image"):
                            continue
                        y = np.asarray(ds[row], dtype=np.float64)
                        y = y[0] if y.ndim == 2 else y  # target=topk: the first class
                        out.setdefault(key, []).append({
                            "name": name, "xlabel": dims[-1], "x": _xs(dims[-1], len(y), road),
                            "y": [_num(v) for v in y],
                            "description": str(ds.attrs.get("description", ""))})
        except StoreError as e:
            log.info("explore: no curves for job %r: %s", job.name, e)
        return out


def _xs(axis: str, n: int, road: list[float]) -> list[float]:
    if axis == "step":  # deletion / insertion: share of the pixels changed
        return [i / max(1, n - 1) for i in range(n)]
    if axis == "removed_percent" and len(road) == n:
        return [float(v) / 100 for v in road]
    return [float(i) for i in range(n)]


def _num(v: Any) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _num(v)
    return v if isinstance(v, (int, bool)) or v is None else str(v)


def parse_int(name: str, value: str | None, lo: int, hi: int, default: int | None = None) -> int:
    """An integer query parameter in [lo, hi], or a RequestError saying what is valid."""
    if value is None or value == "":
        if default is None:
            raise RequestError(f"{name} is required: an integer from {lo} to {hi}")
        return default
    try:
        number = int(value, 10)
    except ValueError:
        raise RequestError(f"{name}={value[:40]!r} is not an integer (valid: {lo} to {hi})"
                           ) from None
    if not lo <= number <= hi:
        raise RequestError(f"{name}={number} is out of range (valid: {lo} to {hi})")
    return number


def parse_float(name: str, value: str | None, lo: float, hi: float, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise RequestError(f"{name}={value[:40]!r} is not a number (valid: {lo} to {hi})"
                           ) from None
    if not lo <= number <= hi:  # NaN fails this too
        raise RequestError(f"{name}={value[:40]} is out of range (valid: {lo} to {hi})")
    return number
