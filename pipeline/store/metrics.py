"""The metrics file, ``<run_dir>/metrics.h5``: what ``stage=evaluate`` writes and how its
readers (the report, the stage's own summary) read it. No torch.

``results.h5`` is never written after extraction: the metrics live in a file of their own,
with the layout the ``/metrics`` group of older results files had, now at its root:

- ``/score`` (N,) or (N, k): the target's score of the re-loaded image;
- ``/<group>/<layer>/<metric>`` per scored map (``gradcam/layer4/deletion_auc``, ...),
  float32, NaN where not evaluated, with ``dims`` and ``description`` attributes; each map
  group carries its ``layer``.

Root attributes: ``format`` = ``camsweep-metrics``, ``format_version``, the identity of the
results file the numbers were computed from (``results_run_id``, ``results_created``, as
:func:`pipeline.store.identity` gives them), ``created``, ``settings`` (JSON),
``metrics``, ``maps``, ``steps``, ``score``, ``sanity_layers``, ``road_removed_percent``,
``n_evaluated``, ``score_check_max_abs_diff``, ``camsweep_version``.

Crash safety: rows are collected batch by batch in a side file (``.metrics-partial.h5``,
which also lets an interrupted evaluation resume); the finished file is built under a
temporary name and renamed into place (``os.replace``), so readers see the old file or the
new one, never half of one. A partial or metrics file whose identity is not that of the
current ``results.h5`` (re-extracted with ``overwrite=true``) is stale: the partial is
discarded, and readers refuse the metrics with one line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from ..store import attr_list, identity, open_results

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.h5"
PARTIAL = ".metrics-partial.h5"
FORMAT = "camsweep-metrics"
FORMAT_VERSION = 1
LEGACY_GROUP = "metrics"  # inside results.h5, written by camsweep before metrics.h5
_GROUP = "metrics"  # inside the partial file

Layout = dict[str, tuple[tuple[int, ...], list[str], str]]


# -- layout ------------------------------------------------------------------------------------

def layout(settings: dict[str, Any], maps: list[str], metrics: Iterable[str], n_sanity: int,
           classes: int = 0) -> Layout:
    """Dataset path -> (per-image shape, dims, description); ``classes`` > 0 (a target=topk
    run) puts a class axis after the image axis, as in the stored maps."""
    out = _layout_per_map(settings, maps, list(metrics), n_sanity)
    if not classes:
        return out
    return {key: ((classes, *shape), [dims[0], "class", *dims[1:]], text)
            for key, (shape, dims, text) in out.items()}


def _layout_per_map(ev: dict[str, Any], maps: list[str], metrics: list[str],
                    n_sanity: int) -> Layout:
    steps = int(ev["steps"])
    n_road = len(ev["road_percentiles"])
    score = {"prob": "softmax probability", "logprob": "log-softmax probability",
             "sigmoid": "sigmoid probability"}.get(ev["score"], "logit")
    out: Layout = {
        "score": ((), ["image"], f"target class {score} of the re-loaded image (check of the "
                                 "reproduction: compare /targets/score)"),
    }
    for key in maps:
        if "deletion" in metrics:
            out[f"{key}/deletion"] = ((steps + 1,), ["image", "step"],
                                      f"target {score} with k/steps of the pixels deleted")
            out[f"{key}/deletion_auc"] = ((), ["image"], "area under the deletion curve")
        if "insertion" in metrics:
            out[f"{key}/insertion"] = ((steps + 1,), ["image", "step"],
                                       f"target {score} with k/steps of the pixels inserted")
            out[f"{key}/insertion_auc"] = ((), ["image"], "area under the insertion curve")
        if "confidence" in metrics:
            out[f"{key}/drop"] = ((), ["image"], "max(0, Y - O) / Y (Average Drop = 100 x mean)")
            out[f"{key}/increase"] = ((), ["image"], "1 if O > Y (Increase in Confidence = "
                                                     "100 x mean)")
            out[f"{key}/explanation_score"] = ((), ["image"], f"O: target {score} of "
                                                              "input x normalized map")
        if "road" in metrics:
            out[f"{key}/road_morf"] = ((n_road,), ["image", "removed_percent"],
                                       f"target {score}, most relevant pixels imputed")
            out[f"{key}/road_lerf"] = ((n_road,), ["image", "removed_percent"],
                                       f"target {score}, least relevant pixels imputed")
            out[f"{key}/road"] = ((), ["image"], "mean over percentages of (LeRF - MoRF) / 2 "
                                                 "(pytorch-grad-cam's ROADCombined)")
        if "pointing" in metrics:
            out[f"{key}/pointing_hit"] = ((), ["image"], "1 if the map's maximum is within "
                                                         "tolerance of a box; NaN: no box")
            out[f"{key}/pointing_energy"] = ((), ["image"], "share of the map's energy inside "
                                                            "the boxes; NaN: no box")
        if "sanity" in metrics and n_sanity:
            out[f"{key}/sanity_spearman"] = ((n_sanity,), ["image", "randomized_layer"],
                                             "Spearman rho with the stored map after "
                                             "randomizing layers 0..j (top first)")
    return out


# -- writing -----------------------------------------------------------------------------------

class Partial:
    """The side file that collects metrics batch by batch, so an evaluation resumes.

    It is keyed by the settings and by the identity of the results file: one made with other
    settings, or for a results file that has since been re-extracted, is discarded.
    """

    def __init__(self, path: Path, n: int, settings: dict[str, Any], results: dict[str, str],
                 spec: Layout) -> None:
        self.path = path
        text = json.dumps(settings, sort_keys=True)
        if path.exists():
            why = ""
            try:
                with h5py.File(path, "r", locking=False) as f:
                    if (f.attrs.get("results_run_id"), f.attrs.get("results_created")) != (
                            results["run_id"], results["created"]):
                        why = "made for an earlier results.h5"
                    elif f.attrs.get("settings") != text or f["status"].shape != (n,):
                        why = "other settings"
            except (OSError, KeyError) as e:
                why = f"unreadable: {type(e).__name__}"
            if why:
                log.info("evaluate: discarding %s (%s)", path, why)
                path.unlink()
        if not path.exists():
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            with h5py.File(tmp, "w") as f:
                f.attrs["settings"] = text
                f.attrs["results_run_id"] = results["run_id"]
                f.attrs["results_created"] = results["created"]
                f.create_dataset("status", shape=(n,), dtype=np.uint8, fillvalue=0)
                g = f.create_group(_GROUP)
                for key, (shape, dims, description) in spec.items():
                    per_row = max(1, int(np.prod(shape, dtype=np.int64)))
                    ds = g.create_dataset(key, shape=(n, *shape), dtype=np.float32,
                                          fillvalue=np.nan,
                                          chunks=(min(n, max(1, 4096 // per_row)), *shape))
                    ds.attrs["dims"] = json.dumps(dims)
                    ds.attrs["description"] = description
            os.replace(tmp, path)
        self.file = h5py.File(path, "r+")

    def pending(self, rows: np.ndarray) -> np.ndarray:
        return rows[self.file["status"][:][rows] == 0]

    def write(self, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        g = self.file[_GROUP]
        for key, value in arrays.items():
            g[key][rows] = value  # rows ascending (h5py's fancy indexing)
        self.file.flush()  # values reach the file before the status that vouches for them
        self.file["status"][rows] = 1
        self.file.flush()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def install(partial: Path, target: Path, results: dict[str, str], attrs: dict[str, Any]) -> None:
    """Build the metrics file from a finished partial file under a temporary name, flush it
    to disk and rename it over ``target`` in one step; then drop the partial file."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(partial, "r") as src, h5py.File(tmp, "w") as dst:
            for name in src[_GROUP]:
                src.copy(src[_GROUP][name], dst, name=name)
            dst.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                              "results_run_id": results["run_id"],
                              "results_created": results["created"]})
            for key, value in attrs.items():
                dst.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
            for group in dst.values():  # map groups say which layer they belong to
                if isinstance(group, h5py.Group):
                    for layer, sub in group.items():
                        if isinstance(sub, h5py.Group):
                            sub.attrs["layer"] = layer
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as e:
        raise StoreError(f"cannot write {target}: {str(e).splitlines()[0][:200]}; the rows "
                         f"computed so far stay in {partial}, rerun to finish") from e
    finally:
        tmp.unlink(missing_ok=True)
    partial.unlink()


