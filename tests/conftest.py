"""Shared fixtures: composed configs, generated images, a folder of broken files."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

import pipeline.config  # noqa: F401  (registers the config schemas with Hydra)

ROOT = Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per CPU this process may use, plus one,
    since the SLURM tests (one file, on one worker) mostly wait for the cluster; at most 8."""
    return min(len(os.sched_getaffinity(0)) + 1, 8)

CONF = ROOT / "conf"
# Fast defaults for pipeline tests: a random-init resnet18 on 64x64 inputs, on the CPU even
# where a GPU is present (CUDA tests say device=cuda after these).
TINY = ("model=resnet18", "model.weights=null", "data.image_size=64", "batch_size=4",
        "num_workers=0", "device=cpu")


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def photo(seed: int, h: int = 80, w: int = 96) -> np.ndarray:
    """A smooth random RGB picture: blobs compress like photos and vary across seeds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(
            0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, ext: str = "jpg", size: tuple[int, int] = (80, 96),
                 start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img{i:03d}.{ext}"
        Image.fromarray(photo(i, *size)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of many tiny tensor ops: on the shared 2-core CI
    machine, OpenMP threads waiting for each other at every op cost far more than they
    bring. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the setting is
    put back for the other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    write_images(tmp_path / "images", 6)
    return tmp_path / "images"


@pytest.fixture
def bad_dir(tmp_path: Path) -> Path:
    """Good images mixed with every kind of trouble the pipeline must survive."""
    d = tmp_path / "mixed"
    write_images(d, 3)
    (d / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(photo(7)).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.jpg").write_text("this is not an image\n")
    Image.fromarray(photo(8)[..., 0]).save(d / "gray.png")
    Image.fromarray(photo(9)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(photo(10)[..., 0].astype(np.uint16) * 257).save(d / "deep.png")  # 16-bit
    rgba = np.dstack([photo(11), np.full((80, 96), 128, np.uint8)])
    Image.fromarray(rgba).save(d / "rgba.png")
    return d


@pytest.fixture
def tmpfs(tmp_path: Path):
    """``tmpfs(size_kb)``: a real tmpfs of that size (root only), unmounted afterwards. Under
    CI a mount that fails fails the test; elsewhere it skips (no root)."""
    mounted: list[Path] = []

    def mount(size_kb: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                               str(point)], capture_output=True, text=True)
        if proc.returncode != 0:
            if os.environ.get("CI") is not None:
                pytest.fail(f"cannot mount a tmpfs: {proc.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def done_rows(results: Path) -> int:
    """Rows marked done in a results file that may still be being written (or not exist)."""
    try:
        with h5py.File(results, "r", locking=False) as f:
            return int((f["images/status"][:] == 1).sum())
    except (OSError, KeyError):
        return 0
