"""The report's plots, as SVG files under ``<report>/plots``: faithfulness curves and the
sanity check of a run, and every figure against the layer and the model for a sweep.

Matplotlib's object-oriented API only (no pyplot state, no backend switch). Each function
returns ``{"src", "caption"}`` items for the templates' ``plots`` macro.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .page import BETTER, FIGURES, SWEEP_FIGURES

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777",
           "#65a30d", "#475569", "#ea580c")
Draw = Callable[[Any], None]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _style(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.xaxis.label.set_size(9)
    ax.yaxis.label.set_size(9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_grid(panels: list[tuple[str, Draw]], out: Path, name: str, cols: int = 3,
              size: tuple[float, float] = (4.2, 3.0)) -> str | None:
    """Small multiples: ``panels`` are (title, draw(ax)) pairs, saved as ``out/plots/name``;
    returns the path relative to the page (None without panels)."""
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
    fig.savefig(out / "plots" / name, format="svg")
    return f"plots/{name}"


def _item(src: str | None, caption: str) -> list[dict[str, str]]:
    return [{"src": src, "caption": caption}] if src else []


def _finite_rows(values: np.ndarray) -> np.ndarray:
    values = values.reshape(-1, values.shape[-1])  # target=topk: all classes
    return values[np.isfinite(values).all(1)]


# -- a run ---------------------------------------------------------------------------------

def run_plots(metrics: h5py.Group, keys: list[str], out: Path) -> list[dict[str, str]]:
    """Mean deletion / insertion / ROAD curves of each map, and the sanity check's rank
    correlation per randomized layer, from a run's metrics (see
    :func:`pipeline.store.metrics.read_metrics`)."""
    color = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(keys)}
    panels: list[tuple[str, Draw]] = []
    for mode in ("deletion", "insertion"):
        if not any(mode in metrics[k] for k in keys):
            continue

        def draw(ax: Any, mode: str = mode) -> None:
            for k in keys:
                if mode in metrics[k]:
                    curves = _finite_rows(metrics[k][mode][:])
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
                        v = _finite_rows(metrics[k][name][:])
                        if len(v):
                            ax.plot(removed, v.mean(0), style, color=color[k], lw=1.6,
                                    marker="o", ms=3, label=f"{k} {name.split('_')[1].upper()}")
            ax.legend(fontsize=7, frameon=False)
            ax.set(xlabel="% of pixels removed and imputed", ylabel="target score")

        panels.append(("ROAD: MoRF solid (low is good), LeRF dashed", draw_road))
    out_items = _item(plot_grid(panels, out, "faithfulness.svg", cols=3),
                      "Faithfulness curves, mean over images")
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
        out_items += _item(plot_grid([("Sanity check: rank correlation with the stored map",
                                       draw_sanity)], out, "sanity.svg", cols=1,
                                     size=(width, 3.6)),
                           "Cascading randomization (Adebayo et al.): a map that depends on "
                           "the weights falls towards 0")
    return out_items


# -- a sweep -------------------------------------------------------------------------------

def sweep_plots(table: Any, records: list[dict[str, Any]],
                out: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Each figure and metric against the layer (one line per model and method) and
    against the model (one bar per layer and method); a figure that is flat in a plot (the
    same value wherever the plot's x changes: e.g. the accuracy of one model across a layer
    sweep) gets no panel there, and is listed with its value instead.

    Args:
        table: ``load_sweep(...).table``: one row per job.
        records: One dict per (job, map) with metrics: model, method, layer and figures.
        out: The report folder.

    Returns:
        The plots (``{"src", "caption"}``) and the flat figures left out (``{"figure",
        "where", "value"}``).
    """
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
        return [], []
    labels = {**SWEEP_FIGURES, **FIGURES}
    names = [k for k in labels if any(p["figure"] == k for p in points)]
    layers = list(dict.fromkeys(p["layer"] for p in points))
    models = list(dict.fromkeys(p["model"] for p in points))
    items: list[dict[str, str]] = []
    flat: list[dict[str, str]] = []
    for x, others, name, caption in (
            ("layer", ("model", "method"), "vs_layer.svg",
             "Against the layer: one line per model and method"),
            ("model", ("layer", "method"), "vs_model.svg",
             "Against the model: one bar per layer and method")):
        if len(layers if x == "layer" else models) < 2:
            continue
        panels = []
        for k in names:
            mine = [p for p in points if p["figure"] == k]
            if is_flat(mine, x, others):
                everywhere = _same([p["value"] for p in mine])
                entry = {"figure": labels[k][0],
                         "where": "in every job" if everywhere else f"for every {x}",
                         "value": _values(mine, () if everywhere else others, labels[k][1])}
                if entry not in flat:
                    flat.append(entry)
            elif x == "layer":
                panels.append((_title(labels[k]), _by_layer(
                    mine, k, layers, list(dict.fromkeys((p["model"], p["method"])
                                                        for p in mine)))))
            else:
                panels.append((_title(labels[k]), _by_model(
                    mine, k, models, list(dict.fromkeys((p["layer"], p["method"])
                                                        for p in mine)))))
        items += _item(plot_grid(panels, out, name), caption)
    return items, flat


def is_flat(points: list[dict[str, Any]], x: str, series: tuple[str, ...],
            rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """Whether a figure's ``points`` draw flat lines against ``x``: within each series
    (points equal in the ``series`` keys) every value is the same (to ``rtol``/``atol``),
    and some series has points at two x; or, when none has, all values are the same."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(tuple(p[k] for k in series), []).append(p)
    if any(len({p[x] for p in g}) > 1 for g in groups.values()):
        return all(_same([p["value"] for p in g], rtol, atol) for g in groups.values())
    return _same([p["value"] for p in points], rtol, atol)


def _same(values: list[float], rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    return bool(np.allclose(values, values[0], rtol=rtol, atol=atol))


def _values(points: list[dict[str, Any]], series: tuple[str, ...], pattern: str) -> str:
    """A flat figure's value as text: ``0.512``, or one per series when they differ
    (``resnet18 gradcam 0.512, resnet34 gradcam 0.498``)."""
    texts = {" ".join(str(p[k]) for k in series): pattern.format(p["value"]) for p in points}
    if not series:
        return next(iter(texts.values()))
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return ", ".join(f"{name} {text}" for name, text in texts.items())


def _title(spec: tuple[str, str, str]) -> str:
    return f"{spec[0]} ({BETTER[spec[2]]})"


def _by_layer(points: list[dict[str, Any]], key: str, layers: list[str],
              series: list[tuple[str, str]]) -> Draw:
    def draw(ax: Any) -> None:
        xs = {layer: i for i, layer in enumerate(layers)}
        for i, (model, method) in enumerate(series):
            pts = sorted((xs[p["layer"]], p["value"]) for p in points
                         if p["figure"] == key and p["model"] == model and p["method"] == method)
            if pts:
                ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", ms=4, lw=1.6,
                        color=PALETTE[i % len(PALETTE)], label=f"{model} · {method}")
        ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7, frameon=False)
        ax.set_xlabel("layer")

    return draw


def _by_model(points: list[dict[str, Any]], key: str, models: list[str],
              groups: list[tuple[str, str]]) -> Draw:
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
