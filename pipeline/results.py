"""Reload runs for analysis: ``load_run`` for one results file, ``load_sweep`` for a
multirun folder (:mod:`pipeline.sweep`, importable from here too). Arrays are read lazily,
when asked for."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

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
    read_column,
    read_layouts,
    read_map,
    stored_config,
)
from .store import categories as stored_categories
from .table import seen_boxes


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
        return read_column(self.file, "images/path")

    @property
    def labels(self) -> np.ndarray:
        return read_column(self.file, "images/label")

    @property
    def status(self) -> np.ndarray:
        return read_column(self.file, "images/status")

    @property
    def errors(self) -> np.ndarray:
        return read_column(self.file, "images/error")

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
        return read_column(self.file, "images/size")

    @property
    def predictions(self) -> tuple[np.ndarray, np.ndarray]:
        """(classes, probabilities), each (N, k), best first."""
        return (read_column(self.file, "predictions/class"),
                read_column(self.file, "predictions/prob"))

    @property
    def targets(self) -> tuple[np.ndarray, np.ndarray]:
        """(class explained, its pre-softmax score), each (N,)."""
        return read_column(self.file, "targets/class"), read_column(self.file, "targets/score")

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
            return read_column(self.file, "images/input_size")
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


def __getattr__(name: str) -> Any:
    """``Sweep``, ``load_sweep`` and ``JOB_STATES`` live in :mod:`pipeline.sweep`; imported from
    here they still work (lazily: that module imports this one)."""
    if name in ("Sweep", "load_sweep", "JOB_STATES"):
        from . import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
