"""A real sweep through hydra-submitit-launcher on a real one-node SLURM cluster.

CI (root) starts the cluster with .ci/slurm_up.sh before the tests; this test starts it
itself when it is missing and it can (root, apt). It is skipped, with the reason printed,
only where neither holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
from conftest import ROOT, TINY

from pipeline.results import load_sweep


def _cluster_up() -> str | None:
    """None when a SLURM cluster answers; otherwise why it cannot be had."""
    if shutil.which("sinfo") is None or subprocess.run(
            ["sinfo", "-h"], capture_output=True, timeout=30).returncode != 0:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            return "no SLURM here and not root with apt-get to install one"
        setup = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_up.sh")], capture_output=True,
                               text=True, timeout=900)
        if setup.returncode != 0:
            pytest.fail(f".ci/slurm_up.sh failed:\n{setup.stdout[-3000:]}{setup.stderr[-3000:]}")
    return None


@pytest.mark.slurm
@pytest.mark.slow
def test_two_job_layer_sweep_on_slurm(tmp_path, image_dir):
    why = _cluster_up()
    if why:
        warnings.warn(f"SLURM TEST NOT RUN: {why}", stacklevel=1)
        pytest.skip(f"SLURM TEST NOT RUN: {why}")
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=slurm",
           "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=null",
           "hydra.launcher.timeout_min=10", *TINY, "stage=all", "data=glob",
           f"data.pattern={image_dir}/*.jpg", "model.target_layers=[layer3],[layer4]",
           f"hydra.sweep.dir={sweep_dir}"]
    # The jobs run as separate SLURM processes: they import camsweep from the repo.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Submitit 'slurm' sweep output dir" in proc.stdout + proc.stderr
    # submitit's own records prove the jobs went through SLURM (job ids in .submitit/).
    assert any((sweep_dir / ".submitit").iterdir())
    sweep = load_sweep(sweep_dir)
    assert list(sweep.table["state"]) == ["done", "done"]
    assert list(sweep.table["layers"]) == ["layer3", "layer4"]
    assert list(sweep.table["done"]) == [6, 6]
    for job in (0, 1):
        assert len(list((sweep_dir / str(job) / "pictures").glob("*.png"))) == 6
    with sweep.run(1) as run:
        assert run.cams("layer4").shape == (6, 2, 2)
