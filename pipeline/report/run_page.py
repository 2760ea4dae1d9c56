"""The page of one run: what was run, the metrics of ``stage=evaluate`` (if any) with their
curves, a gallery of chosen images (:mod:`.gallery`: the worst and best by the first
metric, a few per class) with their overlays and per-image metric values, and the failed
images.

Gallery thumbnails are drawn here from the stored arrays, as ``stage=render`` draws its
pictures (:class:`pipeline.render.Painter`) but without the title banner (the page shows
that text) and small: JPEG files beside the page, loaded lazily by the browser. The report
writes only inside its own folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from ..pictures import picture_name
from ..progress import Progress
from ..render import Painter
from ..results import Run, load_run
from ..store.metrics import MapSummary, read_metrics, summarize
from .gallery import Ranking, Section, choose
from .metrics_view import metric_ranking, missing_datasets, missing_figures, missing_note
from .page import FIGURES, card, class_name, figure_table, render_page
from .plots import run_plots

log = logging.getLogger(__name__)

THUMB = 400  # longest side of a gallery thumbnail, in pixels (shown at most 300 wide)
JPEG_QUALITY = 85
MAX_FAILED = 500  # failed images listed on the page
# Per-image metric -> (chip label, format), in the order the chips are shown.
CHIPS = (("deletion_auc", "del", "{:.3f}"), ("insertion_auc", "ins", "{:.3f}"),
         ("drop", "drop", "{:.0%}"), ("road", "ROAD", "{:.3f}"),
         ("pointing_energy", "energy", "{:.0%}"))


@dataclass
class _Thumb:
    src: str  # path relative to the page
    width: int
    height: int


def thumbnail(rgb: np.ndarray, dst: Path) -> _Thumb | None:
    """A JPEG of an RGB picture, longest side at most THUMB pixels."""
    h, w = rgb.shape[:2]
    scale = THUMB / max(h, w)
    if scale < 1:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        return None
    dst.write_bytes(jpeg.tobytes())
    return _Thumb(f"{dst.parent.name}/{dst.name}", w, h)


def _view_key(key: str, k: int | None) -> str:
    return key if k is None else f"{key}#{k}"


class RunPage:
    """Collects what a run's page shows, as plain data, and renders ``run.html``."""

    def __init__(self, run_dir: Path, out: Path, cfg: Any) -> None:
        self.run_dir = run_dir
        self.out = out
        self.cfg = cfg
        self.max_images = int(getattr(getattr(cfg, "report", None), "max_images", 24) or 0)
        render = getattr(cfg, "render", None)
        weight = getattr(render, "image_weight", None)
        channels = getattr(render, "grid_channels", None)
        self.image_weight = 0.5 if weight is None else float(weight)  # 0 is a valid weight
        self.grid_channels = 64 if channels is None else int(channels)

    def build(self) -> str:
        path = self.run_dir / "results.h5"
        with load_run(path) as run, \
                read_metrics(self.run_dir, run.file, missing_ok=True) as metrics:
            f = run.file
            self.categories = run.categories
            status = run.status
            done = np.flatnonzero(status == 1)
            summaries = summarize(metrics) if metrics is not None else []
            missing = missing_datasets(metrics) if metrics is not None else {}
            sections = self._choose(run, done, metric_ranking(metrics))
            explore = f"python run.py stage=explore run_dir={self.run_dir}"
            context = {
                "title": f"camsweep · {run.model} · {run.method}",
                "run_dir": str(self.run_dir), "layers": ", ".join(run.layers) or "input",
                "created": str(f.attrs.get("created", "?"))[:19],
                "overview": self._overview(run, status),
                "metrics": (self._metrics(metrics, summaries, missing) if summaries
                            else None),
                "gallery": {"sections": self._gallery(run, sections, metrics),
                            "shown": sum(len(s.rows) for s in sections), "done": len(done)},
                "explore": explore,
                "failed": self._failed(run, status),
                "config": str(f.attrs.get("config", "")),
            }
        return render_page("run.html", **context)

    def _choose(self, run: Run, done: np.ndarray, ranking: Ranking | None) -> list[Section]:
        self.ranking = ranking
        cls, prob = run.predictions
        if ranking is None:  # no metrics: the model's confidence
            ranking = Ranking("top-1 probability", prob[:, 0].astype(np.float64), "up")
        labels = run.labels
        by_label = bool((labels[done] >= 0).any())
        classes = labels if by_label else cls[:, 0]
        return choose(done, ranking, classes, lambda c: class_name(self.categories, c),
                      self.max_images, "label" if by_label else "predicted")

    def _thumbnails(self, run: Run, rows: list[int]) -> dict[tuple[int, str], _Thumb]:
        """(row, view key) -> thumbnail, drawn from the stored arrays without a title."""
        out: dict[tuple[int, str], _Thumb] = {}
        if not rows:
            return out
        painter = Painter(run.file, run.path, self.image_weight, self.grid_channels,
                          max_side=THUMB)
        digits = len(str(max(len(painter.paths) - 1, 0)))
        with Progress(len(rows), "report thumbnails", unit="img") as progress:
            for r in rows:
                for m, k, picture, _ in painter.row(r):
                    shown = m.layer if k is None else f"{m.layer}-top{k + 1}"
                    name = picture_name(painter.paths[r], r, digits, shown, m.group)
                    thumb = thumbnail(picture, self.out / "img" / (Path(name).stem + ".jpg"))
                    if thumb is not None:
                        out[(r, _view_key(m.key, k))] = thumb
                progress.update()
        self.views = painter.views
        return out

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

    def _metrics(self, metrics: h5py.Group, summaries: list[MapSummary],
                 missing: dict[str, list[str]]) -> dict[str, Any]:
        gone = missing_figures(missing)
        keys = [k for k in FIGURES
                if any(k in s.figures or (s.key, k) in gone for s in summaries)]
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
        where = Path(metrics.file.filename).name + (
            f":/{metrics.name.strip('/')}" if metrics.name != "/" else "")
        return {"table": figure_table(rows, keys, ["map", "images"], FIGURES, gone),
                "note": note,
                "missing": missing_note(missing, where, self.run_dir) if missing else None,
                "plots": run_plots(metrics, [s.key for s in summaries], self.out)}

    def _gallery(self, run: Run, sections: list[Section],
                 metrics: h5py.Group | None) -> list[dict[str, Any]]:
        rows = [r for s in sections for r in s.rows]
        pictures = self._thumbnails(run, rows)
        if not rows:
            return []
        paths, labels = run.paths, run.labels
        cls, prob = run.predictions
        target, score = run.targets
        per_image: dict[str, dict[str, np.ndarray]] = {}
        if metrics is not None:
            for key in dict.fromkeys(m.key for m, _ in self.views):
                if key in metrics:
                    g = metrics[key]
                    per_image[key] = {k: g[k][:] for k, _, _ in CHIPS if k in g}
                    if "pointing_hit" in g:
                        per_image[key]["pointing_hit"] = g["pointing_hit"][:]

        rank = self.ranking.source if self.ranking else None

        def entry(r: int) -> dict[str, Any]:
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
            for m, k in self.views:
                index = (r,) if k is None else (r, k)
                thumb = pictures.get((r, _view_key(m.key, k)))
                item["maps"].append({
                    "src": thumb.src if thumb else None,
                    "width": thumb.width if thumb else 0,
                    "height": thumb.height if thumb else 0,
                    "alt": f"{_view_key(m.key, k)} of {paths[r]}",
                    "group": m.group, "layer": m.layer, "k": k,
                    "explained": (class_name(self.categories, int(target[r, k]))
                                  if k is not None else None),
                    "chips": self._chips(per_image.get(m.key), index,
                                         rank if rank and rank[0] == m.key else None)})
            return item

        return [{"title": s.title, "note": s.note, "entries": [entry(r) for r in s.rows]}
                for s in sections]

    @staticmethod
    def _chips(values: dict[str, np.ndarray] | None, r: tuple[int, ...],
               rank: tuple[str, str] | None = None) -> list[dict[str, str]]:
        """The per-image metric values of one map; the one the gallery ranks by marked."""
        if not values:
            return []
        chips = [{"kind": "rank" if rank and rank[1] == key else "",
                  "text": f"{label} {pattern.format(float(values[key][r]))}"}
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
