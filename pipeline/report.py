"""The report stage: one self-contained HTML page for a run or for a whole sweep.

``python run.py stage=report run_dir=DIR`` writes ``DIR/report/index.html`` with its pictures
and plots beside it (``DIR/report/img``, ``DIR/report/plots``). Links are relative, nothing
is fetched from the network and there is no JavaScript framework: the page opens from a
laptop, a cluster's file browser or an archive the same way.

- A run (``DIR/results.h5``): what was run, a summary of the metrics of ``stage=evaluate``
  (if any) with their curves, a gallery of the first images with the overlays that
  ``pipeline.render.render_run`` draws (drawn now if missing) and, per image, its label,
  target and top-1 class by name and its metric values; failed images are listed in red.
- A sweep (a Hydra multirun folder): the jobs table of ``load_sweep`` (failed jobs marked in
  red with their error) and plots of every figure and metric against the layer and the model.

The page is rebuilt from scratch in a temporary folder and swapped in at the end, so an
interrupted report never leaves a half-written page behind.
"""

from __future__ import annotations

import html
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import h5py
import numpy as np

from . import __version__
from .errors import StoreError

log = logging.getLogger(__name__)

REPORT = "report"
THUMB = 480  # longest side of gallery pictures, in pixels (full size stays in pictures/)
# Figure -> (label, format, direction): "down" means lower is better.
FIGURES: dict[str, tuple[str, str, str]] = {
    "deletion_auc": ("Deletion AUC", "{:.3f}", "down"),
    "insertion_auc": ("Insertion AUC", "{:.3f}", "up"),
    "avg_drop": ("Avg Drop %", "{:.1f}", "down"),
    "increase": ("Increase %", "{:.1f}", "up"),
    "road": ("ROAD", "{:.3f}", "up"),
    "pointing": ("Pointing %", "{:.1f}", "up"),
    "energy": ("Energy %", "{:.1f}", "up"),
    "sanity_last": ("Sanity ρ", "{:.2f}", "zero"),
}
# Longer explanations, shown as column tooltips and under the metrics table.
HELP = {
    "deletion_auc": "area under the target score while the most salient pixels are deleted",
    "insertion_auc": "area under the target score while the most salient pixels are inserted",
    "avg_drop": "Average Drop in confidence on input x normalized map (Grad-CAM++)",
    "increase": "Increase in Confidence: share of images whose score rises (Grad-CAM++)",
    "road": "ROAD: mean of (LeRF - MoRF) / 2 over the removal percentages",
    "pointing": "pointing game: share of maxima within 15 px of a box",
    "energy": "energy-based pointing game: share of the map inside the boxes",
    "sanity_last": "Spearman rho with the stored map once every unit is randomized "
                   "(about 0 passes the sanity check)",
    "mean_prob": "mean top-1 probability", "accuracy": "top-1 accuracy (labelled images)",
    "mean_score": "mean target logit",
}
SWEEP_FIGURES: dict[str, tuple[str, str, str]] = {
    "mean_prob": ("Mean top-1 prob", "{:.3f}", "up"),
    "accuracy": ("Top-1 accuracy", "{:.3f}", "up"),
    "mean_score": ("Mean target logit", "{:.2f}", "up"),
}
ARROW = {"down": "↓", "up": "↑", "zero": "→0"}
BETTER = {"down": "lower is better", "up": "higher is better", "zero": "closer to 0 is better"}
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777",
           "#65a30d", "#475569", "#ea580c")

CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f6f7f9; --card:#fff;
        --accent:#2563eb; --bad:#b91c1c; --badbg:#fef2f2; --good:#047857; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color:var(--ink); background:var(--bg); }
