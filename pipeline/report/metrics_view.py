"""What the report reads from a run's metrics beyond their means: which datasets the file
should hold but does not (a dataset deleted from ``metrics.h5`` is shown as missing, never
silently dropped), and the per-image values the gallery ranks by."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from ..metrics.registry import figures, layout
from ..store import attr_list, open_results
from ..store.metrics import MapSummary, read_metrics, summarize
from .gallery import RANKABLE, Ranking

# Per-image dataset -> the summary figure (pipeline.store.metrics.summarize) made from it,
# as the metrics declare them.
FIGURE_OF = {f.output: f.key for f in figures()}


def missing_datasets(g: h5py.Group) -> dict[str, list[str]]:
    """Map key -> names of the datasets its metrics should have but do not.

    What "should" is comes from the file's own settings and metric list through
    :func:`pipeline.store.metrics.layout`, the layout evaluate wrote; a file without them
    (written by an older camsweep) is held to what any of its maps has.
    """
    maps = [str(k) for k in attr_list(g.attrs.get("maps"))]
    have = {key: set(g[key].keys()) for key in maps}
    try:
        settings = json.loads(g.attrs["settings"])
        metrics = [str(m) for m in attr_list(g.attrs["metrics"])]
        score = g["score"]
        classes = int(score.shape[1]) if score.ndim == 2 else 0
        spec = layout(settings, maps, metrics, classes)
        expected = {key: {k[len(key) + 1:] for k in spec if k.startswith(key + "/")}
                    for key in maps}
    except (KeyError, ValueError, TypeError):
        union = set().union(*have.values()) if have else set()
        expected = {key: union for key in maps}
    return {key: sorted(expected[key] - have[key]) for key in maps
            if expected[key] - have[key]}


def missing_note(missing: dict[str, list[str]], where: str, run_dir: str | Path) -> str:
    """One sentence naming the missing datasets and what brings them back."""
    names = ", ".join(f"{key}/{name}" for key, names in missing.items() for name in names)
    return (f"missing from {where}: {names} (deleted or damaged; its figures show "
            f"'missing'); rerun python run.py stage=evaluate run_dir={run_dir} "
            "evaluate.overwrite=true to compute them again")


def missing_figures(missing: dict[str, list[str]]) -> set[tuple[str, str]]:
    """(map key, summary figure) pairs that cannot be shown because a dataset is missing."""
    return {(key, FIGURE_OF[name]) for key, names in missing.items() for name in names
            if name in FIGURE_OF}


def run_metrics(run_dir: str | os.PathLike) -> tuple[list[MapSummary], dict[str, list[str]]]:
    """A run's per-map means and missing datasets (empty without metrics), read and checked
    through :func:`pipeline.store.open_results` and :func:`read_metrics`."""
    with open_results(Path(run_dir) / "results.h5") as results, \
            read_metrics(run_dir, results, missing_ok=True) as g:
        if g is None:
            return [], {}
        return summarize(g), missing_datasets(g)


def metric_ranking(g: h5py.Group | None) -> Ranking | None:
    """The first per-image metric (in evaluate's order) of the first map that has a value
    for some image; for target=topk, that of the first explained class. None without."""
    if g is None:
        return None
    for key in (str(k) for k in attr_list(g.attrs.get("maps"))):
        for name, label, direction in RANKABLE:
            if name in g[key]:
                values = np.asarray(g[key][name][:], dtype=np.float64)
                values = values.reshape(len(values), -1)[:, 0]
                if np.isfinite(values).any():
                    return Ranking(f"{label} ({key})", values, direction, (key, name))
    return None
