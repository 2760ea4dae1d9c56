"""What each stage does when ``run.py`` runs it: ``fn(cfg, run_dir) -> figures`` (plain data
for the job's status and the launcher), logging its own summary.

``pipeline.config.STAGES`` names these functions as ``"module:function"`` and the CLI imports
only the chosen one: each function imports what its stage needs when it runs, so a stage
that only reads files (render, report) never loads torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .errors import CamsweepError

log = logging.getLogger("camsweep")


def extract(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Explain the configured images into ``results.h5`` (a shard: into its own file, and
    the last shard to finish merges them all)."""
    from .extract import extract as extract_run
    from .merge import merge_if_complete

    summary = extract_run(cfg, run_dir)
    for line in summary.lines():
        log.info(line)
    result: dict[str, Any] = dict(done=summary.done, failed=summary.failed, n=summary.n,
                                  results=str(summary.path))
    if summary.done == 0 and summary.n > 0:
        raise CamsweepError(f"no image could be processed ({summary.failed} failed); "
                            f"first reason: {summary.errors[0][1] if summary.errors else '?'}")
    if summary.path != run_dir / "results.h5":  # a shard
        merged = merge_if_complete(run_dir)
        if merged is None:
            log.info("shard done; the last shard to finish merges into %s",
                     run_dir / "results.h5")
        else:  # merge_if_complete logged whether this shard merged
            result["results"] = str(merged)
    return result


def extract_and_render(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``stage=all``: extract, then draw the pictures once the run's results are whole."""
    result = extract(cfg, run_dir)
    if Path(result["results"]) == run_dir / "results.h5":  # not a shard still waiting
        result.update(render(cfg, run_dir))
    return result


def merge(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from .merge import merge_shards

    merged = merge_shards(run_dir, copy=cfg.merge_copy)
    log.info("merged -> %s", merged)
    return {"results": str(merged)}


def render(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from .render import render_run

    written = render_run(run_dir, cfg.render)
    log.info("%d pictures -> %s", len(written), run_dir / "pictures")
    return {"pictures": len(written)}


def evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from .evaluate import evaluate as evaluate_run

    scored = evaluate_run(cfg, run_dir)
    for line in scored.lines():
        log.info(line)
    return {"evaluated": scored.evaluated, "metrics": str(scored.path)}


def report(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from .report import report as write_report

    page = write_report(run_dir, cfg)
    log.info("report -> %s", page)
    return {"report": str(page)}
