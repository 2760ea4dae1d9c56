"""Crash safety: kill -9 at moments chosen by progress, the file always opens, rerun resumes.

The kills wait for rows read from the file (as any reader may while a run writes), not for
a time, so they land in the middle of the run however busy the machine is.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, write_images

from pipeline.store import DONE, PENDING


def _cmd(images, run_dir) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "stage=extract", f"run_dir={run_dir}",
            "model=resnet18", "model.weights=null", "data=glob", f"data.pattern={images}/*.jpg",
            "data.image_size=96", "batch_size=1", "num_workers=0"]


def _done(results) -> int:
    try:
        with h5py.File(results, "r", locking=False) as f:
            return int((f["images/status"][:] == DONE).sum())
    except (OSError, KeyError):  # not created yet
        return 0


@pytest.mark.slow
def test_kill_9_repeatedly_then_resume_equals_uninterrupted(tmp_path):
    images = tmp_path / "images"
    write_images(images, 150)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "killed"
    results = run_dir / "results.h5"
    rng = random.Random(0)
    interrupted = 0
    done = 0
    for _ in range(5):
        proc = subprocess.Popen(_cmd(images, run_dir), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill once a few more rows than before are done: 1..12 more, drawn at random.
        goal = done + rng.randint(1, 12)
        deadline = time.monotonic() + 300
        while _done(results) < goal and proc.poll() is None:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with h5py.File(results, "r", locking=False) as f:  # always opens, statuses readable
            status = f["images/status"][:]
        done = int((status == DONE).sum())
        interrupted += bool((status == PENDING).any() and (status == DONE).any())
        if not (status == PENDING).any():
            break
    assert interrupted >= 2, "the kills should land in the middle of the run"
    done = subprocess.run(_cmd(images, run_dir), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "were done before this run" in done.stdout + done.stderr

    clean = subprocess.run(_cmd(images, tmp_path / "clean"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    with h5py.File(results) as a, h5py.File(tmp_path / "clean" / "results.h5") as b:
        assert (a["images/status"][:] == DONE).all()
        for key in ("gradcam/layer4", "gradcam_weights/layer4", "targets/score",
                    "predictions/prob"):
            np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=key)
        for key in ("images/status", "targets/class", "predictions/class", "images/size"):
            np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=key)