# -- reading -----------------------------------------------------------------------------------

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


def _identity(f: h5py.File) -> dict[str, str]:
    return {"run_id": str(f.attrs.get("results_run_id", "")),
            "created": str(f.attrs.get("results_created", ""))}


def _check(g: h5py.Group, n: int, where: str) -> None:
    """What the readers rely on: the map list parses, every listed map has its group, and
    every dataset has one row per image."""
    try:
        maps = attr_list(g.attrs.get("maps"))
        missing = [key for key in maps if key not in g or not isinstance(g[key], h5py.Group)]
        if missing or "score" not in g:
            what = ", ".join(missing) or "score"
            raise StoreError(f"{where} is damaged: {what} missing; rerun stage=evaluate")
        bad: list[str] = []
        g.visititems(lambda k, v: bad.append(f"{k} {v.shape}") if isinstance(v, h5py.Dataset)
                     and (not v.shape or v.shape[0] != n) else None)
        if bad:
            raise StoreError(f"{where} is damaged: {bad[0]} has not {n} rows; rerun "
                             "stage=evaluate")
    except StoreError:
        raise
    except (KeyError, OSError, ValueError, TypeError) as e:
        raise StoreError(f"{where} is damaged: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}") from e


@contextmanager
def read_metrics(run_dir: str | os.PathLike, results: h5py.File) -> Iterator[h5py.Group | None]:
    """The metrics of a run whose results file is open as ``results`` (opened through
    :func:`pipeline.store.open_results`), checked: ``metrics.h5``'s root group when it
    belongs to this results file, the ``/metrics`` group of an older results file (read
    only), or None when the run has no metrics.

    Raises:
        StoreError: ``metrics.h5`` is stale (computed from an earlier ``results.h5``),
            damaged, or of a newer version: one line saying what to do.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    n = int(results["images/status"].shape[0])
    if not path.exists():
        legacy = results.get(LEGACY_GROUP)
        if isinstance(legacy, h5py.Group):
            _check(legacy, n, f"{results.filename}:/{LEGACY_GROUP}")
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
        _check(f, n, str(path))
        yield f
    finally:
        f.close()


@dataclass
class MapSummary:
    """Means over the evaluated images of one map's metrics (NaN where not computed)."""

    key: str
    n: int
    figures: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        f = self.figures
        parts = [f"{self.key} ({self.n} images):"]
        labels = (("deletion_auc", "deletion AUC {:.3f}"),
                  ("insertion_auc", "insertion AUC {:.3f}"),
                  ("avg_drop", "avg drop {:.1f}%"), ("increase", "increase {:.1f}%"),
                  ("road", "ROAD {:.3f}"), ("pointing", "pointing {:.1f}%"),
                  ("energy", "energy {:.1f}%"), ("sanity_last", "sanity rho {:.2f}"))
        parts += [fmt.format(f[k]) for k, fmt in labels if k in f and np.isfinite(f[k])]
        return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


