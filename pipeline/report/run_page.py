"""The page of one run: what was run, the metrics of ``stage=evaluate`` (if any) with their
curves, a gallery of the first done images with their overlays and per-image metric
values, and the failed images.

Gallery pictures are render's: the page shows JPEG thumbnails of the PNGs in
``<run_dir>/pictures``. Where one of the gallery's pictures is missing, or older than
``results.h5`` (a re-extracted run), :func:`pipeline.render.render_run` is called for the
gallery's rows and (re)writes them there, exactly as ``stage=render`` would; the report
logs that it did.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import h5py
import numpy as np

from ..metrics.file import MapSummary, read_metrics, summarize
from ..pictures import picture_name
from ..render import PICTURES, pictures_of, render_run
from ..results import Run, load_run
from ..store import stored_maps
from .page import FIGURES, card, class_name, figure_table, render_page
from .plots import run_plots

log = logging.getLogger(__name__)

THUMB = 480  # longest side of gallery pictures, in pixels (full size stays in pictures/)
MAX_FAILED = 500  # failed images listed on the page
# Per-image metric -> (chip label, format), in the order the chips are shown.
CHIPS = (("deletion_auc", "del", "{:.3f}"), ("insertion_auc", "ins", "{:.3f}"),
         ("drop", "drop", "{:.0%}"), ("road", "ROAD", "{:.3f}"),
         ("pointing_energy", "energy", "{:.0%}"))


@dataclass
class _View:
    """One picture per gallery image: a stored map, or one class of a target=topk map."""

    group: str
    layer: str
    key: str  # HDF5 path "group/dataset"
    k: int | None = None  # the class axis position of a target=topk map

    @property
    def shown(self) -> str:
        """The layer as render_run names its pictures."""
        return self.layer if self.k is None else f"{self.layer}-top{self.k + 1}"


def thumbnail(src: Path, dst: Path) -> bool:
    """A JPEG copy of a picture, longest side at most THUMB pixels."""
    image = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if image is None:
        return False
    h, w = image.shape[:2]
    scale = THUMB / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    return bool(cv2.imwrite(str(dst), image, [cv2.IMWRITE_JPEG_QUALITY, 92]))


class RunPage:
    """Collects what a run's page shows, as plain data, and renders ``run.html``."""

    def __init__(self, run_dir: Path, out: Path, cfg: Any) -> None:
        self.run_dir = run_dir
        self.out = out
        self.cfg = cfg
        self.max_images = int(getattr(getattr(cfg, "report", None), "max_images", 24) or 0)

    def build(self) -> str:
        path = self.run_dir / "results.h5"
        with load_run(path) as run, read_metrics(self.run_dir, run.file) as metrics:
            f = run.file
            self.views = [_View(m.group, m.layer, m.key, k)
                          for m, k in pictures_of(f, stored_maps(f))]
            self.categories = run.categories
            status = run.status
            done = np.flatnonzero(status == 1)
            rows = done[: self.max_images]
            summaries = summarize(metrics) if metrics is not None else []
            context = {
                "title": f"camsweep · {run.model} · {run.method}",
                "run_dir": str(self.run_dir), "layers": ", ".join(run.layers) or "input",
                "created": str(f.attrs.get("created", "?"))[:19],
                "overview": self._overview(run, status),
                "metrics": self._metrics(metrics, summaries) if summaries else None,
                "gallery": {"entries": self._gallery(run, rows, self._pictures(run, rows),
                                                   metrics),
                            "done": len(done)},
                "failed": self._failed(run, status),
                "config": str(f.attrs.get("config", "")),
            }
        return render_page("run.html", **context)

    def _pictures(self, run: Run, rows: np.ndarray) -> dict[tuple[int, str], str]:
        """(row, view key) -> gallery thumbnail path relative to the page, from render's
        pictures (drawn now for the gallery's rows if one is missing or stale)."""
        if not len(rows) or not self.views:
            return {}
        paths = run.paths
        digits = len(str(max(len(paths) - 1, 0)))
        names = {(int(r), self._key(v)): picture_name(paths[r], int(r), digits, v.shown, v.group)
                 for r in rows for v in self.views}
        source = self.run_dir / PICTURES
        made = run.path.stat().st_mtime
        stale = [n for n in names.values()
                 if not (source / n).is_file() or (source / n).stat().st_mtime < made]
        if stale:
            log.info("report: drawing %d gallery pictures with render_run (missing or older "
                     "than results.h5) into %s", len(stale), source)
            render = getattr(self.cfg, "render", None)
            # render_run's max_images counts done rows, and the gallery shows the first ones.
            render_run(self.run_dir, SimpleNamespace(
                image_weight=getattr(render, "image_weight", 0.5),
                title=getattr(render, "title", True), max_images=len(rows),
                grid_channels=getattr(render, "grid_channels", 64)))
        out: dict[tuple[int, str], str] = {}
        for key, name in names.items():
            dst = self.out / "img" / (Path(name).stem + ".jpg")
            if (source / name).is_file() and thumbnail(source / name, dst):
                out[key] = f"img/{dst.name}"
        return out

    @staticmethod
    def _key(view: _View) -> str:
        return view.key if view.k is None else f"{view.key}#{view.k}"

    @staticmethod
    def _overview(run: Run, status: np.ndarray) -> list[dict[str, Any]]:
        n = len(status)
        done = int((status == 1).sum())
        failed = int((status == 2).sum())
        pending = n - done - failed
        items = [card("images", n), card("done", done), card("failed", failed, failed > 0)]
        if pending:
            items.append(card("pending", pending, True))
        if done:
            cls, prob = run.predictions
            ok = status == 1
            items.append(card("mean top-1 prob", f"{prob[ok, 0].mean():.3f}"))
            labeled = ok & (run.labels >= 0)
            if labeled.any():
                acc = float((cls[labeled, 0] == run.labels[labeled]).mean())
                items.append(card(f"top-1 accuracy ({int(labeled.sum())} labelled)",
                                  f"{100 * acc:.1f}%"))
        return items

    def _metrics(self, metrics: h5py.Group, summaries: list[MapSummary]) -> dict[str, Any]:
        keys = [k for k in FIGURES if any(k in s.figures for s in summaries)]
        rows = [{"map": s.key, "images": s.n, **s.figures} for s in summaries]
        settings = json.loads(metrics.attrs.get("settings", "{}"))
        confidence = settings.get("confidence_score")
        drop = (f" (Avg Drop / Increase: {confidence})"
                if confidence and confidence != settings.get("score") else "")
        note = (f"score: {settings.get('score', '?')} of the target class{drop} · deletion "
                f"baseline {settings.get('deletion_baseline', '?')}, insertion baseline "
                f"{settings.get('insertion_baseline', '?')}, {settings.get('steps')} "
                f"steps · evaluated {str(metrics.attrs.get('created', '?'))[:19]}")
        check = metrics.attrs.get("score_check_max_abs_diff")
        if check is not None:
            note += f" · reproduction check: max |Δ score| {float(check):.2g}"
        return {"table": figure_table(rows, keys, ["map", "images"], FIGURES), "note": note,
                "plots": run_plots(metrics, [s.key for s in summaries], self.out)}

    def _gallery(self, run: Run, rows: np.ndarray, pictures: dict[tuple[int, str], str],
                 metrics: h5py.Group | None) -> list[dict[str, Any]]:
        paths, labels = run.paths, run.labels
        cls, prob = run.predictions
        target, score = run.targets
        per_image: dict[str, dict[str, np.ndarray]] = {}
        if metrics is not None:
            for v in self.views:
                if v.key in metrics:
                    g = metrics[v.key]
                    per_image[v.key] = {k: g[k][:] for k, _, _ in CHIPS if k in g}
                    if "pointing_hit" in g:
                        per_image[v.key]["pointing_hit"] = g["pointing_hit"][:]
        items = []
        for r in (int(r) for r in rows):
            label, top = int(labels[r]), int(cls[r, 0])
            item: dict[str, Any] = {
                "name": Path(paths[r]).name, "row": r,
                "label": class_name(self.categories, label),
                "top1": class_name(self.categories, top), "prob": float(prob[r, 0]),
                "correct": (top == label) if label >= 0 else None,
                "explained": None, "score": None, "maps": []}
            if target.ndim == 1:  # target=topk: the class is named under each picture
                item["explained"] = class_name(self.categories, int(target[r]))
                item["score"] = float(score[r])
            for v in self.views:
                index = (r,) if v.k is None else (r, v.k)
                item["maps"].append({
                    "src": pictures.get((r, self._key(v))), "alt": f"{self._key(v)} of {paths[r]}",
                    "group": v.group, "layer": v.layer, "k": v.k,
                    "explained": (class_name(self.categories, int(target[r, v.k]))
                                  if v.k is not None else None),
                    "chips": self._chips(per_image.get(v.key), index)})
            items.append(item)
        return items

    @staticmethod
    def _chips(values: dict[str, np.ndarray] | None, r: tuple[int, ...]) -> list[dict[str, str]]:
        if not values:
            return []
        chips = [{"kind": "", "text": f"{label} {pattern.format(float(values[key][r]))}"}
                 for key, label, pattern in CHIPS
                 if key in values and np.isfinite(values[key][r])]
        if "pointing_hit" in values and np.isfinite(values["pointing_hit"][r]):
            hit = bool(values["pointing_hit"][r] > 0.5)
            chips.append({"kind": "hit" if hit else "nohit", "text": "hit" if hit else "miss"})
        return chips

    @staticmethod
    def _failed(run: Run, status: np.ndarray) -> dict[str, Any]:
        bad = np.flatnonzero(status == 2)
        paths, errors = run.paths, run.errors
        return {"count": len(bad),
                "rows": [{"row": int(r), "path": paths[r], "error": errors[r]}
                         for r in bad[:MAX_FAILED]]}
