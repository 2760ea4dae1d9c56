"""The metrics file, ``<run_dir>/metrics.h5``: what ``stage=evaluate`` writes and how its
readers (report, tables, the stage's own summary) read it. No torch.

``results.h5`` is never written after extraction: the metrics live in a file of their own.
Its datasets are the outputs the metric registry declares (:mod:`pipeline.metrics.declared`,
:func:`pipeline.metrics.registry.layout`), float32, NaN where not evaluated, each with
``dims`` and ``description`` attributes:

- at the root, one per image: ``score`` (the target's score of the re-loaded image),
  ``confidence`` (Average Drop's Y), ``boxes`` (the pointing game's ground truth, original
  image pixels), as the chosen metrics declare;
- ``/<group>/<layer>/<output>`` per scored map (``gradcam/layer4/deletion_auc``, ...); each
  map group carries its ``layer``.

Every axis is a dimension scale (netCDF-4 conventions) in the group of its datasets: the
``image`` coordinate holds the image paths, the others their coordinates (``step``: the
fraction of pixels changed, ``removed_percent``, ``randomized_layer``: unit names, ``class``:
the rank of the class explained, ``box``, ``corner``), so
``xarray.open_dataset(path, engine="h5netcdf", group="gradcam/layer4")`` is labelled.

Root attributes: ``format`` = ``camsweep-metrics``, ``format_version`` (2; version 1 files,
without scales, ``confidence`` and ``boxes``, stay readable), the identity of the results
file the numbers were computed from (``results_run_id``, ``results_created``), ``created``,
``settings`` (JSON), ``metrics``, ``maps``, ``steps``, ``score``, ``sanity_layers``,
``road_removed_percent``, ``n_evaluated`` (images with every metric written),
``score_check_max_abs_diff``, ``camsweep_version``.

Crash safety: rows are collected batch by batch in a side file (``.metrics-partial.h5``,
which lets an interrupted evaluation resume) whose space is allocated when it is created,
so writes change raw data only. A side file is reused only when it checks out completely
(same results identity, settings and layout, every dataset read back); anything else is
rebuilt. The finished file is built under a temporary name and renamed into place
(:func:`pipeline.store.atomic.atomic_output`). A metrics file whose identity is not that of
the current ``results.h5`` is stale: readers refuse it with one line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from . import STR, attr_list, identity, open_results, walk, write_error
from .atomic import atomic_output

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "LEGACY_GROUP", "METRICS_FILE", "PARTIAL", "Layout",
           "MapSummary", "Partial", "existing", "install", "label", "read_image_metrics",
           "read_metric_arrays", "read_metrics", "summarize", "summarize_run"]

METRICS_FILE = "metrics.h5"
PARTIAL = ".metrics-partial.h5"
FORMAT = "camsweep-metrics"
FORMAT_VERSION = 2
LEGACY_GROUP = "metrics"  # inside results.h5, written by camsweep before metrics.h5
_GROUP = "metrics"  # inside the partial file
_NO_VARIABLE = "This is a netCDF dimension but not a netCDF variable.%10d"

# Dataset path -> (per-image shape, dims, description, dtype): registry.layout's.
Layout = dict[str, tuple[tuple[int, ...], list[str], str, str]]


def _room(path: Path, need: int) -> None:
    """One line, before writing, when ``need`` bytes do not fit the disk or the process's
    file-size limit (a full disk inside HDF5 gives tracebacks, or worse, at close)."""
    free = shutil.disk_usage(path.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if need > free:
        raise StoreError(f"not enough disk space for {path} (needs {need / 1e6:.1f} MB, "
                         f"{free / 1e6:.1f} MB free); free space or use another run_dir, "
                         "then rerun: finished rows are kept")
    if limit != resource.RLIM_INFINITY and need > limit:
        raise StoreError(f"{path} needs {need / 1e6:.1f} MB, above this process's file-size "
                         f"limit ({limit / 1e6:.1f} MB, ulimit -f); raise it and rerun")


def _bytes(spec: Layout, n: int) -> int:
    """What a file of this layout takes, with room for HDF5's own structures."""
    data = sum(n * max(1, int(np.prod(shape, dtype=np.int64))) * np.dtype(dt).itemsize
               for shape, _, _, dt in spec.values())
    return int(data * 1.1) + n * 512 + 256 * 1024


