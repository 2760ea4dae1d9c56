"""What ``run.py`` does with a composed config: dispatch on ``cfg.stage``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import config as _config  # registers the schemas and resolvers Hydra needs
from .errors import CamsweepError, ConfigError, unknown

log = logging.getLogger("camsweep")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "data", "target", "hydra/launcher")
STATUS_FILE = "camsweep.json"  # per job: outcome and figures, read by load_sweep


def run_dir_of(cfg: DictConfig) -> Path:
    """The run's directory: ``run_dir`` if given, else the one Hydra made for this job."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the configured stage(s) in ``run_dir``; returns plain data (submitit pickles it)."""
    from .extract import extract
    from .merge import merge_if_complete, merge_shards

    stage = cfg.stage
    result: dict[str, Any] = {"run_dir": str(run_dir), "stage": stage}
    results = run_dir / "results.h5"
    if stage in ("all", "extract"):
        summary = extract(cfg, run_dir)
        for line in summary.lines():
            log.info(line)
        result.update(done=summary.done, failed=summary.failed, n=summary.n,
                      results=str(summary.path))
        if summary.done == 0 and summary.n > 0:
            raise CamsweepError(f"no image could be processed ({summary.failed} failed); "
                                f"first reason: {summary.errors[0][1] if summary.errors else '?'}")
        if summary.path != results:  # a shard: the last one to finish merges them all
            merged = merge_if_complete(run_dir)
            if merged is None:
                log.info("shard done; the last shard to finish merges into %s", results)
                stage = "extract"  # nothing whole to render yet
            else:
                log.info("all shards done, merged -> %s", merged)
                result["results"] = str(merged)
    if stage == "merge":
        merged = merge_shards(run_dir, copy=cfg.merge_copy)
        log.info("merged -> %s", merged)
        result["results"] = str(merged)
    if stage in ("all", "render"):
        from .render import render_run

        written = render_run(run_dir, cfg.render)
        log.info("%d pictures -> %s", len(written), run_dir / "pictures")
        result["pictures"] = len(written)
    if stage == "evaluate":
        from .evaluate import evaluate

        scored = evaluate(cfg, run_dir)
        for line in scored.lines():
            log.info(line)
        result.update(evaluated=scored.evaluated, metrics=str(scored.path))
    if stage == "report":
        from .report import report

        page = report(run_dir, cfg)
        log.info("report -> %s", page)
        result["report"] = str(page)
    return result


def _write_status(run_dir: Path, status: dict[str, Any]) -> None:
    if run_dir.is_dir():
        (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=1))


def main(cfg: DictConfig) -> dict[str, Any]:
    """Hydra task. A user error becomes one line and exit code 2 (traceback with
    HYDRA_FULL_ERROR=1); in a multirun the job is marked failed and the sweep goes on."""
    run_dir = run_dir_of(cfg)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        result = run(cfg, run_dir)
    except CamsweepError as e:
        if cfg.stage in ("all", "extract"):  # a refused render/evaluate leaves results intact
            _write_status(run_dir, {"status": "failed", "error": str(e), "stage": cfg.stage})
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        if multirun:
            return {"run_dir": str(run_dir), "status": "failed", "error": str(e)}
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BaseException as e:
        if cfg.stage in ("all", "extract"):
            _write_status(run_dir, {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                    "stage": cfg.stage})
        raise
    result["status"] = "ok"
    if cfg.stage in ("all", "extract"):
        _write_status(run_dir, result)
    return result


def check_overrides(argv: list[str]) -> None:
    """Catch a misspelled config group option or key before Hydra composes anything, so the
    user gets one line with the closest valid names instead of a multi-line report."""
    keys = set(_config.CamsweepConfig.__dataclass_fields__) | {"hydra"}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS:
            options = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
            if key == "hydra/launcher":
                options += ["basic", "submitit_local", "submitit_slurm"]
            for choice in value.split(","):
                if choice and choice not in options:
                    raise ConfigError(unknown(key, choice, options))
        elif not arg.startswith("+") and key.split(".")[0] not in keys:
            raise ConfigError(unknown("config key", key, sorted(keys - {"hydra"})))
