"""The page of a sweep (a Hydra multirun folder): the jobs table of
:func:`pipeline.results.load_sweep` (failed jobs marked in red with their error), every
figure and metric plotted against the layer and the model (a figure flat across the sweep is
listed with its value instead), and a table of the metrics per job and map. A job whose
metrics cannot be used (stale, damaged) is listed with the reason instead of its numbers; a
metric dataset missing from a job's metrics file is named, and its cells say "missing"."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..progress import Progress
from ..results import load_sweep
from ..store.metrics import METRICS_FILE
from .metrics_view import missing_figures, missing_note, run_metrics
from .page import FIGURES, card, figure_table, render_page
from .plots import sweep_plots

log = logging.getLogger(__name__)

REPORT = "report"

class SweepPage:
    """Collects what a sweep's page shows, as plain data, and renders ``sweep.html``."""

    def __init__(self, root: Path, out: Path) -> None:
        self.root = root
        self.out = out

    def build(self) -> str:
        sweep = load_sweep(self.root)
        table = sweep.table
        swept = [k for k in sweep.swept if k in table.columns]  # exactly the swept keys
        records: list[dict[str, Any]] = []  # one per (job, map) with metrics
        notes: list[str] = []
        gone: set[tuple[str, str]] = set()  # (job/map, figure) whose dataset is missing
        with Progress(len(table), "report jobs", unit="job") as progress:
            for _, row in table.iterrows():
                progress.update()
                if row["state"] not in ("done", "incomplete"):
                    continue
                try:
                    summaries, missing = run_metrics(row["run_dir"])
                except StoreError as e:  # this job's metrics only; the sweep's page goes on
                    log.warning("report: job %s: %s", row["job"], e)
                    notes.append(f"job {row['job']}: {e}")
                    continue
                if missing:
                    notes.append(f"job {row['job']}: " + missing_note(
                        missing, f"{row['job']}/{METRICS_FILE}", row["run_dir"]))
                    gone |= {(f"{row['job']}/{key}", figure)
                             for key, figure in missing_figures(missing)}
                records += [{"job": row["job"], "model": row["model"], "method": row["method"],
                             "layer": s.key.split("/", 1)[1], "map": f"{row['job']}/{s.key}",
                             "images": s.n, **s.figures} for s in summaries]
        overview = [card("jobs", len(table))] + [
            card(state, count, state != "done") for state, count in sweep.counts().items()]
        keys = [k for k in FIGURES
                if any(k in r for r in records) or any(f == k for _, f in gone)]
        plot_items, flat = sweep_plots(table, records, self.out)
        return render_page(
            "sweep.html", title=f"camsweep sweep · {len(table)} jobs", root=str(self.root),
            swept=swept, overview=overview, plot_items=plot_items, flat=flat,
            explore=f"python run.py stage=explore run_dir={self.root}",
            jobs=[self._job(row, swept) for _, row in table.iterrows()],
            # What the job ran, unless a swept column already says it.
            columns={"model": "model" not in swept, "method": "method" not in swept,
                     "layers": "model.target_layers" not in swept},
            metrics=(figure_table(records, keys, ["job", "model", "method", "layer", "images"],
                                  FIGURES, gone) if records else None),
            notes=notes)

    @staticmethod
    def _job(row: Any, swept: list[str]) -> dict[str, Any]:
        job_dir = Path(row["run_dir"])
        link = job_dir / REPORT / "index.html"
        return {"job": row["job"], "swept": [row[c] for c in swept], "state": str(row["state"]),
                "error": row["error"], "model": row["model"], "method": row["method"],
                "layers": row["layers"], "done": int(row["done"]), "n": int(row["n"]),
                "failed": int(row["failed"]), "mean_prob": float(row["mean_prob"]),
                "accuracy": float(row["accuracy"]),
                "report": f"../{job_dir.name}/{REPORT}/index.html" if link.is_file() else None}
