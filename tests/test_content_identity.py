"""Content identity: a resume never mixes the maps of two versions of an image or a model;
special files where images were are failed rows, never opened."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, TINY, compose_cfg, photo
from PIL import Image

from pipeline.data import ImageDataset, Record, native_sizes
from pipeline.errors import RunRefused
from pipeline.extract import extract
from pipeline.images import NotAFile, read_file
from pipeline.store import DONE, FAILED

pytestmark = pytest.mark.usefixtures("one_thread")
ARRAYS = ("gradcam/layer4", "gradcam_weights/layer4", "targets/class", "targets/score",
          "predictions/class", "predictions/prob", "images/size", "images/content_hash",
          "images/file_size")


def _bmps(folder: Path, n: int) -> list[Path]:
    """Uncompressed images: new pixels keep the file size exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:03d}.bmp" for i in range(n)]
    for i, p in enumerate(paths):
        Image.fromarray(photo(i, 40, 48)).save(p)
    return paths


def _replace(path: Path, seed: int) -> None:
    """New content under the same name and size (what a re-export or a sync does)."""
    size = path.stat().st_size
    Image.fromarray(photo(seed, 40, 48)).save(path)
    assert path.stat().st_size == size


def _args(images: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "stage=extract", f"run_dir={run_dir}", *TINY,
            "data=glob", f"data.pattern={images}/*.bmp", "batch_size=2", *extra]


def _cfg(images: Path, *extra: str):
    return compose_cfg(*TINY, "data=glob", f"data.pattern={images}/*.bmp", *extra)


def _done_rows(results: Path) -> np.ndarray:
    try:
        with h5py.File(results, "r", locking=False) as f:
            return np.flatnonzero(f["images/status"][:] == DONE)
    except (OSError, KeyError):
        return np.array([], dtype=np.int64)


