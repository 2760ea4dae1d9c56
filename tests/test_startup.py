"""What starting `python run.py` costs: the stages that only read files (and --help) compose
and check their config without importing torch; --help lists what a user can choose; a
stage is one entry of the stage registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import CONF, ROOT, TINY, compose_cfg, write_images

import pipeline.config
from pipeline.cli import run

# run.py as `python run.py` runs it, writing the names of every module it imported (at exit,
# sys.exit included) to a file: -X importtime would miss modules imported by importlib.
RUN_AND_LIST_MODULES = """\
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_py(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python run.py ARGS``: the process and every module it imported."""
    listing = cwd / "modules.json"
    proc = subprocess.run([sys.executable, "-c", RUN_AND_LIST_MODULES, str(listing),
                           str(ROOT / "run.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    return proc, set(json.loads(listing.read_text()))


def torch_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in ("torch", "torchvision"))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    write_images(root / "images", 3)
    run_dir = root / "run"
    run(compose_cfg(*TINY, "stage=extract", "data=glob",
                    f"data.pattern={root / 'images'}/*.jpg"), run_dir)
    return run_dir


@pytest.mark.parametrize(("stage", "says"), [("render", "3 pictures ->"),
                                             ("report", "report ->"),
                                             ("table", "table: 3 rows"),
                                             ("verify", "verified 1 files")])
def test_read_only_stages_start_without_torch(small_run, tmp_path, stage, says):
    proc, modules = run_py(f"stage={stage}", f"run_dir={small_run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert says in proc.stdout + proc.stderr
    # The stage ran through the registry (and the list of imports is read right) ...
    entry = pipeline.config.STAGES[stage].partition(":")[0]
    assert {"pipeline.config", entry, f"pipeline.{stage}"} <= modules
    # ... and neither the config's method schemas nor the stage loaded torch.
    assert torch_modules(modules) == []
    assert "pipeline.methods.catalog" in modules and "pipeline.methods.base" not in modules


def test_help_lists_the_choices_not_the_schemas(tmp_path):
    proc, modules = run_py("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_schema" not in proc.stdout and torch_modules(modules) == []
    choices = proc.stdout.split("== Choices (group=option) ==\n", 1)[1].split("\n\n", 1)[0]
    listed = dict(line.split(": ", 1) for line in choices.splitlines())
    assert list(listed) == ["model", "method", "data", "target", "hydra/launcher", "stage"]
    for group in ("model", "method", "data", "target"):
        assert listed[group].split(", ") == sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert listed["method"].split(", ") == sorted(pipeline.config.METHODS)  # one per method
    assert listed["target"] == "class, label, pred, topk"
    assert listed["hydra/launcher"] == "slurm, slurm_cpu, basic, submitit_local, submitit_slurm"
    assert listed["stage"] == ", ".join(pipeline.config.STAGES)  # every registered stage
    assert {"all", "extract", "render", "merge", "evaluate", "report"} <= set(
        pipeline.config.STAGES)
    assert "\nmethod:\n  name: gradcam\n  save_weights: true\n" in proc.stdout  # the config


def echo_stage(cfg: Any, run_dir: Path) -> dict[str, Any]:
    return {"seen": f"{cfg.method.name} in {run_dir.name}"}


def test_a_stage_is_one_registry_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(pipeline.config.STAGES, "echo", f"{__name__}:echo_stage")
    cfg = compose_cfg(*TINY, "method=saliency")
    cfg.stage = "echo"
    pipeline.config.validate(cfg)
    assert run(cfg, tmp_path / "job") == {"run_dir": str(tmp_path / "job"), "stage": "echo",
                                          "seen": "saliency in job"}
