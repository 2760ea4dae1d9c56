"""What ``run.py`` does with a composed config: dispatch on ``cfg.stage``."""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import config as _config  # registers the schemas and resolvers Hydra needs
from .cluster.states import STATUS_FILE  # per job: outcome and figures, read by load_sweep
from .errors import CamsweepError, ConfigError, RunRefused, printable, unknown

log = logging.getLogger("camsweep")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "data", "target", "hydra/launcher")
EXTRACTING = ("all", "extract")
# OS errors that come from the machine (full disk, quota, read-only or forbidden folder):
# one line like a user error, not a traceback.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                      errno.EPERM)


def group_options(group: str) -> list[str]:
    """What a user may choose in config group ``group``: its YAML files (not the schemas
    they extend, which the ConfigStore lists beside them), plus Hydra's own launchers."""
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if group == "hydra/launcher":
        options += ["basic", "submitit_local", "submitit_slurm"]
    return options


def choices_help() -> str:
    """The ``--help`` list of choices (conf/config.yaml's ``hydra.help.template``): each
    group's options and the stages, where Hydra's own list would add every schema."""
    lines = [f"{group}: {', '.join(group_options(group))}" for group in GROUPS]
    lines.append(f"stage: {', '.join(_config.STAGES)}")
    return "\n".join(lines)


if not OmegaConf.has_resolver("camsweep_choices"):
    OmegaConf.register_new_resolver("camsweep_choices", choices_help)


def run_dir_of(cfg: DictConfig) -> Path:
    """The run's directory: ``run_dir`` if given, else the one Hydra made for this job."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run the configured stage in ``run_dir``; returns plain data (submitit pickles it)."""
    stage = cfg.stage
    if stage not in _config.STAGES:  # before anything runs: a typo must not exit 0
        raise ConfigError(unknown("stage", stage, _config.STAGES))
    module, _, function = _config.STAGES[stage].partition(":")
    stage_fn = getattr(importlib.import_module(module), function)
    return {"run_dir": str(run_dir), "stage": stage, **stage_fn(cfg, run_dir)}


def status_file(run_dir: Path, cfg: DictConfig) -> Path:
    """``camsweep.json`` of the job, or ``camsweep.shard-<i>-of-<N>.json`` of one shard, so
    shards of one run do not overwrite each other's outcome."""
    from .data import shard_of

    try:
        shard, num_shards = shard_of(cfg.data)
    except CamsweepError:
        shard, num_shards = 0, 1
    if num_shards == 1:
        return run_dir / STATUS_FILE
    return run_dir / f"camsweep.shard-{shard}-of-{num_shards}.json"


def _write_status(run_dir: Path, cfg: DictConfig, status: dict[str, Any]) -> None:
    if not run_dir.is_dir():
        return
    path = status_file(run_dir, cfg)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, path)  # readers never see half a file
    except OSError as e:  # a full disk: the results file says what is done
        tmp.unlink(missing_ok=True)
        log.warning("could not write %s: %s", path, e)


class OneLineLogs(logging.Filter):
    """Escapes control characters in every log message, so that a file name holding a
    newline (or a terminal escape) cannot forge lines of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = printable(message), ()
        return True


def _one_line_logs() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OneLineLogs) for f in handler.filters):
            handler.addFilter(OneLineLogs())
        if isinstance(handler, logging.FileHandler):
            handler.handleError = _log_file_error(handler)  # type: ignore[method-assign]


def _log_file_error(handler: logging.FileHandler) -> Any:
    """A log file that cannot be written (a full disk) says so in one line, once, instead
    of logging's "--- Logging error ---" trace at every message; stderr still gets them."""
    said = []

    def handle_error(record: logging.LogRecord) -> None:
        if not said:
            said.append(True)
            print(f"warning: cannot write the log file {handler.baseFilename} "
                  f"({sys.exc_info()[1]}); messages go to the terminal only", file=sys.stderr)

    return handle_error


def save_hydra_config(cfg: Any, filename: str, output_dir: Path) -> None:
    """Hydra's record of a job (``.hydra/*.yaml``), written atomically, and on a full disk
    (or a read-only folder) left as it was with a one-line warning instead of Hydra's
    traceback: the results file keeps the config that matters. Installed over Hydra's
    ``_save_config`` by :func:`install_hydra_config_saver`."""
    from omegaconf import OmegaConf

    path = Path(output_dir) / filename
    tmp = path.with_name(f".{filename}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"warning: cannot save {path} ({e.strerror or e}); going on without it",
              file=sys.stderr)


def install_hydra_config_saver() -> None:
    """Let Hydra save its job record through :func:`save_hydra_config` (called by run.py)."""
    import hydra.core.utils

    hydra.core.utils._save_config = save_hydra_config


