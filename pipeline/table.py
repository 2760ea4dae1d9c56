"""One long table of a run or a sweep: a row per image x stored map (x explained class with
``target=topk``), with the image's facts, every per-map metric ``stage=evaluate`` stored and
statistics of the map itself (:mod:`pipeline.mapstats`). ``Run.table``, ``Sweep.images``
and ``stage=table`` (``images.parquet``) give it; the explorer serves it. No torch.

Columns: ``row`` (the image's row in results.h5), ``path``, ``file``, ``label``,
``label_name``, ``pred``, ``pred_name``, ``prob`` (top-1), ``correct`` (NA without a
label), ``target``, ``rank`` (which explained class of a topk run, else 0), ``score``,
``status``, ``error``, ``method``, ``layer``, ``map`` (``method/layer``, the HDF5 key),
then the metrics (same names as in metrics.h5) and ``entropy``, ``peak_y``, ``peak_x``,
``top10_mass`` (and ``box_iou``, ``box_mass`` with boxes). Rows that are not done keep
their path, status and error; their predictions, targets, metrics and statistics are
missing (-1 or NaN), since the file holds no valid values for them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ConfigError, DataError, StoreError
from .mapstats import BOX_STATS, STATS, map_stats
from .progress import Progress
from .store import (
    DONE,
    INPUT_MAP,
    LAYER_MAP,
    RAGGED,
    STATUS_NAMES,
    MapInfo,
    attr_list,
    categories,
    is_ragged,
    map_ndim,
    read_column,
    read_rows,
    stored_maps,
)

log = logging.getLogger("camsweep")

TABLE_FILE = "images.parquet"
CHUNK_BYTES = 32 << 20  # map values read and reduced at a time
MAP_KINDS = (LAYER_MAP, INPUT_MAP)  # activations and weights are not maps of the image


# -- metrics -----------------------------------------------------------------------------------

def metric_arrays(run_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Every metric array of a run, by map key (``gradcam/layer4``) and name; {} when the
    run has no metrics. The one place the table reads ``metrics.h5``."""
    from .store.metrics import read_metric_arrays

    return read_metric_arrays(run_dir)


def metric_datasets(run: Any) -> dict[str, Any]:
    """``Run.metrics()``: one ``xarray.Dataset`` per map key, with the dims metrics.h5
    names and the image paths as the ``image`` coordinate; without xarray, a dict of
    arrays per map."""
    from .store import walk
    from .store.metrics import read_metrics

    out: dict[str, Any] = {}
    with read_metrics(run.path.parent, run.file) as g:
        if g is None:
            return out
        for key in attr_list(g.attrs.get("maps")):
            out[str(key)] = {name: (_dims(ds), ds[()]) for name, ds in walk(g[key])
                             if "/" not in name}
    try:
        import xarray as xr
    except ImportError:
        return {key: {name: arr for name, (_, arr) in v.items()} for key, v in out.items()}
    paths = run.paths
    return {key: xr.Dataset(v, coords={"image": paths}) for key, v in out.items()}


def _dims(ds: h5py.Dataset) -> list[str]:
    try:
        dims = [str(d) for d in json.loads(ds.attrs.get("dims", "[]"))]
    except (TypeError, ValueError):
        dims = []
    if len(dims) != ds.ndim:
        dims = ["image", *(f"{ds.name.rsplit('/', 1)[-1]}_{i}" for i in range(1, ds.ndim))]
    return dims


# -- the table of one run ----------------------------------------------------------------------

def _image_facts(f: h5py.File) -> dict[str, np.ndarray]:
    """Per-image columns (row order), with prediction columns blanked where not done."""
    import pandas as pd

    n = int(f["images/status"].shape[0])
    status = read_column(f, "images/status")
    done = status == DONE
    paths = read_column(f, "images/path")
    names = np.array([*categories(f), ""], dtype=object)

    def name_of(cls: np.ndarray) -> np.ndarray:
        return names[np.where((cls >= 0) & (cls < len(names) - 1), cls, len(names) - 1)]

    label = read_column(f, "images/label").astype(np.int32)
    cls, prob = read_column(f, "predictions/class"), read_column(f, "predictions/prob")
    pred = np.where(done, cls[:, 0] if cls.shape[1] else -1, -1).astype(np.int32)
    top1 = np.where(done, prob[:, 0] if prob.shape[1] else np.nan, np.nan).astype(np.float32)
    correct = pd.array(pred == label, dtype="boolean")
    correct[~done | (label < 0)] = pd.NA
    return {
        "row": np.arange(n, dtype=np.int64),
        "path": paths,
        "file": np.array(pd.Series(paths, dtype=object).str.replace("\\", "/", regex=False)
                         .str.rsplit("/", n=1).str[-1], dtype=object),
        "label": label, "label_name": name_of(label),
        "pred": pred, "pred_name": np.where(done, name_of(pred), ""), "prob": top1,
        "correct": correct,
        "status": status,
        "error": read_column(f, "images/error"),
    }


