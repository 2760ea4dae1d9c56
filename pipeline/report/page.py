"""Page assembly: the jinja2 environment (templates in ``templates/``, shipped as package
data, autoescaped), the figures a report knows, and plain-data builders for the pieces the
templates lay out. Python builds data, the templates make the markup; no HTML here."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from .. import __version__
from ..metrics.registry import figures as metric_figures

TEMPLATES = Path(__file__).parent / "templates"
# Figure -> (label, format, direction): "down" means lower is better. The metrics' figures
# come from their declarations (pipeline.metrics.registry): a new metric shows up here.
_WAY = {"lower": "down", "higher": "up", "zero": "zero"}
FIGURES: dict[str, tuple[str, str, str]] = {
    f.key: (f.label + (f" {f.unit}" if f.unit else ""), f.format, _WAY[f.direction])
    for f in metric_figures()}
# Longer explanations, shown as column tooltips.
HELP = {
    **{f.key: f.help for f in metric_figures()},
    "mean_prob": "mean top-1 probability", "accuracy": "top-1 accuracy (labelled images)",
    "mean_score": "mean explained target score (target.score; the logit by default)",
}
SWEEP_FIGURES: dict[str, tuple[str, str, str]] = {
    "mean_prob": ("Mean top-1 prob", "{:.3f}", "up"),
    "accuracy": ("Top-1 accuracy", "{:.3f}", "up"),
    "mean_score": ("Mean target score", "{:.2f}", "up"),
}
ARROW = {"down": "↓", "up": "↑", "zero": "→0"}
BETTER = {"down": "lower is better", "up": "higher is better", "zero": "closer to 0 is better"}


def fmt(value: Any, pattern: str = "{:.3f}") -> str:
    """A figure as text; missing or non-finite values as a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return pattern.format(value)


@cache
def environment() -> jinja2.Environment:
    """The templates, HTML autoescaped (the CSS and JS they include are not HTML)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",)),
        undefined=jinja2.StrictUndefined,  # a misspelled name fails, not an empty cell
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = fmt
    return env


def render_page(template: str, **context: Any) -> str:
    """A complete HTML document from ``template`` (which extends ``base.html``)."""
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return environment().get_template(template).render(version=__version__, stamp=stamp,
                                                       **context)


def card(label: str, value: Any, bad: bool = False) -> dict[str, Any]:
    return {"label": label, "value": value, "bad": bad}


def figure_table(rows: list[dict[str, Any]], keys: Sequence[str], label_cols: Sequence[str],
                 figures: dict[str, tuple[str, str, str]],
                 missing: Collection[tuple[str, str]] = ()) -> dict[str, Any]:
    """A table of figures as data for the ``figure_table`` macro: the best value of each
    column (when there is more than one) is marked, shown bold green; a (row's ``map``,
    figure) pair in ``missing`` (its dataset is gone from the metrics file) says so."""
    best: dict[str, float] = {}
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        if len(values) > 1:
            direction = figures[key][2]
            best[key] = (min(values, key=abs) if direction == "zero" else
                         min(values) if direction == "down" else max(values))
    heads = [{"text": f"{figures[k][0]} {ARROW[figures[k][2]]}",
              "title": f"{HELP.get(k, '')}; {BETTER[figures[k][2]]}"} for k in keys]
    body = [{"labels": [r.get(c, "") for c in label_cols],
             "cells": [{"text": "missing", "best": False, "missing": True}
                       if (r.get("map"), k) in missing else
                       {"text": fmt(r.get(k), figures[k][1]), "missing": False,
                        "best": k in best and r.get(k) == best[k]} for k in keys]}
            for r in rows]
    return {"labels": list(label_cols), "figures": heads, "rows": body}


def class_name(categories: list[str], cls: int) -> str:
    """``285 Egyptian cat``; a dash for no class (-1)."""
    name = categories[cls] if 0 <= cls < len(categories) else ""
    return f"{cls} {name}".strip() if cls >= 0 else "–"
