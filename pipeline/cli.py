"""What ``run.py`` does with a composed config: dispatch on ``cfg.stage``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import CamsweepError, ConfigError, unknown

log = logging.getLogger("camsweep")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "data", "hydra/launcher")


def run_dir_of(cfg: DictConfig) -> Path:
    """The run's directory: ``run_dir`` if given, else the one Hydra made for this job."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stage(s); returns plain data (submitit pickles it)."""
    from .extract import extract

    stage = cfg.stage
    run_dir = run_dir_of(cfg)
    result: dict[str, Any] = {"run_dir": str(run_dir), "stage": stage}
    if stage in ("all", "extract"):
        summary = extract(cfg, run_dir)
        for line in summary.lines():
            log.info(line)
        result.update(done=summary.done, failed=summary.failed, n=summary.n,
                      results=str(summary.path))
        if summary.done == 0 and summary.n > 0:
            raise CamsweepError(f"no image could be processed ({summary.failed} failed); "
                                f"first reason: {summary.errors[0][1] if summary.errors else '?'}")
    if stage in ("all", "render"):
        from .render import render_run

        written = render_run(run_dir, cfg.render)
        log.info("%d pictures -> %s", len(written), run_dir / "pictures")
        result["pictures"] = len(written)
    if stage == "merge":
        from .merge import merge_shards

        merged = merge_shards(run_dir)
        log.info("merged -> %s", merged)
        result["results"] = str(merged)
    return result


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra task: user errors become one line and exit code 2 (full trace with
    HYDRA_FULL_ERROR=1)."""
    try:
        return run(cfg)
    except CamsweepError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_overrides(argv: list[str]) -> None:
    """Catch a misspelled config group option or key before Hydra composes anything, so the
    user gets one line with the closest valid names instead of a multi-line report."""
    from .config import CamsweepConfig

    keys = set(CamsweepConfig.__dataclass_fields__) | {"hydra"}
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