def seen_boxes(f: h5py.File) -> np.ndarray:
    """(N, 4) region of each photo the model saw; the whole photo for files without
    ``/images/box``."""
    if "images/box" in f:
        return read_column(f, "images/box").astype(np.float64)
    size = read_column(f, "images/size").astype(np.float64)
    return np.column_stack([np.zeros(len(size)), np.zeros(len(size)), size])


def _classes(f: h5py.File, m: MapInfo) -> int:
    """The class axis length of a target=topk map, 0 for a map without one."""
    if map_ndim(f, m.key) != 4:
        return 0
    if f[m.key].ndim == 4:
        return int(f[m.key].shape[1])
    shapes = f[f"{RAGGED}/{m.key}/shape"]
    return int(shapes[:, 0].max()) if shapes.shape[0] else 0


def _map_chunks(f: h5py.File, key: str, rows: int) -> Any:
    """(first row, stop row, {shape: (row indices, maps (n, *shape))}) per chunk of rows,
    fixed or ragged, each chunk read in one HDF5 read."""
    ds = f[key]
    n = int(f["images/status"].shape[0])
    if not is_ragged(f, key):
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            yield lo, hi, {ds.shape[1:]: (np.arange(lo, hi),
                                          read_rows(f, key, f.filename, slice(lo, hi)))}
        return
    offsets = f[f"{RAGGED}/{key}/offset"][:].astype(np.int64)
    shapes = f[f"{RAGGED}/{key}/shape"][:]
    sizes = shapes.astype(np.int64).prod(axis=1)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        start, stop = int(offsets[lo]), int(offsets[hi - 1] + sizes[hi - 1])
        # Rows lie back to back (store.check_ragged); flat values, not rows: their
        # checksums are per image span, checked by stage=verify.
        span = read_rows(f, key, f.filename, slice(start, stop), verify=False)
        groups: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        chunk = shapes[lo:hi]
        for shape in np.unique(chunk, axis=0):
            picked = lo + np.flatnonzero((chunk == shape).all(1))
            size = int(np.prod(shape))
            if not size:
                continue
            at = (offsets[picked] - start)[:, None] + np.arange(size)
            groups[tuple(int(v) for v in shape)] = (picked, span[at].reshape(-1, *shape))
        yield lo, hi, groups


