"""The explorer's one table, until :mod:`pipeline.table` lands: ``image_table`` builds the
frame that ``pipeline.table.run_table(run, metrics=True, stats=True)`` (one run) and
``pipeline.table.sweep_table(sweep)`` (every job, with ``job`` and the swept keys) will give.

Columns: ``row path file label label_name pred pred_name correct target score status error
method layer map``, then one float column per scalar metric of ``metrics.h5`` (same names,
``deletion_auc``, ...) and the map statistics ``entropy peak_y peak_x top10_mass``. One row
per image x stored map (layer and input maps; activations are no map to look at). A
target=topk run shows its first explained class. No torch.

When pipeline/table.py exists, this module's body becomes a call to it (see
:func:`image_table`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from ..errors import StoreError
from ..metrics.file import read_metrics
from ..results import load_run, load_sweep
from ..store import ACTIVATIONS, attr_list, read_map, stored_maps

STATS = ("entropy", "peak_y", "peak_x", "top10_mass")
_BLOCK = 4096  # rows of maps read at a time for the statistics


def image_table(source: Path, sweep: bool, metrics: bool = True) -> pd.DataFrame:
    """The table of a run folder (``sweep=False``) or of a multirun folder (every job that
    has results, plus ``job`` and the swept keys). Raises StoreError for a damaged file or
    stale metrics (the caller may then ask again with ``metrics=False``)."""
    if not sweep:
        with load_run(source) as run:
            return _run_table(run, metrics)
    s = load_sweep(source, slurm=False)
    frames = []
    for job, run in s.runs():
        t = _run_table(run, metrics)
        t.insert(0, "job", job["job"])
        for key in s.swept:
            if key in s.table.columns:
                t[key] = str(job[key])
        frames.append(t)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _run_table(run: Any, with_metrics: bool) -> pd.DataFrame:
    f: h5py.File = run.file
    base = run.table()
    labels = base["label"].to_numpy()
    cats = run.categories
    names = np.array([*cats, ""], dtype=object)  # index -1 (and unknown) -> ""
    known = (labels >= 0) & (labels < len(cats))
    base.insert(0, "row", np.arange(len(base)))
    paths = run.paths  # numpy strings: iterating them is cheap, unlike the frame's column
    base.insert(2, "file", [p.replace("\\", "/").rsplit("/", 1)[-1] for p in paths])
    base.insert(4, "label_name", names[np.where(known, labels, len(cats))])
    base["status"] = base["status"].astype(str)
    base["correct"] = np.where(labels >= 0, base["pred"].to_numpy() == labels, np.nan)
    base = base.drop(columns=["prob"])
    idle = base["status"].to_numpy() != "done"  # their predictions are unwritten rows
    base.loc[idle, ["pred", "target"]] = -1
    base.loc[idle, ["pred_name"]] = ""
    base.loc[idle, ["correct", "score"]] = np.nan
    metrics: dict[str, dict[str, np.ndarray]] = {}
    if with_metrics:
        with read_metrics(run.path.parent, f) as g:
            if g is not None:
                for key in attr_list(g.attrs.get("maps")):
                    metrics[str(key)] = _scalars(g[str(key)])
    frames = []
    done = run.done
    for info in stored_maps(f):
        if info.kind == ACTIVATIONS:
            continue
        t = base.copy()
        t["method"], t["layer"], t["map"] = info.group, info.layer, info.key
        for name, values in metrics.get(info.key, {}).items():
            t[name] = values.astype(np.float64)
        for name, values in _stats(f, info.key, done, run.sizes, f["images/box"][:]).items():
            t[name] = values
        frames.append(t)
    return pd.concat(frames, ignore_index=True) if frames else base.assign(method="", layer="",
                                                                          map="")


def _scalars(m: h5py.Group) -> dict[str, np.ndarray]:
    """The per-image numbers of one map's metrics (curves are read per image, on demand);
    a target=topk run's first explained class."""
    out = {}
    for name, ds in m.items():
        topk = "class" in str(ds.attrs.get("dims", "")) if isinstance(ds, h5py.Dataset) else 0
        if isinstance(ds, h5py.Dataset) and ds.ndim == 1 + bool(topk):
            values = ds[:]
            out[name] = values if values.ndim == 1 else values[:, 0]
    return out


def _stats(f: h5py.File, key: str, done: np.ndarray, sizes: np.ndarray,
           boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Normalised entropy, peak (original-image pixels, through the crop box) and the share
    of mass in the top 10 % of cells of each done row's map; NaN elsewhere."""
    n = len(done)
    out = {name: np.full(n, np.nan) for name in STATS}
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        try:
            maps = read_map(f, key, slice(lo, hi))
        except (OSError, ValueError, KeyError) as e:  # a corrupted chunk
            raise StoreError(f"{f.filename} is damaged: cannot read /{key} rows {lo}-{hi - 1}: "
                             f"{str(e).splitlines()[0][:160]}") from e
        if isinstance(maps, np.ndarray):  # fixed size: a block at a time
            blocks = [(np.arange(lo, hi), maps)]
        else:  # ragged: one row at a time
            blocks = [(np.array([lo + i]), m[None]) for i, m in enumerate(maps) if m.size]
        for rows, block in blocks:
            block = block[:, 0] if block.ndim == 4 else block  # target=topk: first class
            _block(block, rows, done, sizes, boxes, out)
    return out


def _block(maps: np.ndarray, rows: np.ndarray, done: np.ndarray, sizes: np.ndarray,
           boxes: np.ndarray, out: dict[str, np.ndarray]) -> None:
    b, h, w = maps.shape
    m = np.clip(np.nan_to_num(maps.reshape(b, -1).astype(np.float64)), 0, None)
    total = m.sum(1)
    ok = done[rows] & (total > 0)
    rows, m, total = rows[ok], m[ok], total[ok]
    if not len(rows):
        return
    p = m / total[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0).sum(1)
    out["entropy"][rows] = ent / np.log(p.shape[1]) if p.shape[1] > 1 else 0.0
    k = max(1, int(np.ceil(0.1 * p.shape[1])))
    out["top10_mass"][rows] = np.partition(p, p.shape[1] - k, axis=1)[:, -k:].sum(1)
    peak = p.argmax(1)
    y, x = peak // w, peak % w
    box = boxes[rows].astype(np.float64)
    whole = ~(np.isfinite(box).all(1) & (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]))
    box[whole] = np.c_[np.zeros((whole.sum(), 2)), sizes[rows][whole]]
    out["peak_y"][rows] = box[:, 0] + (y + 0.5) * (box[:, 2] - box[:, 0]) / h
    out["peak_x"][rows] = box[:, 1] + (x + 0.5) * (box[:, 3] - box[:, 1]) / w
