"""``stage=evaluate run_dir=<sweep folder>``: evaluate every job of a sweep (or any folder of
runs), skip those already evaluated with the same settings, end with one table, and fail
(naming the failed jobs) only after trying them all."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import CamsweepError, StoreError
from .store import (
    INPUT_MAP,
    LAYER_MAP,
    identity,
    open_results,
    read_column,
    stored_config,
    stored_maps,
)
from .store.metrics import METRICS_FILE, MapSummary, existing, settings_of, summarize_run

log = logging.getLogger(__name__)
# OS errors of the machine (a full disk, a read-only folder) fail a job, not the sweep.
_ENVIRONMENT = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def job_folders(root: Path) -> list[Path]:
    """The run folders below ``root`` (each holding a ``results.h5``), sorted."""
    from .results import iter_runs

    return [p.parent for p in iter_runs(root)]


def already_evaluated(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether ``run_dir/metrics.h5`` belongs to the current results file and was computed
    with the settings this invocation asks for (every ``evaluate`` key but ``overwrite``
    and ``limit``, maps and score resolved as evaluate resolves them), for every done row."""
    results_path = run_dir / "results.h5"
    with open_results(results_path) as f:
        results = identity(f)
        maps = [m.key for m in stored_maps(f, kinds=(LAYER_MAP, INPUT_MAP))]
        target = stored_config(f, results_path).get("target")
        done = int((read_column(f, "images/status") == 1).sum())
    found = existing(run_dir / METRICS_FILE, results)
    if found is None or found[0] != "current":
        return False
    want = OmegaConf.to_container(cfg.evaluate, resolve=True)
    assert isinstance(want, dict)
    limit = want.pop("limit", None)
    want.pop("overwrite", None)
    want["maps"] = list(want["maps"]) if want["maps"] else maps
    if want["score"] is None:
        want["score"] = str(target.get("score", "logit")) if isinstance(target, dict) else "logit"
    settings, evaluated = settings_of(run_dir / METRICS_FILE)
    rows = done if limit is None else min(done, max(0, int(limit)))
    return evaluated >= rows and all(settings.get(k) == v for k, v in want.items())


@dataclass
class JobEvaluation:
    job: str  # the folder, relative to the sweep's
    state: str  # evaluated | skipped (already evaluated) | failed
    detail: str = ""  # images evaluated, or why it failed
    images: int = 0
    maps: list[MapSummary] = field(default_factory=list)


@dataclass
class SweepEvaluation:
    """What ``stage=evaluate`` did with each job of a sweep; ``lines()`` is the table."""

    path: Path  # the sweep folder
    jobs: list[JobEvaluation]
    notes: list[str] = field(default_factory=list)

    @property
    def evaluated(self) -> int:
        """Images evaluated by this invocation, over all jobs."""
        return sum(j.images for j in self.jobs)

    @property
    def failed(self) -> list[JobEvaluation]:
        return [j for j in self.jobs if j.state == "failed"]

    def lines(self) -> list[str]:
        counts = {s: sum(j.state == s for j in self.jobs)
                  for s in ("evaluated", "skipped", "failed")}
        out = [f"evaluate {self.path}: {len(self.jobs)} jobs, {counts['evaluated']} evaluated, "
               f"{counts['skipped']} already evaluated with these settings, "
               f"{counts['failed']} failed"]
        width = max((len(j.job) for j in self.jobs), default=3)
        for j in self.jobs:
            out.append(f"  {j.job:<{width}}  {j.state:<9}  {j.detail}")
            out += [f"  {'':<{width}}  {'':<9}  {m.line()}" for m in j.maps]
        return out


def evaluate_sweep(cfg: DictConfig, root: Path) -> SweepEvaluation:
    """Evaluate every run folder below ``root`` in turn (one writer per run, as alone).

    Raises:
        StoreError: After every job was tried, when some failed: one line naming them
            (the table is logged first).
    """
    from .evaluate import evaluate

    jobs = job_folders(root)
    outcomes: list[JobEvaluation] = []
    for i, job in enumerate(jobs, 1):
        name = str(job.relative_to(root))
        log.info("evaluate job %d/%d: %s", i, len(jobs), job)
        try:
            if already_evaluated(cfg, job):
                outcomes.append(JobEvaluation(name, "skipped", "metrics.h5 is current",
                                              maps=summarize_run(job)))
                continue
            summary: Any = evaluate(cfg, job)
        except (CamsweepError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in _ENVIRONMENT:
                raise
            log.error("job %s: %s", name, e)
            outcomes.append(JobEvaluation(name, "failed", str(e).splitlines()[0]))
            continue
        detail = f"{summary.evaluated} images" + (
            f", {len(summary.failed)} no longer load" if summary.failed else "")
        outcomes.append(JobEvaluation(name, "evaluated", detail, summary.evaluated,
                                      summary.maps))
    result = SweepEvaluation(root, outcomes)
    if result.failed:
        for line in result.lines():
            log.info(line)
        raise StoreError(f"evaluate: {len(result.failed)} of {len(jobs)} jobs failed: "
                         + "; ".join(f"{j.job} ({j.detail[:160]})" for j in result.failed))
    return result
