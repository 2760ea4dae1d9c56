"""``/api/images``: filter, sort and page the table from query parameters, every one
checked (a bad one is a :class:`RequestError` naming the valid values). Filters are plain
comparisons on columns; text search is a literal, case-insensitive substring: no query
language, nothing evaluated."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..errors import unknown
from .source import RequestError, Source, parse_float, parse_int

MAX_LIMIT = 500  # rows per page
MAX_TEXT = 200  # characters of a search or a class name
PARAMS = ("sort", "desc", "limit", "offset", "q", "map", "job", "label", "pred", "class",
          "correct", "status", "failed", "per_class", "top")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in TRUE or v in FALSE:
        return v in TRUE
    raise RequestError(f"{name}={value[:40]!r}: use 1 or 0 (true/false)")


def select(src: Source, params: Mapping[str, str]) -> tuple[int, pd.DataFrame]:
    """(rows matching, the requested page of them)."""
    t = src.frame
    ranges = {f"{side}_{c}" for c in src.numeric for side in ("min", "max")}
    for key in params:
        if key not in PARAMS and key not in ranges:
            raise RequestError(unknown("parameter", key, [*PARAMS, *sorted(ranges)],
                                       keep_order=True, show=20))
    keep = np.ones(len(t), dtype=bool)

    def text(name: str) -> str | None:
        value = params.get(name)
        if value is not None and len(value) > MAX_TEXT:
            raise RequestError(f"{name} is {len(value)} characters long; at most {MAX_TEXT}")
        return value or None

    if (m := text("map")) is not None:
        if m not in src.map_names:
            raise RequestError(unknown("map", m, src.map_names, keep_order=True))
        keep &= (t["map"] == m).to_numpy()
    if (j := params.get("job")) not in (None, ""):
        src.job(j)  # the reason, when there is no such job
        keep &= (t["job"] == j).to_numpy()
    if (q := text("q")) is not None:
        hit = np.zeros(len(t), dtype=bool)
        for col in ("file", "label_name", "pred_name"):
            hit |= t[col].str.contains(q, case=False, regex=False, na=False).to_numpy()
        keep &= hit
    for name, cols in (("label", ("label",)), ("pred", ("pred",)), ("class", ("label", "pred"))):
        if (v := text(name)) is not None:
            hit = np.zeros(len(t), dtype=bool)
            for col in cols:
                hit |= _is_class(t, col, v)
            keep &= hit
    if (v := params.get("correct")) not in (None, ""):
        keep &= (t["correct"] == (1.0 if flag("correct", v) else 0.0)).to_numpy()
    if (v := text("status")) is not None:
        if v not in ("done", "failed", "pending"):
            raise RequestError(unknown("status", v, ("done", "failed", "pending")))
        keep &= (t["status"] == v).to_numpy()
    if (v := params.get("failed")) not in (None, ""):
        keep &= (t["status"] == "failed").to_numpy() == flag("failed", v)
    for key in ranges & set(params):
        side, col = key.split("_", 1)
        bound = parse_float(key, params[key], -np.inf, np.inf, np.nan)
        values = t[col].to_numpy()
        with np.errstate(invalid="ignore"):
            keep &= values >= bound if side == "min" else values <= bound
    sort = params.get("sort") or "row"
    if sort not in src.columns:
        raise RequestError(unknown("sort column", sort, src.columns, keep_order=True, show=40))
    desc = flag("desc", params["desc"]) if params.get("desc") else False
    picked = np.flatnonzero(keep)
    key = src.sort_key(sort)[picked]
    # Missing values last either way; ties in (job, row, map) order.
    order = np.lexsort((src.tie[picked], -key if desc else key))
    idx = picked[order]  # table positions, in order: the page is cut before any copy
    if (v := params.get("per_class")) not in (None, ""):
        n = parse_int("per_class", v, 1, 10_000)
        by = t["label" if (t["label"] >= 0).any() else "pred"].to_numpy()[idx]
        idx = idx[pd.Series(by).groupby(by, sort=False).cumcount().to_numpy() < n]
    if (v := params.get("top")) not in (None, ""):
        idx = idx[:parse_int("top", v, 1, len(t) or 1)]
    limit = parse_int("limit", params.get("limit"), 1, MAX_LIMIT, 50)
    offset = parse_int("offset", params.get("offset"), 0, 1 << 40, 0)
    return len(idx), t.iloc[idx[offset:offset + limit]]


def _is_class(t: pd.DataFrame, col: str, value: str) -> np.ndarray:
    """Rows whose class (index or name, case-insensitive) in ``col`` is ``value``."""
    try:
        return (t[col] == int(value.strip(), 10)).to_numpy()
    except ValueError:  # a name
        pass
    return (t[f"{col}_name"].str.lower() == value.strip().lower()).to_numpy()