def _stats_of_map(f: h5py.File, m: MapInfo, classes: int, seen: np.ndarray,
                  boxes: np.ndarray | None, done: np.ndarray,
                  progress: Progress) -> dict[str, np.ndarray]:
    """Statistics of every (image, class) of one map, NaN where the image is not done."""
    per = max(1, classes)
    n = len(done)
    names = STATS + (BOX_STATS if boxes is not None else ())
    out = {name: np.full(n * per, np.nan) for name in names}
    ds = f[m.key]
    if is_ragged(f, m.key):
        row_bytes = max(1, ds.shape[0] * ds.dtype.itemsize // max(1, n))
    else:
        row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    rows = max(1, CHUNK_BYTES // row_bytes)
    for lo, hi, groups in _map_chunks(f, m.key, rows):
        for picked, maps in groups.values():
            keep = done[picked]
            picked, maps = picked[keep], maps[keep]
            if not len(picked):
                continue
            h, w = maps.shape[-2:]
            at = (picked[:, None] * per + np.arange(per)).ravel()  # (image, class) rows
            stats = map_stats(maps.reshape(-1, h, w), np.repeat(seen[picked], per, axis=0),
                              None if boxes is None else np.repeat(boxes[picked], per, axis=0))
            for name, values in stats.items():
                out[name][at] = values
        progress.update(hi - lo)
    return out


def boxes_from_csv(path: str | os.PathLike, paths: np.ndarray) -> np.ndarray:
    """Boxes per image from a CSV, as ``evaluate.boxes`` takes it: ``file,xmin,ymin,xmax,
    ymax`` (a file entry matches an image path equal to it or ending in it: ``a.jpg``,
    ``sub/a.jpg``), or ImageNet's ``LOC_val_solution.csv`` (by file stem). Returns (N, B,
    4) (y0, x0, y1, x1), NaN-padded: an image may have several boxes, or none."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"boxes file {str(path)!r} does not exist")
    try:
        table = pd.read_csv(path, skipinitialspace=True, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a CSV file ({str(e).splitlines()[0][:120]})") from e
    found: dict[str, list[tuple[str, list[float]]]] = {}
    if {"ImageId", "PredictionString"} <= set(table.columns):  # ImageNet: wnid x0 y0 x1 y1 ...
        for image, text in zip(table["ImageId"], table["PredictionString"], strict=True):
            v = text.split()
            found[image] = [(image, [float(v[i + 2]), float(v[i + 1]), float(v[i + 4]),
                                     float(v[i + 3])]) for i in range(0, len(v) - 4, 5)]
        keys = [Path(p.replace("\\", "/")).stem for p in paths]
        per_image = [[box for _, box in found.get(k, [])] for k in keys]
    else:
        need = ["file", "xmin", "ymin", "xmax", "ymax"]
        missing = [k for k in need if k not in table.columns]
        if missing:
            raise DataError(f"{path}: the header must name {','.join(need)} (or be ImageNet's "
                            f"ImageId,PredictionString); missing {missing}")
        coords = table[need[1:]].apply(pd.to_numeric, errors="coerce")
        bad = coords.isna().any(axis=1).to_numpy()
        if bad.any():
            line = int(np.flatnonzero(bad)[0]) + 2
            raise DataError(f"{path}:{line}: not a box: {table.iloc[line - 2].to_dict()}")
        for name, (x0, y0, x1, y1) in zip(table["file"], coords.to_numpy(), strict=True):
            key = name.strip().replace("\\", "/")
            found.setdefault(key.rsplit("/", 1)[-1], []).append((key, [y0, x0, y1, x1]))
        per_image = []
        for p in paths:
            norm = p.replace("\\", "/")
            per_image.append([box for key, box in found.get(norm.rsplit("/", 1)[-1], [])
                              if norm == key or norm.endswith("/" + key.lstrip("./"))])
    out = np.full((len(paths), max([1, *map(len, per_image)]), 4), np.nan)
    for i, boxes in enumerate(per_image):
        if boxes:
            out[i, :len(boxes)] = boxes
    return out


def _boxes(boxes: Any, paths: np.ndarray) -> np.ndarray | None:
    if boxes is None:
        return None
    if isinstance(boxes, (str, os.PathLike)):
        return boxes_from_csv(boxes, paths)
    n = len(paths)
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim not in (2, 3) or arr.shape[0] != n or arr.shape[-1] != 4:
        raise ConfigError(f"boxes must be an (N, 4) array of (y0, x0, y1, x1) in original "
                          f"pixels, one row per image (N={n}, NaN rows for none), (N, B, 4) "
                          f"for several, or a CSV file; got shape {arr.shape}")
    return arr.reshape(n, -1, 4)


def run_table(run: Any, metrics: bool = True, stats: bool = True, boxes: Any = None) -> Any:
    """The long table of one run (a :class:`pipeline.results.Run`) as a pandas DataFrame.

    Args:
        run: An open Run.
        metrics: Add every per-map metric of ``metrics.h5`` (the datasets of a map's group
            with one value per image, or per image and class); none without the file.
        stats: Add the map statistics of :mod:`pipeline.mapstats` (read from every stored
            map, in chunks, with a progress bar).
        boxes: (N, 4) boxes per image, (y0, x0, y1, x1) in original-image pixels as
            ``Run.boxes``, NaN rows for none, or (N, B, 4) several per image (their union
            counts), or a CSV file (:func:`boxes_from_csv`): adds ``box_iou`` and
            ``box_mass`` (xmin, ymin, xmax, ymax arrays are ``b[..., [1, 0, 3, 2]]``).

    Raises:
        StoreError: metrics.h5 is stale or damaged (one line); ConfigError: bad ``boxes``.
    """
    import pandas as pd

    f = run.file
    n = int(f["images/status"].shape[0])
    if boxes is not None and not stats:
        raise ConfigError("boxes give the box statistics: pass stats=True with them")
    facts = _image_facts(f)
    box_arr = _boxes(boxes, facts["path"])
    done = facts["status"] == DONE
    tcls, tscore = read_column(f, "targets/class"), read_column(f, "targets/score")
    found = metric_arrays(run.path.parent) if metrics else {}
    maps = stored_maps(f, MAP_KINDS)
    seen = seen_boxes(f) if stats and maps else None
    blocks: list[dict[str, Any]] = []
    with Progress(n * len(maps) if stats else 0, f"table {run.path.parent.name}") as progress:
        for m in maps:
            classes = _classes(f, m)
            per = max(1, classes)
            image = np.repeat(np.arange(n), per)
            rank = np.tile(np.arange(per), n)
            block: dict[str, Any] = {name: values[image] for name, values in facts.items()}
            block["target"] = (tcls[image, rank] if tcls.ndim == 2 else tcls[image])
            block["rank"] = rank.astype(np.int32)
            block["score"] = (tscore[image, rank] if tscore.ndim == 2 else tscore[image])
            block["method"], block["layer"], block["map"] = m.group, m.layer, m.key
            for name, arr in found.get(m.key, {}).items():
                if arr.shape == (n,):
                    block[name] = arr[image]
                elif classes and arr.shape == (n, classes):
                    block[name] = arr[image, rank]
            if stats:
                block.update(_stats_of_map(f, m, classes, seen, box_arr, done, progress))
            blocks.append(block)
    if not blocks:  # no maps (activations only): the image facts alone
        blocks = [{**facts, "target": tcls[:, 0] if tcls.ndim == 2 else tcls,
                   "rank": np.zeros(n, np.int32),
                   "score": tscore[:, 0] if tscore.ndim == 2 else tscore,
                   "method": "", "layer": "", "map": ""}]
    frame = pd.concat([pd.DataFrame(b) for b in blocks], ignore_index=True)
    valid = frame["status"].to_numpy() == DONE
    frame["target"] = np.where(valid, frame["target"], -1).astype(np.int32)
    frame["score"] = np.where(valid, frame["score"], np.nan).astype(np.float32)
    frame["status"] = pd.Categorical.from_codes(frame["status"].to_numpy(), list(STATUS_NAMES))
    for name in ("method", "layer", "map"):
        frame[name] = frame[name].astype(str)
    head = ["row", "path", "file", "label", "label_name", "pred", "pred_name", "prob",
            "correct", "target", "rank", "score", "status", "error", "method", "layer", "map"]
    tail = [c for c in (*STATS, *BOX_STATS) if c in frame.columns]
    middle = [c for c in frame.columns if c not in head and c not in tail]
    return frame[head + middle + tail]


# -- sweeps ------------------------------------------------------------------------------------

def sweep_table(sweep: Any, **kw: Any) -> Any:
    """:func:`run_table` of every job of a sweep (``pipeline.results.load_sweep``) with
    results, one under the other, with ``job`` and the swept keys (``Sweep.swept``) first.
    ``kw`` go to :func:`run_table` (``boxes`` as an array fits only sweeps whose jobs
    share one image list; a CSV file fits any)."""
    import pandas as pd

    swept = [k for k in sweep.swept if k in sweep.table.columns and k != "job"]
    frames = []
    for row, run in sweep.runs():
        try:
            t = run_table(run, **kw)
        except StoreError as e:
            raise StoreError(f"job {row['job']}: {e}") from e
        # A swept `method` is the table's own column already (the map's method).
        front = {"job": row["job"], **{k: row[k] for k in swept if k not in t.columns}}
        t = pd.concat([pd.DataFrame(front, index=t.index), t], axis=1)
        frames.append(t)
    if not frames:
        raise StoreError(f"{sweep.root}: no job has results yet ({sweep.counts()})")
    return pd.concat(frames, ignore_index=True)


# -- the stage ---------------------------------------------------------------------------------

def table_stage(cfg: Any, run_dir: str | os.PathLike) -> dict[str, Any]:
    """``stage=table run_dir=<run or sweep>``: the table as ``images.parquet`` in that
    folder (written under a temporary name and renamed into place); with
    ``evaluate.boxes=FILE`` (the pointing game's box file), the box statistics too."""
    from .results import load_run, load_sweep
    from .store.atomic import atomic_output

    if not cfg.get("run_dir"):
        raise ConfigError("stage=table needs run_dir=<a run folder (results.h5) or a sweep "
                          "folder>")
    run_dir = Path(run_dir)
    boxes = (cfg.get("evaluate") or {}).get("boxes")  # the pointing game's box file
    if (run_dir / "results.h5").is_file():
        with load_run(run_dir) as run:
            frame = run_table(run, boxes=boxes)
        what = "run"
    elif (run_dir / "multirun.yaml").is_file() or any(
            (d / ".hydra").is_dir() for d in (run_dir.iterdir() if run_dir.is_dir() else [])):
        frame = sweep_table(load_sweep(run_dir, slurm=False), boxes=boxes)
        what = f"sweep of {frame['job'].nunique()} jobs"
    else:
        raise StoreError(f"no results.h5 and no sweep (multirun.yaml, job folders) in "
                         f"{run_dir}; give run_dir=<a run or sweep folder>")
    out = run_dir / TABLE_FILE
    with atomic_output(out) as tmp:
        frame.to_parquet(tmp, engine="pyarrow", index=False)
    images = frame["row"].nunique() if what == "run" else len(frame.drop_duplicates(
        ["job", "row"]))
    maps = sorted(set(frame["map"]) - {""})
    log.info("table: %d rows (%s, %d images, %d map%s: %s), %d columns -> %s", len(frame), what,
             images, len(maps), "" if len(maps) == 1 else "s", ", ".join(maps) or "none",
             len(frame.columns), out)
    return {"table": str(out), "rows": len(frame), "columns": len(frame.columns)}