def main(cfg: DictConfig) -> dict[str, Any]:
    """Hydra task. A user error becomes one line and exit code 2 (traceback with
    HYDRA_FULL_ERROR=1); in a multirun the job is marked failed and the sweep goes on.

    A refused run (another config or writer in the run dir, a changed image list) touched
    nothing, so it does not rewrite the run's status either."""
    _one_line_logs()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over a file-size limit: EFBIG, not a kill
    logging.raiseExceptions = False  # a log file on a full disk: no "Logging error" trace
    run_dir = run_dir_of(cfg)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    extracting = cfg.stage in EXTRACTING
    try:
        try:
            result = run(cfg, run_dir)
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            # The machine's, not ours: a full disk, a read-only or forbidden folder.
            where = e.filename or run_dir
            raise CamsweepError(f"{e.strerror or e} ({where}); free space or fix permissions "
                                "and rerun: finished work is kept") from e
    except CamsweepError as e:
        if extracting and not isinstance(e, RunRefused):
            _write_status(run_dir, cfg, {"status": "failed", "error": str(e), "stage": cfg.stage})
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", printable(e))
        if multirun:
            return {"run_dir": str(run_dir), "status": "failed", "error": str(e)}
        print(f"error: {printable(e)}", file=sys.stderr)
        sys.exit(2)
    except BaseException as e:
        # A requeue (submitit's SystemExit) or Ctrl-C is no failure: the file says what is done.
        if extracting and not isinstance(e, (SystemExit, KeyboardInterrupt)):
            _write_status(run_dir, cfg, {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                         "stage": cfg.stage})
        raise
    result["status"] = "ok"
    if extracting:
        _write_status(run_dir, cfg, result)
    return result


def _override_values(o: Any, options: list[str] | None) -> list[str]:
    """Every value an override asks for (a sweep has several), as override strings."""
    from hydra.core.override_parser.types import Glob

    if o.is_delete():
        return []
    value = o.value()
    if isinstance(value, Glob):
        if options is None:  # Hydra's sweeper would fail with an IndexError
            raise ConfigError(f"{o.input_line}: glob() picks options of a config group "
                              f"({', '.join(GROUPS[:-1])}), not values of {o.key_or_group}; "
                              f"list them: {o.key_or_group}=a,b,c or choice(a,b,c)")
        return value.filter(options)
    if o.is_interval_sweep():
        raise ConfigError(f"{o.input_line}: interval() needs a sweeper that samples (e.g. "
                          "Optuna); the basic sweeper enumerates: use "
                          f"{o.key_or_group}=0,1,2 or range(0,3)")
    if o.is_sweep_override():
        return list(o.sweep_string_iterator())
    return [o.get_value_string()]


def _one_line(e: BaseException) -> str:
    """The gist of a Hydra/OmegaConf composition error, on one line."""
    parts = []
    while e is not None and len(parts) < 3:
        text = " ".join(line.strip() for line in str(e).splitlines()
                        if line.strip() and not line.strip().startswith(("full_key", "object_type",
                                                                         "reference_type")))
        if text and text not in parts and "$VALUE" not in text:
            parts.append(text)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return ": ".join(parts)[:400]


def check_overrides(argv: list[str]) -> None:
    """Catch a bad command line before Hydra runs anything, as one line with the closest
    valid names instead of a multi-line report: misspelled group options and keys, values
    of the wrong type, and values the schema's checks refuse.

    Overrides are parsed with Hydra's own grammar, so sweeps may use ``a,b``,
    ``choice(...)``, ``range(...)``, ``glob(...)`` and quoted values. Every group option of
    a sweep is checked; the config is composed once, with the first value of each sweep.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import OmegaConfBaseException

    args = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as e:  # Hydra's OverrideParseException
        raise ConfigError(f"cannot parse the command line: {_one_line(e)}") from e
    keys = set(_config.CamsweepConfig.__dataclass_fields__)
    first: list[str] = []
    for o in parsed:
        key = o.key_or_group
        options = None
        if key in GROUPS:
            options = group_options(key)
        values = _override_values(o, options)
        if options is not None:
            if not values and not o.is_delete():
                raise ConfigError(unknown(key, o.input_line.split("=", 1)[-1], options))
            for choice in values:
                if choice not in options:
                    raise ConfigError(unknown(key, choice, options))
        if key.split("/")[0].split(".")[0] == "hydra":
            continue  # Hydra's own settings: Hydra checks them
        if options is None and not o.is_add() and key.split(".")[0] not in keys:
            raise ConfigError(unknown("config key", key, sorted(keys)))
        sweep = o.is_sweep_override() and not o.is_delete()
        first.append(f"{o.get_key_element()}={values[0]}" if sweep else o.input_line)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose("config", overrides=first)
        except (Exception, OmegaConfBaseException) as e:  # Hydra's composition errors
            raise ConfigError(_unknown_nested_key(compose, first, e) or _one_line(e)) from e
    _config.validate(cfg)


def _unknown_nested_key(compose: Any, overrides: list[str], e: BaseException) -> str | None:
    """``model.foo=1``: the unknown key with the valid keys of its node, or None."""
    from omegaconf import OmegaConf

    for arg in overrides:
        key = arg.split("=", 1)[0]
        if key.startswith(("+", "~")) or "." not in key or f"'{key}'" not in str(e):
            continue
        groups = [a for a in overrides if a.split("=", 1)[0] in GROUPS]
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(compose("config", overrides=groups), parent)
        if OmegaConf.is_dict(node) and leaf not in node:
            return unknown("config key", key, [f"{parent}.{k}" for k in node])
    return None