header { background:#111827; color:#f9fafb; padding:22px 32px 18px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; letter-spacing:.2px; }
header .sub { color:#9ca3af; font-size:13px; }
header .sub code { color:#e5e7eb; }
main { padding:20px 32px 40px; max-width:1500px; }
section { margin:22px 0 30px; }
h2 { font-size:17px; margin:0 0 10px; font-weight:600; }
h2 small { color:var(--muted); font-weight:400; font-size:13px; margin-left:6px; }
.cards { display:flex; flex-wrap:wrap; gap:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px;
        padding:10px 16px; min-width:130px; }
.card .v { font-size:22px; font-weight:600; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.4px; }
.card.bad .v { color:var(--bad); }
table { border-collapse:collapse; background:var(--card); border:1px solid var(--line);
        border-radius:8px; overflow:hidden; font-size:13px; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left;
         vertical-align:top; }
th { background:#f3f4f6; font-weight:600; white-space:nowrap; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
td.best { font-weight:700; color:var(--good); }
tr.failed td { background:var(--badbg); }
tr.failed td:first-child { box-shadow:inset 4px 0 0 var(--bad); }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px;
         font-weight:600; background:#e5e7eb; }
.badge.done { background:#d1fae5; color:#065f46; }
.badge.failed { background:#fee2e2; color:var(--bad); }
.badge.incomplete, .badge.missing { background:#fef3c7; color:#92400e; }
.err { color:var(--bad); font-family:ui-monospace, Menlo, Consolas, monospace; font-size:12px; }
.muted { color:var(--muted); }
.plots { display:flex; flex-wrap:wrap; gap:14px; }
.plots figure { margin:0; background:var(--card); border:1px solid var(--line);
                border-radius:8px; padding:8px; }
.plots img { display:block; max-width:100%; }
.plots figcaption { color:var(--muted); font-size:12px; padding:4px 4px 0; }
.gallery { display:flex; flex-direction:column; gap:14px; }
.item { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px; }
.item .head { display:flex; flex-wrap:wrap; gap:6px 18px; align-items:baseline;
              margin-bottom:8px; }
.item .name { font-weight:600; }
.item .ok { color:var(--good); font-weight:600; }
.item .miss { color:var(--bad); font-weight:600; }
.maps { display:flex; flex-wrap:wrap; gap:12px; }
.scroll { overflow-x:auto; max-width:100%; }
.map { max-width:300px; }
.map img { max-width:300px; height:auto; border-radius:4px; display:block; background:#eee; }
.map .cap { font-size:12px; margin-top:4px; }
.map .cap b { font-weight:600; }
.chips { display:flex; flex-wrap:wrap; gap:4px; margin-top:4px; }
.chip { font-size:11px; background:#eef2ff; color:#3730a3; border-radius:4px; padding:1px 6px;
        font-variant-numeric:tabular-nums; }
.chip.hit { background:#d1fae5; color:#065f46; }
.chip.nohit { background:#fee2e2; color:var(--bad); }
img.broken { outline:3px solid var(--bad); }
details { background:var(--card); border:1px solid var(--line); border-radius:8px;
          padding:8px 12px; }
details pre { font-size:12px; overflow:auto; max-height:480px; }
footer { color:var(--muted); font-size:12px; padding:0 32px 30px; }
"""

# Vanilla, a few lines: marks pictures that failed to load and says so on the console,
# which a headless browser test reads.
CHECK_JS = """
window.addEventListener("load", function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || !imgs[i].naturalWidth) {
      bad++; imgs[i].className += " broken";
      console.error("camsweep-report: missing picture " + imgs[i].getAttribute("src"));
    }
  }
  console.log("camsweep-report: " + (imgs.length - bad) + " of " + imgs.length +
              " pictures loaded");
});
"""


def report(run_dir: str | Path, cfg: Any = None) -> Path:
    """Write the report of a run or a sweep folder; returns the path of ``index.html``.

    Args:
        run_dir: A run folder (with ``results.h5``) or a multirun folder (``<n>/.hydra``).
        cfg: The invocation's config (uses ``report.max_images`` and ``render.*``); None for
            the defaults.
    """
    run_dir = Path(run_dir)
    if (run_dir / "results.h5").is_file():
        return _write(run_dir, lambda out: _RunPage(run_dir, out, cfg).build())
    if run_dir.is_dir() and any((d / ".hydra").is_dir() for d in run_dir.iterdir()
                                if d.is_dir() and d.name != ".hydra"):
        return _write(run_dir, lambda out: _SweepPage(run_dir, out).build())
    raise StoreError(f"{run_dir} is neither a run (no results.h5) nor a sweep folder "
                     "(no <job>/.hydra); give run_dir=<run or multirun folder>")


def _write(run_dir: Path, build: Any) -> Path:
    """Build the page in a fresh temporary folder, then swap it in place of the old one."""
    final = run_dir / REPORT
    tmp = run_dir / f".{REPORT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img").mkdir(parents=True)
    (tmp / "plots").mkdir()
    try:
        page = build(tmp)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        old = run_dir / f".{REPORT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "index.html"


# -- html helpers ------------------------------------------------------------------------------

def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, subtitle: str, body: str) -> str:
    """A complete HTML document around ``body``."""
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<link rel=\"icon\" href=\"data:,\">"  # no favicon request
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><div class=\"sub\">{subtitle}</div></header>"
        f"<main>{body}</main>"
        f"<footer>camsweep {esc(__version__)} · report written {esc(stamp)}</footer>"
        f"<script>{CHECK_JS}</script></body></html>\n")


def fmt(value: Any, pattern: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return pattern.format(value)


def cards(items: Sequence[tuple[str, Any, bool]]) -> str:
    """Big-number cards: (label, value, is_bad)."""
    return "<div class=\"cards\">" + "".join(
        f"<div class=\"card{' bad' if bad else ''}\"><div class=\"v\">{esc(v)}</div>"
        f"<div class=\"k\">{esc(k)}</div></div>" for k, v, bad in items) + "</div>"


def figure_table(rows: list[dict[str, Any]], keys: list[str], label_cols: list[str],
                 figures: dict[str, tuple[str, str, str]]) -> str:
    """A table of figures with the best value of each column in bold green."""
    best: dict[str, float] = {}
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        if len(values) > 1:
            direction = figures[key][2]
            best[key] = (min(values, key=abs) if direction == "zero" else
                         min(values) if direction == "down" else max(values))
    head = "".join(f"<th>{esc(c)}</th>" for c in label_cols)
    head += "".join(
        f"<th class=\"num\" title=\"{esc(HELP.get(k, ''))}; {BETTER[figures[k][2]]}\">"
        f"{esc(figures[k][0])} {ARROW[figures[k][2]]}</th>" for k in keys)
    body = []
    for r in rows:
        cells = "".join(f"<td>{esc(r.get(c, ''))}</td>" for c in label_cols)
        for k in keys:
            v = r.get(k)
            cls = "num best" if k in best and v == best[k] else "num"
            cells += f"<td class=\"{cls}\">{fmt(v, figures[k][1])}</td>"
        body.append(f"<tr>{cells}</tr>")
    return (f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


# -- plots -------------------------------------------------------------------------------------

def _figure(width: float, height: float) -> Any:
    # The object-oriented API needs no pyplot state and no backend switch (Agg canvas).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _style(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.xaxis.label.set_size(9)
    ax.yaxis.label.set_size(9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _save(fig: Any, out: Path, name: str) -> str:
    fig.savefig(out / "plots" / name, format="svg")
    return f"plots/{name}"


def plot_grid(panels: list[tuple[str, Any]], out: Path, name: str, cols: int = 3,
              size: tuple[float, float] = (4.2, 3.0)) -> str | None:
    """Small multiples: ``panels`` are (title, draw(ax)) pairs; returns the relative path."""
    if not panels:
        return None
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(size[0] * cols, size[1] * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (title, draw) in zip(axes.flat, panels, strict=False):
        draw(ax)
        _style(ax, title)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _save(fig, out, name)


def _plots_html(items: list[tuple[str | None, str]]) -> str:
    figs = [f"<figure><img src=\"{esc(src)}\" alt=\"{esc(cap)}\"><figcaption>{esc(cap)}"
            "</figcaption></figure>" for src, cap in items if src]
    return f"<div class=\"plots\">{''.join(figs)}</div>" if figs else ""


# -- run report --------------------------------------------------------------------------------

def _class_name(categories: list[str], cls: int) -> str:
    name = categories[cls] if 0 <= cls < len(categories) else ""
    return f"{cls} {name}".strip() if cls >= 0 else "–"


def _thumbnail(src: Path, dst: Path) -> bool:
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


@dataclass
class _MapInfo:
    """One picture per gallery image: a stored map, or one class of a target=topk map."""

    group: str
    layer: str
    key: str  # HDF5 path "group/dataset"
    k: int | None = None  # the class axis position of a target=topk map

    @property
    def shown(self) -> str:
        """The layer as render_run names its pictures."""
        return self.layer if self.k is None else f"{self.layer}-top{self.k + 1}"

    @property
    def view(self) -> str:
        return self.key if self.k is None else f"{self.key}#{self.k}"


class _RunPage:
    """Collects what a run's page shows and renders it."""

    def __init__(self, run_dir: Path, out: Path, cfg: Any) -> None:
        self.run_dir = run_dir
        self.out = out
        self.cfg = cfg
        report_cfg = getattr(cfg, "report", None)
        self.max_images = int(getattr(report_cfg, "max_images", 24) or 0)

    def build(self) -> str:
        from .metrics.file import read_metrics, summarize
        from .results import load_run

        with load_run(self.run_dir / "results.h5") as run, \
                read_metrics(self.run_dir, run.file) as metrics:
            f = run.file
            self.maps = self._maps(f)
            status = run.status
            self.categories = run.categories
            done = np.flatnonzero(status == 1)
            rows = done[: self.max_images]
            pictures = self._pictures(f, rows)
            summaries = summarize(metrics) if metrics is not None else []
            sections = [
                self._overview(run, status),
                self._metrics_section(summaries, metrics),
                self._gallery(run, rows, len(done), pictures, metrics),
                self._failed(run, status),
                self._config(run),
            ]
            title = f"camsweep · {run.model} · {run.method}"
            layers = ", ".join(run.layers) or "input"
            subtitle = (f"run <code>{esc(self.run_dir)}</code> · layers <code>{esc(layers)}</code>"
                        f" · created {esc(str(f.attrs.get('created', '?'))[:19])}")
        return page(title, subtitle, "".join(s for s in sections if s))

    def _maps(self, f: h5py.File) -> list[_MapInfo]:
        from .render import checked_maps, pictures_of

        maps = checked_maps(f, self.run_dir / "results.h5")
        return [_MapInfo(m.group, m.layer, m.key, k) for m, k in pictures_of(f, maps)]

    def _pictures(self, f: h5py.File, rows: np.ndarray) -> dict[tuple[int, str], str]:
        """(row, map view) -> gallery picture path relative to the page, from render_run's
        pictures (drawn now for the gallery's rows if any is missing)."""
        from .pictures import picture_name
        from .render import PICTURES, render_run

        if not len(rows) or not self.maps:
            return {}
        paths = f["images/path"].asstr()[:]
        digits = len(str(max(len(paths) - 1, 0)))
        names = {(int(r), m.view): picture_name(paths[r], int(r), digits, m.shown, m.group)
                 for r in rows for m in self.maps}
        source = self.run_dir / PICTURES
        if any(not (source / n).is_file() for n in names.values()):
            render = getattr(self.cfg, "render", None)
            # render_run's max_images counts done rows, and the gallery shows the first ones.
            options = SimpleNamespace(
                image_weight=getattr(render, "image_weight", 0.5),
                title=getattr(render, "title", True), max_images=len(rows),
                grid_channels=getattr(render, "grid_channels", 64))
            render_run(self.run_dir, options)
        out: dict[tuple[int, str], str] = {}
        for key, name in names.items():
            dst = self.out / "img" / (Path(name).stem + ".jpg")
            if (source / name).is_file() and _thumbnail(source / name, dst):
                out[key] = f"img/{dst.name}"
        return out

    def _overview(self, run: Any, status: np.ndarray) -> str:
        n = len(status)
        done = int((status == 1).sum())
        failed = int((status == 2).sum())
        pending = n - done - failed
        items: list[tuple[str, Any, bool]] = [("images", n, False), ("done", done, False),
                                              ("failed", failed, failed > 0)]
        if pending:
            items.append(("pending", pending, True))
        if done:
            cls, prob = run.predictions
            ok = status == 1
            items.append(("mean top-1 prob", f"{prob[ok, 0].mean():.3f}", False))
            labeled = ok & (run.labels >= 0)
            if labeled.any():
                acc = float((cls[labeled, 0] == run.labels[labeled]).mean())
                items.append((f"top-1 accuracy ({int(labeled.sum())} labelled)",
                              f"{100 * acc:.1f}%", False))
        return f"<section>{cards(items)}</section>"

    def _metrics_section(self, summaries: list[Any], metrics: h5py.Group | None) -> str:
        if metrics is None or not summaries:
            return ("<section><h2>Metrics</h2><p class=\"muted\">No metrics yet: run "
                    f"<code>python run.py stage=evaluate run_dir={esc(self.run_dir)}</code>."
                    "</p></section>")
        keys = [k for k in FIGURES if any(k in s.figures for s in summaries)]
        rows = [{"map": s.key, "images": s.n, **s.figures} for s in summaries]
        settings = json.loads(metrics.attrs.get("settings", "{}"))
        note = (f"score: {esc(settings.get('score', '?'))} of the target class · deletion "
                f"baseline {esc(settings.get('deletion_baseline', '?'))}, insertion baseline "
                f"{esc(settings.get('insertion_baseline', '?'))}, {esc(settings.get('steps'))} "
                f"steps · evaluated {esc(str(metrics.attrs.get('created', '?'))[:19])}")
        check = metrics.attrs.get("score_check_max_abs_diff")
        if check is not None:
            note += f" · reproduction check: max |Δ logit| {float(check):.2g}"
        plots = _plots_html(self._metric_plots(metrics, summaries))
        return (f"<section><h2>Metrics<small>means over the evaluated images</small></h2>"
                f"{figure_table(rows, keys, ['map', 'images'], FIGURES)}"
                f"<p class=\"muted\">{note}</p>{plots}</section>")

    def _metric_plots(self, metrics: h5py.Group, summaries: list[Any]) -> list[
            tuple[str | None, str]]:
        keys = [s.key for s in summaries if s.key in metrics]
        color = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
        panels = []
        for mode in ("deletion", "insertion"):
            if not any(mode in metrics[k] for k in keys):
                continue

            def draw(ax: Any, mode: str = mode) -> None:
                for k in keys:
                    if mode in metrics[k]:
                        curves = metrics[k][mode][:]
                        curves = curves.reshape(-1, curves.shape[-1])  # topk: all classes
                        curves = curves[np.isfinite(curves).all(1)]
                        if len(curves):
                            xs = np.linspace(0, 1, curves.shape[1])
                            ax.plot(xs, curves.mean(0), color=color[k], label=k, lw=1.6)
                ax.legend(fontsize=7, frameon=False)
                ax.set(xlabel=f"fraction of pixels {mode[:-3]}ed", ylabel="target score")

            panels.append((f"{mode.capitalize()} curve (mean)", draw))
        removed = json.loads(metrics.attrs.get("road_removed_percent", "[]"))
        if removed and any("road_morf" in metrics[k] for k in keys):
            def draw_road(ax: Any) -> None:
                for k in keys:
                    if "road_morf" in metrics[k]:
                        for name, style in (("road_morf", "-"), ("road_lerf", "--")):
                            v = metrics[k][name][:]
                            v = v.reshape(-1, v.shape[-1])
                            v = v[np.isfinite(v).all(1)]
                            if len(v):
                                ax.plot(removed, v.mean(0), style, color=color[k], lw=1.6,
                                        marker="o", ms=3,
                                        label=f"{k} {name.split('_')[1].upper()}")
                ax.legend(fontsize=7, frameon=False)
                ax.set(xlabel="% of pixels removed and imputed", ylabel="target score")

            panels.append(("ROAD: MoRF solid (low is good), LeRF dashed", draw_road))
        out: list[tuple[str | None, str]] = [
            (plot_grid(panels, self.out, "faithfulness.svg", cols=3),
             "Faithfulness curves, mean over images")]
        layers = json.loads(metrics.attrs.get("sanity_layers", "[]"))
        if layers and any("sanity_spearman" in metrics[k] for k in keys):
            def draw_sanity(ax: Any) -> None:
                xs = np.arange(1, len(layers) + 1)
                for k in keys:
                    if "sanity_spearman" in metrics[k]:
                        rho = metrics[k]["sanity_spearman"][:]
                        rho = rho.reshape(-1, rho.shape[-1])
                        rho = rho[np.isfinite(rho[:, 0])]
                        if len(rho):
                            mean = np.nanmean(rho, 0)
                            std = np.nanstd(rho, 0)
                            ax.plot(xs, mean, color=color[k], marker="o", ms=3, lw=1.6, label=k)
                            ax.fill_between(xs, mean - std, mean + std, color=color[k],
                                            alpha=0.15, lw=0)
                ax.axhline(0, color="#9ca3af", lw=0.8)
                ax.set_xticks(xs, layers, rotation=60, ha="right", fontsize=7)
                ax.set_ylim(-1.05, 1.05)
                ax.legend(fontsize=7, frameon=False)
                ax.set(xlabel="randomized down to (cascading, from the logits)",
                       ylabel="Spearman ρ")

            width = max(6.0, 0.35 * len(layers) + 2)
            out.append((plot_grid([("Sanity check: rank correlation with the stored map",
                                    draw_sanity)], self.out, "sanity.svg", cols=1,
                                  size=(width, 3.6)),
                        "Cascading randomization (Adebayo et al.): a map that depends on the "
                        "weights falls towards 0"))
        return out

    def _gallery(self, run: Any, rows: np.ndarray, n_done: int,
                 pictures: dict[tuple[int, str], str], metrics: h5py.Group | None) -> str:
        if not len(rows):
            return ""
        paths = run.paths
        labels = run.labels
        cls, prob = run.predictions
        target, score = run.targets
        per_image: dict[str, dict[str, np.ndarray]] = {}
        if metrics is not None:
            for m in self.maps:
                if m.key in metrics:
                    g = metrics[m.key]
                    per_image[m.key] = {k: g[k][:] for k in (
                        "deletion_auc", "insertion_auc", "drop", "pointing_hit",
                        "pointing_energy", "road") if k in g}
        items = []
        for r in rows:
            r = int(r)
            label = int(labels[r])
            top = int(cls[r, 0])
            verdict = ""
            if label >= 0:
                verdict = ("<span class=\"ok\">✓ correct</span>" if top == label
                           else "<span class=\"miss\">✗ wrong</span>")
            head = (f"<span class=\"name\">{esc(Path(paths[r]).name)}</span>"
                    f"<span class=\"muted\">row {r}</span>"
                    f"<span>label <b>{esc(_class_name(self.categories, label))}</b></span>"
                    f"<span>top-1 <b>{esc(_class_name(self.categories, top))}</b> "
                    f"({prob[r, 0]:.2f}) {verdict}</span>")
            if target.ndim == 1:  # target=topk: the class is named under each picture
                head += (f"<span>explained <b>"
                         f"{esc(_class_name(self.categories, int(target[r])))}</b> "
                         f"(logit {score[r]:.2f})</span>")
            maps = []
            for m in self.maps:
                src = pictures.get((r, m.view))
                img = (f"<img src=\"{esc(src)}\" alt=\"{esc(m.view)} of {esc(paths[r])}\">"
                       if src else "<div class=\"muted\">no picture</div>")
                what = ""
                if m.k is not None:
                    what = (f" · top-{m.k + 1} "
                            f"{esc(_class_name(self.categories, int(target[r, m.k])))}")
                index = (r,) if m.k is None else (r, m.k)
                maps.append(f"<div class=\"map\">{img}<div class=\"cap\"><b>{esc(m.group)}</b> "
                            f"{esc(m.layer)}{what}</div>"
                            f"{self._chips(per_image.get(m.key), index)}</div>")
            items.append(f"<div class=\"item\"><div class=\"head\">{head}</div>"
                         f"<div class=\"maps\">{''.join(maps)}</div></div>")
        more = (f"<small>first {len(rows)} of {n_done} done images (report.max_images)</small>"
                if n_done > len(rows) else f"<small>{len(rows)} images</small>")
        return (f"<section><h2>Gallery{more}</h2><div class=\"gallery\">{''.join(items)}</div>"
                "<p class=\"muted\">Full-size pictures: <code>pictures/</code> beside "
                "<code>results.h5</code>.</p></section>")

    @staticmethod
    def _chips(values: dict[str, np.ndarray] | None, r: tuple[int, ...]) -> str:
        if not values:
            return ""
        chips = []
        for key, label, pattern in (("deletion_auc", "del", "{:.3f}"),
                                    ("insertion_auc", "ins", "{:.3f}"),
                                    ("drop", "drop", "{:.0%}"), ("road", "ROAD", "{:.3f}"),
                                    ("pointing_energy", "energy", "{:.0%}")):
            if key in values and np.isfinite(values[key][r]):
                chips.append(f"<span class=\"chip\">{label} "
                             f"{pattern.format(float(values[key][r]))}</span>")
        if "pointing_hit" in values and np.isfinite(values["pointing_hit"][r]):
            hit = values["pointing_hit"][r] > 0.5
            chips.append(f"<span class=\"chip {'hit' if hit else 'nohit'}\">"
                         f"{'hit' if hit else 'miss'}</span>")
        return f"<div class=\"chips\">{''.join(chips)}</div>"

    @staticmethod
    def _failed(run: Any, status: np.ndarray) -> str:
        bad = np.flatnonzero(status == 2)
        if not len(bad):
            return ""
        paths, errors = run.paths, run.errors
        rows = "".join(f"<tr class=\"failed\"><td>{int(r)}</td><td>{esc(paths[r])}</td>"
                       f"<td class=\"err\">{esc(errors[r])}</td></tr>" for r in bad[:500])
        more = f"<p class=\"muted\">… and {len(bad) - 500} more</p>" if len(bad) > 500 else ""
        return (f"<section><h2>Failed images<small>{len(bad)}</small></h2><table><thead><tr>"
                "<th>row</th><th>file</th><th>reason</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>{more}</section>")

    @staticmethod
    def _config(run: Any) -> str:
        text = str(run.file.attrs.get("config", ""))
        return (f"<section><details><summary>Resolved config of the run</summary>"
                f"<pre>{esc(text)}</pre></details></section>") if text else ""


# -- sweep report ------------------------------------------------------------------------------

STANDARD = ("job", "state", "error", "method", "model", "layers", "n", "done", "failed",
            "pending", "mean_prob", "mean_score", "accuracy", "run_dir")


class _SweepPage:
    def __init__(self, root: Path, out: Path) -> None:
        self.root = root
        self.out = out

    def build(self) -> str:
        from .metrics.file import summarize_run
        from .results import load_sweep

        sweep = load_sweep(self.root)
        table = sweep.table
        swept = [c for c in table.columns if c not in STANDARD]
        records: list[dict[str, Any]] = []  # one per (job, map) with metrics
        for _, row in table.iterrows():
            results = Path(row["run_dir"]) / "results.h5"
            if row["state"] not in ("done", "incomplete") or not results.is_file():
                continue
            try:
                for s in summarize_run(results.parent):
                    layer = s.key.split("/", 1)[1]
                    records.append({"job": row["job"], "model": row["model"],
                                    "method": row["method"], "layer": layer, "map": s.key,
                                    "images": s.n, **s.figures})
            except StoreError as e:
                log.warning("report: no metrics of job %s: %s", row["job"], e)
        counts = table["state"].value_counts().to_dict()
        items = [("jobs", len(table), False)] + [
            (state, counts[state], state != "done") for state in ("done", "incomplete",
                                                                  "failed", "missing")
            if counts.get(state)]
        sections = [f"<section>{cards(items)}</section>",
                    self._plots(table, records),
                    self._jobs(table, swept),
                    self._metrics_table(records)]
        subtitle = (f"sweep <code>{esc(self.root)}</code> · swept: "
                    f"<code>{esc(', '.join(swept) or '–')}</code>")
        return page(f"camsweep sweep · {len(table)} jobs", subtitle,
                    "".join(s for s in sections if s))

    def _jobs(self, table: Any, swept: list[str]) -> str:
        head = ("<th>job</th>" + "".join(f"<th>{esc(c)}</th>" for c in swept)
                + "<th>state</th><th>model</th><th>method</th><th>layers</th>"
                "<th class=\"num\">done / n</th><th class=\"num\">failed</th>"
                "<th class=\"num\">mean top-1 prob</th><th class=\"num\">accuracy</th>"
                "<th>report</th>")
        body = []
        for _, row in table.iterrows():
            state = str(row["state"])
            job_dir = Path(row["run_dir"])
            link = job_dir / REPORT / "index.html"
            rel = f"../{job_dir.name}/{REPORT}/index.html"
            cells = f"<td>{esc(row['job'])}</td>" + "".join(
                f"<td>{esc(row[c])}</td>" for c in swept)
            shown = state.upper() if state == "failed" else state
            cells += f"<td><span class=\"badge {esc(state)}\">{esc(shown)}</span>"
            if row["error"]:
                cells += f"<div class=\"err\">{esc(row['error'])}</div>"
            cells += (f"</td><td>{esc(row['model'])}</td><td>{esc(row['method'])}</td>"
                      f"<td>{esc(row['layers'])}</td>"
                      f"<td class=\"num\">{int(row['done'])} / {int(row['n'])}</td>"
                      f"<td class=\"num\">{int(row['failed'])}</td>"
                      f"<td class=\"num\">{fmt(float(row['mean_prob']))}</td>"
                      f"<td class=\"num\">{fmt(float(row['accuracy']))}</td>"
                      + (f"<td><a href=\"{esc(rel)}\">open</a></td>" if link.is_file()
                         else "<td class=\"muted\">–</td>"))
            cls = " class=\"failed\"" if state != "done" else ""
            body.append(f"<tr{cls}>{cells}</tr>")
        return (f"<section><h2>Jobs</h2><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table></section>")

    @staticmethod
    def _metrics_table(records: list[dict[str, Any]]) -> str:
        if not records:
            return ("<section><h2>Metrics</h2><p class=\"muted\">No job has metrics yet: run "
                    "<code>stage=evaluate</code> on the jobs (e.g. "
                    "<code>python run.py stage=evaluate run_dir=&lt;sweep&gt;/&lt;job&gt;</code>)"
                    ".</p></section>")
        keys = [k for k in FIGURES if any(k in r for r in records)]
        labels = ["job", "model", "method", "layer", "images"]
        return (f"<section><h2>Metrics per job and map</h2>"
                f"{figure_table(records, keys, labels, FIGURES)}</section>")

    def _plots(self, table: Any, records: list[dict[str, Any]]) -> str:
        """Each figure and metric against the layer (one line per model and method) and
        against the model (one bar per layer and method)."""
        ok = table[table["state"].isin(["done", "incomplete"])]
        points: list[dict[str, Any]] = []
        for _, row in ok.iterrows():  # sweep-table figures: one per job, its layers joined
            base = {"model": row["model"], "method": row["method"], "layer": row["layers"]}
            points += [{**base, "figure": k, "value": float(row[k])} for k in SWEEP_FIGURES
                       if np.isfinite(float(row[k]))]
        for r in records:
            base = {"model": r["model"], "method": r["method"], "layer": r["layer"]}
            points += [{**base, "figure": k, "value": float(r[k])} for k in FIGURES
                       if k in r and np.isfinite(float(r[k]))]
        if not points:
            return ""
        labels = {**SWEEP_FIGURES, **FIGURES}
        names = [k for k in labels if any(p["figure"] == k for p in points)]
        layers = list(dict.fromkeys(p["layer"] for p in points))
        models = list(dict.fromkeys(p["model"] for p in points))
        series = list(dict.fromkeys((p["model"], p["method"]) for p in points))
        out: list[tuple[str | None, str]] = []
        if len(layers) > 1:
            panels = [(self._title(labels[k]), self._by_layer(points, k, layers, series))
                      for k in names]
            out.append((plot_grid(panels, self.out, "vs_layer.svg"),
                        "Against the layer: one line per model and method"))
        if len(models) > 1:
            groups = list(dict.fromkeys((p["layer"], p["method"]) for p in points))
            panels = [(self._title(labels[k]), self._by_model(points, k, models, groups))
                      for k in names]
            out.append((plot_grid(panels, self.out, "vs_model.svg"),
                        "Against the model: one bar per layer and method"))
        if not out:
            return ""
        return f"<section><h2>Figures and metrics across the sweep</h2>{_plots_html(out)}</section>"

    @staticmethod
    def _title(spec: tuple[str, str, str]) -> str:
        return f"{spec[0]} ({BETTER[spec[2]]})"

    @staticmethod
    def _by_layer(points: list[dict[str, Any]], key: str, layers: list[str],
                  series: list[tuple[str, str]]) -> Any:
        def draw(ax: Any) -> None:
            xs = {layer: i for i, layer in enumerate(layers)}
            for i, (model, method) in enumerate(series):
                pts = sorted((xs[p["layer"]], p["value"]) for p in points
                             if p["figure"] == key and p["model"] == model
                             and p["method"] == method)
                if pts:
                    ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", ms=4, lw=1.6,
                            color=PALETTE[i % len(PALETTE)], label=f"{model} · {method}")
            ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=7)
            ax.legend(fontsize=7, frameon=False)
            ax.set_xlabel("layer")

        return draw

    @staticmethod
    def _by_model(points: list[dict[str, Any]], key: str, models: list[str],
                  groups: list[tuple[str, str]]) -> Any:
        def draw(ax: Any) -> None:
            width = 0.8 / max(1, len(groups))
            for i, (layer, method) in enumerate(groups):
                xs, vs = [], []
                for j, model in enumerate(models):
                    v = [p["value"] for p in points if p["figure"] == key and p["model"] == model
                         and p["layer"] == layer and p["method"] == method]
                    if v:
                        xs.append(j - 0.4 + width * (i + 0.5))
                        vs.append(float(np.mean(v)))
                if xs:
                    ax.bar(xs, vs, width=width * 0.92, color=PALETTE[i % len(PALETTE)],
                           label=f"{layer} · {method}")
            ax.set_xticks(range(len(models)), models, fontsize=8)
            ax.legend(fontsize=7, frameon=False)
            ax.set_xlabel("model")

        return draw
