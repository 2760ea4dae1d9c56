"""Small real runs for the explorer's tests, made through camsweep: ImageNet-style labels
(two images classified correctly, the rest not), a center crop (so the box matters), an
image whose name is markup, an undecodable file, two Grad-CAM layers, evaluated."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from conftest import TINY, compose_cfg, write_images

from pipeline.cli import run
from pipeline.results import load_run

HOSTILE = "<b onmouseover=alert(1)>cat.jpg"
EVALUATE = ("evaluate.metrics=[deletion,insertion,confidence]", "evaluate.steps=4")


def _photos(folder: Path) -> list[Path]:
    paths = write_images(folder, 5, size=(150, 200))
    paths.append(paths.pop().rename(folder / HOSTILE))
    (folder / "zz-broken.jpg").write_bytes(b"")
    return paths + [folder / "zz-broken.jpg"]


def _base(root: Path, layers: str = "[layer3,layer4]") -> tuple[str, ...]:
    return (*TINY, "data=imagenet_val", f"data.root={root}", f"model.target_layers={layers}")


def labelled_run(root: Path) -> Path:
    """The evaluated run ``root/run``; its photos are in class folders under ``root/val``."""
    scratch = root / "scratch" / "0"  # first pass: learn what the random model predicts
    _photos(scratch)
    run(compose_cfg(*_base(scratch.parent), "stage=extract"), root / "first")
    with load_run(root / "first") as first:
        preds = {Path(p).name: int(c) for p, c in zip(first.paths, first.predictions[0][:, 0],
                                                      strict=True)}
    val = root / "val"
    for i, name in enumerate(sorted(preds)):  # the first two right, the others wrong
        label = preds[name] if i < 2 else (preds[name] + 1) % 999
        label = 999 if name == "zz-broken.jpg" else label  # the last folder: the last row
        (val / str(label)).mkdir(parents=True, exist_ok=True)
        shutil.move(scratch / name, val / str(label) / name)
    run_dir = root / "run"
    run(compose_cfg(*_base(val), "stage=extract"), run_dir)
    run(compose_cfg(*_base(val), "stage=evaluate", f"run_dir={run_dir}", *EVALUATE), run_dir)
    shutil.rmtree(root / "first")
    return run_dir


def small_sweep(root: Path) -> Path:
    """A two-job sweep folder (layer3, layer4) laid out as Hydra's multirun makes it."""
    folder = root / "photos" / "0"
    _photos(folder)
    sweep = root / "sweep"
    for job, layer in enumerate(("[layer3]", "[layer4]")):
        job_dir = sweep / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"model.target_layers={layer}"]))
        run(compose_cfg(*_base(folder.parent, layer), "stage=extract"), job_dir)
    return sweep