# Per-image dataset -> (summary figure, scale of its mean).
_FIGURES = (("deletion_auc", "deletion_auc", 1), ("insertion_auc", "insertion_auc", 1),
            ("drop", "avg_drop", 100), ("increase", "increase", 100), ("road", "road", 1),
            ("pointing_hit", "pointing", 100), ("pointing_energy", "energy", 100))


def summarize(g: h5py.Group) -> list[MapSummary]:
    """Per-map means of the metrics in ``g`` (from :func:`read_metrics`)."""
    score = g["score"][:]
    # Images evaluated (any class of a target=topk run).
    n = int(np.isfinite(score.reshape(len(score), -1)).any(1).sum())
    out = []
    for key in attr_list(g.attrs.get("maps")):
        m = g[key]
        figures: dict[str, float] = {}
        for name, label, scale in _FIGURES:
            if name in m:
                values = m[name][:].ravel()  # (N,) or (N, k) for target=topk
                values = values[np.isfinite(values)]
                figures[label] = float(np.mean(values) * scale) if values.size else math.nan
        if "sanity_spearman" in m:
            last = m["sanity_spearman"][..., -1].ravel()
            last = last[np.isfinite(last)]
            figures["sanity_last"] = float(last.mean()) if last.size else math.nan
        out.append(MapSummary(key=key, n=n, figures=figures))
    return out


def summarize_run(run_dir: str | os.PathLike) -> list[MapSummary]:
    """Per-map means of a run's metrics (empty without metrics), read and checked through
    :func:`pipeline.store.open_results` and :func:`read_metrics`."""
    with open_results(Path(run_dir) / "results.h5") as results, \
            read_metrics(run_dir, results) as g:
        return summarize(g) if g is not None else []
