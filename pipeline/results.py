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
from .store import DONE, FAILED, PENDING, open_results


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
        return list(json.loads(self.file.attrs["target_layers"]))

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.file.attrs["config"])

    @property
    def categories(self) -> list[str]:
        return [str(c) for c in self.file.attrs.get("categories", [])]

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
        cats = self.categories
        return pd.DataFrame({
            "path": self.paths, "label": self.labels,
            "status": pd.Categorical.from_codes(self.status, ["pending", "done", "failed"]),
            "error": self.errors, "pred": cls[:, 0], "prob": prob[:, 0],
            "pred_name": [cats[c] if 0 <= c < len(cats) else "" for c in cls[:, 0]],
            "target": tcls, "score": tscore,
        })

    # -- arrays -------------------------------------------------------------------------
    def _array(self, group: str, layer: str, rows: Any = slice(None)) -> h5py.Dataset | np.ndarray:
        g = self.file.get(group)
        if g is None or layer not in g:
            have = list(g) if g is not None else []
            raise StoreError(f"{self.path} has no {group}/{layer}; it has {have or 'none'} "
                             f"(method={self.method})")
        return g[layer] if rows is None else g[layer][rows]

    def cams(self, layer: str | None = None, rows: Any = slice(None)) -> np.ndarray:
        """Grad-CAM maps (N, h, w) at the layer's resolution, not normalized."""
        return self._array("gradcam", layer or self.layers[0], rows)

    def weights(self, layer: str | None = None, rows: Any = slice(None)) -> np.ndarray:
        """Grad-CAM channel weights alpha (N, C)."""
        return self._array("gradcam_weights", layer or self.layers[0], rows)

    def saliency(self, rows: Any = slice(None)) -> np.ndarray:
        return self._array("saliency", "input", rows)

    def activations(self, layer: str | None = None, rows: Any = slice(None)) -> np.ndarray:
        return self._array("activations", layer or self.layers[0], rows)

    def dataset(self, group: str, layer: str) -> h5py.Dataset:
        """The h5py dataset itself, for slicing huge arrays without reading them whole."""
        return self._array(group, layer, None)

    def to_xarray(self, group: str, layer: str) -> Any:
        """A lazily indexed xarray.DataArray with the dimension names stored in the file."""
        import xarray as xr

        ds = self.dataset(group, layer)
        dims = json.loads(ds.attrs["dims"])
        return xr.DataArray(ds, dims=dims, coords={"image": self.paths}, name=f"{group}/{layer}")

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
                f"layers={self.layers}, images={len(st)}, done={(st == DONE).sum()}, "
                f"failed={(st == FAILED).sum()}, pending={(st == PENDING).sum()})")


def load_run(path: str | os.PathLike) -> Run:
    """Open a results file (or a run directory holding ``results.h5``) for reading."""
    return Run(path)


def iter_runs(root: str | os.PathLike) -> Iterator[Path]:
    yield from sorted(Path(root).rglob("results.h5"))