def _arrays(path: Path, keys: tuple[str, ...] = ARRAYS) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][:] for k in keys if k in f}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Equal arrays: integers exactly, floats to rounding (batches composed otherwise)."""
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.kind == "f":
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _crash_after(args: list[str], results: Path, rows: int, cwd: Path) -> np.ndarray:
    """Start a real run, kill -9 it once ``rows`` rows are done; the done rows."""
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a guard only
    try:
        while len(_done_rows(results)) < rows and time.monotonic() < deadline:
            try:
                proc.wait(timeout=0.02)  # between looks at the file
                break  # ended by itself: the assertion below says so
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.kill()
        proc.wait()
    done = _done_rows(results)
    assert 0 < len(done) < 10, "the run must stop part way"
    return done


def test_image_replaced_between_crash_and_resume_is_refused_or_recomputed(tmp_path):
    images = tmp_path / "images"
    paths = _bmps(images, 10)
    run_dir = tmp_path / "run"
    results = run_dir / "results.h5"
    done = _crash_after(_args(images, run_dir), results, 2, tmp_path)
    before = _arrays(results)
    changed = paths[int(done[0])]
    _replace(changed, 77)

    refused = subprocess.run(_args(images, run_dir), cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "1 image(s) changed since their rows were done" in line and changed.name in line
    assert "same size, other content" in line and "resume_changed=recompute" in line
    np.testing.assert_array_equal(_arrays(results)["images/content_hash"],
                                  before["images/content_hash"])  # untouched

    again = subprocess.run(_args(images, run_dir, "resume_changed=recompute"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert "1 image(s) changed since their rows were done: computing them again" in log
    # The rows done before and unchanged were not computed again; the changed one was.
    assert f"({len(done) - 1} were done before this run)" in log
    fresh = subprocess.run(_args(images, tmp_path / "fresh"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    a, b = _arrays(results), _arrays(tmp_path / "fresh" / "results.h5")
    _assert_same(a, b)
    assert a["images/content_hash"][done[0]] == read_file(str(changed))[1].content_hash
    assert a["images/content_hash"][done[0]] != before["images/content_hash"][done[0]]


def test_touched_or_copied_image_with_the_same_bytes_resumes(tmp_path):
    images = tmp_path / "images"
    paths = _bmps(images, 4)
    cfg = _cfg(images)
    assert extract(cfg, tmp_path / "run").done == 4
    os.utime(paths[1], ns=(1, 1))  # new mtime, same bytes: nothing changed
    assert extract(cfg, tmp_path / "run").skipped == 4


def test_native_resolution_changed_image_is_refused_then_recomputed(tmp_path):
    images = tmp_path / "images"
    paths = _bmps(images, 4)
    cfg = _cfg(images, "data.resize=null", "data.max_side=40")
    run_dir = tmp_path / "run"
    assert extract(cfg, run_dir).done == 4
    _replace(paths[2], 55)
    with pytest.raises(RunRefused, match=r"1 image\(s\) changed .*img002\.bmp \(same size"):
        extract(cfg, run_dir)
    summary = extract(_cfg(images, "data.resize=null", "data.max_side=40",
                           "resume_changed=recompute"), run_dir)
    assert (summary.done, summary.skipped) == (4, 3)
    assert extract(cfg, tmp_path / "fresh").done == 4
    keys = ("ragged/gradcam/layer4/offset", "gradcam/layer4", "images/content_hash")
    a, b = _arrays(run_dir / "results.h5", keys), _arrays(tmp_path / "fresh" / "results.h5", keys)
    _assert_same(a, b)


def test_overwritten_checkpoint_is_refused_naming_it(tmp_path):
    images = tmp_path / "images"
    _bmps(images, 2)
    ck = tmp_path / "last.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), ck)
    cfg = _cfg(images, f"model.weights={ck}")
    assert extract(cfg, tmp_path / "run").done == 2
    assert extract(cfg, tmp_path / "run").skipped == 2  # the same file: a resume
    torch.manual_seed(1)  # a training run writes its next last.pt over the path
    torch.save(torchvision.models.resnet18().state_dict(), ck)
    with pytest.raises(RunRefused, match=r"different config: model\.weights_content: "
                                         r"'xxh3_128:[0-9a-f]{32}' -> 'xxh3_128:"):
        extract(cfg, tmp_path / "run")


def test_a_row_read_again_with_other_bytes_fails_with_the_reason(tmp_path):
    """What a stage reading a run's images again (evaluate) sees of a changed file."""
    paths = _bmps(tmp_path, 2)
    records = [Record(str(p)) for p in paths]
    stored = np.array([read_file(str(p))[1].content_hash for p in paths], np.uint64)
    _replace(paths[1], 9)
    ds = ImageDataset(records, np.arange(2), 32, "square", expected=stored)
    assert ds[0]["error"] == ""
    assert ds[1]["error"].startswith("the file changed since it was read for this run")


def test_special_files_are_failed_rows_never_opened(tmp_path, image_dir):
    """A FIFO where an image is: extract and render finish (a reader would block forever)."""
    run_dir = tmp_path / "run"
    os.mkfifo(image_dir / "zz_fifo.jpg")
    args = [sys.executable, str(ROOT / "run.py"), f"run_dir={run_dir}", *TINY, "data=glob",
            f"data.pattern={image_dir}/*.jpg"]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with h5py.File(run_dir / "results.h5", "r") as f:
        status = f["images/status"][:]
        error = f["images/error"].asstr()[:]
    assert status.tolist() == [DONE] * 6 + [FAILED]
    assert "is a FIFO, not a regular file (not opened)" in error[6]
    # An image replaced by a FIFO after extraction: render draws the maps alone.
    (image_dir / "img001.jpg").unlink()
    os.mkfifo(image_dir / "img001.jpg")
    render = subprocess.run([sys.executable, str(ROOT / "run.py"), "stage=render",
                             f"run_dir={run_dir}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert render.returncode == 0, render.stderr[-2000:]
    assert "img001.jpg is a FIFO" in render.stderr + render.stdout
    with pytest.raises(NotAFile, match="is a FIFO"):
        read_file(str(image_dir / "img001.jpg"))
    # At native resolution the header read at creation fails the row the same way.
    sizes, reasons = native_sizes([Record(str(image_dir / "img001.jpg"))], None)
    assert sizes.tolist() == [[0, 0]] and "is a FIFO" in reasons[0]