# -- the side file ----------------------------------------------------------------------------

class Partial:
    """The side file that collects metrics batch by batch, so an evaluation resumes.

    It is reused only when made for the same results file, settings and layout and when it
    reads back whole (:meth:`problem`); otherwise it is rebuilt. ``initial`` arrays
    (per-image data known before the loop, e.g. ``boxes``) are written at creation.
    """

    def __init__(self, path: Path, n: int, settings: dict[str, Any], results: dict[str, str],
                 spec: Layout, initial: Mapping[str, np.ndarray] | None = None) -> None:
        self.path, self.n, self.spec = path, n, spec
        self.keys = {"settings": json.dumps(settings, sort_keys=True),
                     "layout": json.dumps(spec, sort_keys=True),
                     "results_run_id": results["run_id"], "results_created": results["created"]}
        if path.exists():
            why = self.problem()
            if why:
                log.warning("evaluate: rebuilding %s (%s)", path, why)
                path.unlink()
        if not path.exists():
            self._create(dict(initial or {}))
        try:
            self.file = h5py.File(path, "r+", locking=False)
        except OSError as e:
            raise write_error(path, e, "; delete it and rerun") from e

    def problem(self) -> str:
        """Why the side file at :attr:`path` cannot be reused ("" when it can): another
        results file, settings or layout, or a damaged file (any part fails to read)."""
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                for key, value in self.keys.items():
                    if f.attrs.get(key) != value:
                        return ("made for an earlier results.h5" if key.startswith("results")
                                else f"other {key}")
                status = f["status"][:]
                if status.shape != (self.n,) or not np.isin(status, (0, 1)).all():
                    return "damaged: status"
                for key, (shape, _, _, dtype) in self.spec.items():
                    ds = f[_GROUP][key]
                    if ds.shape != (self.n, *shape) or ds.dtype != np.dtype(dtype):
                        return f"damaged: {key} {ds.shape}"
                    ds[:]  # every chunk reads back (a damaged file can open yet not read)
        except Exception as e:  # noqa: BLE001  (whatever HDF5 raises, the file is not reused)
            return f"damaged: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return ""

    def _create(self, initial: dict[str, np.ndarray]) -> None:
        _room(self.path, _bytes(self.spec, self.n))
        try:
            with atomic_output(self.path) as tmp, h5py.File(tmp, "w", locking=False) as f:
                f.attrs.update(self.keys)
                _allocated(f, "status", (self.n,), np.uint8, 0)
                g = f.create_group(_GROUP)
                for key, (shape, dims, description, dtype) in self.spec.items():
                    ds = _allocated(g, key, (self.n, *shape), dtype, np.nan)
                    ds.attrs["dims"] = json.dumps(dims)
                    ds.attrs["description"] = description
                    if key in initial:
                        ds[...] = initial[key]
        except (OSError, RuntimeError) as e:
            raise write_error(self.path, e) from e

    def pending(self, rows: np.ndarray) -> np.ndarray:
        return rows[self.file["status"][:][rows] == 0]

    def done(self) -> np.ndarray:
        """Rows whose every metric is written."""
        return self.file["status"][:] == 1

    def write(self, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        g = self.file[_GROUP]
        try:
            for key, value in arrays.items():
                g[key][rows] = value  # rows ascending (h5py's fancy indexing)
            self.file.flush()  # values reach the file before the status that vouches for them
            self.file["status"][rows] = 1
            self.file.flush()
        except (OSError, RuntimeError) as e:
            raise write_error(self.path, e, "; rerun to continue") from e

    def close(self) -> None:
        """Close; after a failure (a full disk) HDF5 may fail to close too: the file is
        checked before any reuse, so that second error is logged, not raised."""
        if not self.file.id.valid:
            return
        try:
            self.file.close()
        except Exception as e:  # noqa: BLE001
            log.debug("closing %s: %s", self.path, e)


def _allocated(g: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any,
               fill: float) -> h5py.Dataset:
    """A dataset whose chunks are allocated (and filled) now: later writes change raw data
    only, never HDF5's structures, and need no new disk space."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    dt = np.dtype(dtype)
    dcpl.set_fill_value(np.array(fill, dtype=dt))
    per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)))
    chunks = (max(1, min(shape[0], 4096 // per_row)), *shape[1:]) if shape[0] else None
    return g.create_dataset(name, shape=shape, dtype=dt, chunks=chunks, dcpl=dcpl)


# -- the finished file ------------------------------------------------------------------------

def install(partial: Path, target: Path, results: dict[str, str], attrs: dict[str, Any],
            paths: Sequence[str], coords: Mapping[str, Sequence[Any]]) -> None:
    """Build the metrics file from a finished partial file under a temporary name, label
    its axes (:func:`label`), flush it to disk and rename it over ``target``; then drop the
    partial file. A failure (a full disk) is one line and keeps the partial file."""
    # The copy, plus the image paths once per labelled group (the root and each map).
    text = sum(len(str(p).encode()) + 16 for p in paths) * (len(attrs.get("maps", [])) + 1)
    _room(target, partial.stat().st_size + text + 256 * 1024)
    try:
        with atomic_output(target) as tmp, h5py.File(partial, "r", locking=False) as src, \
                    h5py.File(tmp, "w", locking=False) as dst:
            for name in src[_GROUP]:
                src.copy(src[_GROUP][name], dst, name=name)
            dst.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                              "results_run_id": results["run_id"],
                              "results_created": results["created"]})
            for key, value in attrs.items():
                dst.attrs[key] = (json.dumps(value) if isinstance(value, (list, dict))
                                  else value)
            for key in attr_list(attrs.get("maps", [])):  # map groups name their layer
                if key in dst:
                    dst[key].attrs["layer"] = key.rsplit("/", 1)[-1]
            label(dst, paths, coords)
    except (OSError, RuntimeError) as e:
        raise write_error(target, e, f"; the rows computed so far stay in {partial}, rerun "
                                     "to finish") from e
    partial.unlink()


def label(f: h5py.File, paths: Sequence[str], coords: Mapping[str, Sequence[Any]]) -> None:
    """Name every axis with a dimension scale in the group of its datasets: ``image`` (the
    paths) and each other dim with its coordinate values from ``coords``."""
    groups: dict[str, list[h5py.Dataset]] = {}
    for key, ds in walk(f):
        groups.setdefault(key.rsplit("/", 1)[0] if "/" in key else "", []).append(ds)
    for name, members in groups.items():
        g = f[name] if name else f
        scales: dict[str, h5py.Dataset] = {}
        for ds in members:
            for axis, dim in enumerate(json.loads(ds.attrs["dims"])):
                if dim not in scales:
                    values = paths if dim == "image" else coords.get(dim)
                    if values is None or len(values) != ds.shape[axis]:
                        scales[dim] = g.create_dataset(dim, shape=(ds.shape[axis],), dtype="f4")
                        scales[dim].make_scale(_NO_VARIABLE % ds.shape[axis])
                    else:
                        text = any(isinstance(v, str) for v in values)
                        scales[dim] = g.create_dataset(
                            dim, data=np.array(values, dtype=object if text else None),
                            dtype=STR if text else None)
                        scales[dim].make_scale(dim)
                ds.dims[axis].attach_scale(scales[dim])


# -- reading ----------------------------------------------------------------------------------

def existing(path: Path, results: dict[str, str]) -> tuple[str, str] | None:
    """What a metrics file at ``path`` is: None when there is none, else (state, created)
    with state ``current`` (of this results file), ``stale`` (of an earlier one) or
    ``unknown`` (not a metrics file camsweep can read)."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != FORMAT:
                return "unknown", "?"
            created = str(f.attrs.get("created", "?"))
            return ("current" if _identity(f) == results else "stale"), created
    except OSError:
        return "unknown", "?"


def settings_of(path: Path) -> tuple[dict[str, Any], int]:
    """The evaluate settings a metrics file was computed with and how many images it holds
    (-1 when it does not say): what decides whether a job is evaluated again."""
    with h5py.File(path, "r", locking=False) as f:
        return json.loads(f.attrs.get("settings", "{}")), int(f.attrs.get("n_evaluated", -1))


def _identity(f: h5py.File) -> dict[str, str]:
    return {"run_id": str(f.attrs.get("results_run_id", "")),
            "created": str(f.attrs.get("results_created", ""))}


def _declared_missing(g: h5py.Group, maps: list[str], version: int) -> str | None:
    """The first output the file's metrics declare that is not in it (a dataset deleted
    by hand, a truncated copy), or None."""
    from ..metrics.registry import METRICS

    names = [m for m in attr_list(g.attrs.get("metrics", "[]")) if m in METRICS]
    for metric in names:
        for o in METRICS[metric].outputs:
            if o.since > version:
                continue
            for key in ([f"{m}/{o.name}" for m in maps] if o.per_map else [o.name]):
                if key not in g or not isinstance(g[key], h5py.Dataset):
                    return f"{key} (an output of metric {metric!r})"
    return None


def _check(g: h5py.Group, n: int, where: str, run_dir: Path, version: int,
           missing_ok: bool = False) -> None:
    """What the readers rely on: the map list parses, every listed map has its group, every
    output the file's metrics declare is there, and every dataset has one row per image."""
    again = f"rerun stage=evaluate run_dir={run_dir} evaluate.overwrite=true"
    try:
        maps = attr_list(g.attrs.get("maps"))
        missing = [key for key in maps if key not in g or not isinstance(g[key], h5py.Group)]
        if missing or "score" not in g:
            raise StoreError(f"{where} is damaged: {', '.join(missing) or 'score'} missing; "
                             f"{again}")
        gone = None if missing_ok else _declared_missing(g, maps, version)
        if gone:
            raise StoreError(f"{where} is damaged: {gone} is missing; {again}")
        bad = [f"{k} {v.shape}" for k, v in walk(g) if not v.shape or v.shape[0] != n]
        if bad:
            raise StoreError(f"{where} is damaged: {bad[0]} has not {n} rows; {again}")
    except StoreError:
        raise
    except (KeyError, OSError, ValueError, TypeError) as e:
        raise StoreError(f"{where} is damaged: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}") from e


@contextmanager
def read_metrics(run_dir: str | os.PathLike, results: h5py.File,
                 missing_ok: bool = False) -> Iterator[h5py.Group | None]:
    """The metrics of a run whose results file is open as ``results`` (opened through
    :func:`pipeline.store.open_results`), checked: ``metrics.h5``'s root group when it
    belongs to this results file, the ``/metrics`` group of an older results file (read
    only), or None when the run has no metrics.

    ``missing_ok`` lets a declared output be missing (the report shows it as missing).

    Raises:
        StoreError: ``metrics.h5`` is stale (computed from an earlier ``results.h5``),
            damaged (a declared output missing, rows missing), or of a newer version.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    n = int(results["images/status"].shape[0])
    if not path.exists():
        legacy = results.get(LEGACY_GROUP)
        if isinstance(legacy, h5py.Group):
            _check(legacy, n, f"{results.filename}:/{LEGACY_GROUP}", run_dir, 1, missing_ok)
            yield legacy
        else:
            yield None
        return
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise StoreError(f"cannot open {path} as HDF5 ({str(e).splitlines()[0]}); rerun "
                         f"stage=evaluate run_dir={run_dir}") from e
    try:
        if f.attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not a camsweep metrics file (format="
                             f"{f.attrs.get('format')!r}); move it away and rerun "
                             f"stage=evaluate run_dir={run_dir}")
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise StoreError(f"{path} has format_version {version}, newer than this camsweep "
                             f"reads ({FORMAT_VERSION}); upgrade camsweep")
        current = identity(results)
        if _identity(f) != current:
            raise StoreError(
                f"{path} is stale: computed from an earlier results.h5 (created "
                f"{f.attrs.get('results_created', '?')}; the current one was created "
                f"{current['created']}); rerun stage=evaluate run_dir={run_dir}")
        _check(f, n, str(path), run_dir, version, missing_ok)
        yield f
    finally:
        f.close()


def _arrays(g: h5py.Group) -> dict[str, np.ndarray]:
    """The datasets directly in ``g`` (dimension scales left out)."""
    return {k: v[:] for k, v in walk(g) if "/" not in k}


def read_metric_arrays(run_dir: str | os.PathLike,
                       maps: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Every per-map output of a run's metrics: ``{"gradcam/layer4": {"deletion_auc":
    (N,) array, "deletion": (N, steps + 1), ...}}``, image axis first (then the class axis
    of a target=topk run); NaN where not evaluated. Empty without metrics.

    Raises:
        StoreError: stale or damaged metrics (see :func:`read_metrics`); an unknown map.
    """
    with open_results(Path(run_dir) / "results.h5") as results, \
            read_metrics(run_dir, results) as g:
        if g is None:
            return {}
        stored = attr_list(g.attrs.get("maps"))
        for key in maps or []:
            if key not in stored:
                from ..errors import unknown

                raise StoreError(unknown("map with metrics", key, stored))
        return {key: _arrays(g[key]) for key in (maps or stored)}


def read_image_metrics(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The per-image datasets at the metrics file's root: ``score`` and, where the metrics
    ran, ``confidence`` (Average Drop's Y) and ``boxes`` ((N, B, 4) xmin, ymin, xmax, ymax
    in original-image pixels, NaN padding). Empty without metrics."""
    with open_results(Path(run_dir) / "results.h5") as results, \
            read_metrics(run_dir, results) as g:
        return {} if g is None else _arrays(g)


@dataclass
class MapSummary:
    """Means over the evaluated images of one map's metrics (NaN where not computed);
    ``figures`` are keyed by the registry's figure keys (``deletion_auc``, ``avg_drop``)."""

    key: str
    n: int
    figures: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        from ..metrics.registry import figures

        known = {fig.key: fig for fig in figures()}
        parts = [known[k].text(v) for k, v in self.figures.items()
                 if k in known and np.isfinite(v)]
        return f"{self.key} ({self.n} images): " + ", ".join(parts)


def summarize(g: h5py.Group) -> list[MapSummary]:
    """Per-map figures of the metrics in ``g`` (from :func:`read_metrics`), as the
    registry declares them."""
    from ..metrics.registry import figures

    score = g["score"][:]
    # Images evaluated (any class of a target=topk run).
    n = int(np.isfinite(score.reshape(len(score), -1)).any(1).sum())
    out = []
    for key in attr_list(g.attrs.get("maps")):
        m = g[key]
        values: dict[str, float] = {}
        for fig in figures():
            if fig.output not in m:
                continue
            data = m[fig.output][:]
            data = (data[..., -1] if fig.reduce == "last" else data).ravel()
            data = data[np.isfinite(data)]
            values[fig.key] = float(np.mean(data) * fig.scale) if data.size else math.nan
        out.append(MapSummary(key=key, n=n, figures=values))
    return out


def summarize_run(run_dir: str | os.PathLike) -> list[MapSummary]:
    """Per-map figures of a run's metrics (empty without metrics), read and checked through
    :func:`pipeline.store.open_results` and :func:`read_metrics`."""
    with open_results(Path(run_dir) / "results.h5") as results, \
            read_metrics(run_dir, results) as g:
        return summarize(g) if g is not None else []
