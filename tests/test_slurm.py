"""Sweeps through hydra-submitit-launcher on a real one-node SLURM cluster with real
accounting (slurmdbd): requeue, time limits, cancellation, sbatch refusals.

CI (root) starts the cluster with .ci/slurm_up.sh before the tests; these tests start it
themselves when it is missing and they can (root, apt). Under CI (CI=1) a missing cluster
fails them; elsewhere, without root, they are skipped with the reason.

Jobs that must be interrupted mid-run use ``stalling_resnet18``: a random-init resnet18
that, while a gate file of its job exists, blocks in its forward pass after the first
batch, as a job longer than its time limit would. The gates make the timing deterministic
on any machine: the test waits for the first batch in the results file, interrupts the job
the way SLURM does, and removes the gate once SLURM has requeued it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import ROOT, TINY, compose_cfg

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STALL_AFTER = 5  # images through gradient passes before the gate is honoured


class _StallingResNet(torchvision.models.ResNet):
    """resnet18 (same init as ``torchvision.models.resnet18()``) with a gate, see module doc."""

    def __init__(self, gate_dir: str | None = None) -> None:
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
        self.gate: Path | None = None
        if gate_dir:
            from hydra.core.hydra_config import HydraConfig

            job = HydraConfig.get().job.num if HydraConfig.initialized() else 0
            self.gate = Path(gate_dir) / str(job)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None and torch.is_grad_enabled():  # explain passes, not probes
            self.seen += len(x)
            while self.seen > STALL_AFTER and self.gate.exists():
                time.sleep(0.1)  # the simulated long job: signals still get through
        return super().forward(x)


def stalling_resnet18(gate_dir: str | None = None) -> torch.nn.Module:
    """``model._target_`` for jobs that stall while ``<gate_dir>/<job number>`` exists."""
    return _StallingResNet(gate_dir)


# -- the cluster ------------------------------------------------------------------------------

def _cluster_or_reason() -> str | None:
    """None when a SLURM cluster with accounting answers (started here if need be)."""
    def answers() -> bool:
        return shutil.which("sinfo") is not None and subprocess.run(
            ["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=30).returncode == 0

    if answers():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "no SLURM with accounting here, and not root with apt-get to start one"
    setup = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_up.sh")], capture_output=True,
                           text=True, timeout=900)
    if setup.returncode != 0 or not answers():
        pytest.fail(f".ci/slurm_up.sh failed:\n{setup.stdout[-3000:]}{setup.stderr[-3000:]}")
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    why = _cluster_or_reason()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM TEST NOT RUN under CI: {why}")
        pytest.skip(f"SLURM TEST NOT RUN: {why}")


# -- helpers ------------------------------------------------------------------------------------

# Jobs run as separate SLURM processes: they import camsweep from this checkout, and the
# stalling model from this file.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
SMALL = ("hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10", *TINY, "stage=extract", "data=glob")


def sweep_command(sweep_dir: Path, image_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "-m", *SMALL,
            f"data.pattern={image_dir}/*.jpg", f"hydra.sweep.dir={sweep_dir}", *overrides]


def stalling(gate_dir: Path) -> tuple[str, ...]:
    return ("model=custom", "model._target_=test_slurm.stalling_resnet18",
            f"+model.kwargs.gate_dir={gate_dir}")


def start(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """The sweep driver in the background; its output goes to a file (no pipe to fill)."""
    out = cwd / f"driver-{time.monotonic_ns()}.log"
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    return proc, out


def finish(proc: subprocess.Popen, out: Path, timeout: float = 600) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"sweep driver still running after {timeout} s:\n{out.read_text()[-3000:]}")
    return rc, out.read_text()


def wait_until(what: str, check: Callable[[], object], timeout: float = 300,
               proc: subprocess.Popen | None = None, out: Path | None = None) -> object:
    """Poll ``check`` until it returns something true; fail with ``what`` after ``timeout``
    seconds, or at once when the driver ``proc`` ended meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"sweep driver ended (rc {proc.returncode}) while waiting for {what}:\n"
                        f"{out.read_text()[-3000:] if out else ''}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}"
                + (f":\n{out.read_text()[-3000:]}" if out else ""))


def done_rows(results: Path) -> int:
    """Rows marked done in a results file that may still be being written (or not exist)."""
    try:
        with h5py.File(results, "r", locking=False) as f:
            return int((f["images/status"][:] == 1).sum())
    except (OSError, KeyError):
        return 0


def slurm_job_id(sweep_dir: Path, job: int) -> str | None:
    """SLURM's id of a sweep job, from submitit's folders: ``<array>_<job>`` for an array
    task, ``<id>`` when the sweep was a single job (submitit then submits no array)."""
    folders = [d for d in (sweep_dir / ".submitit").glob("*") if any(d.glob("*_submitted.pkl"))]
    for d in folders:
        if d.name.endswith(f"_{job}") or (job == 0 and "_" not in d.name):
            return d.name
    return None


LIVE = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED", "RESIZING")


def sacct_states(job_id: str) -> list[str]:
    """Every state SLURM's accounting recorded for the job, oldest first (-D: requeues too)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def restarted(job_id: str) -> bool:
    """SLURM requeued the job and its first run's processes are gone (the job is pending or
    running again): only then may the gate open, or the first run, which lives on until
    SIGKILL after ignoring SIGTERM, would finish the work itself."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                         text=True, timeout=30).stdout
    return bool(re.search(r"\bJobState=(PENDING|RUNNING)\b", out)
                and re.search(r"\bRestarts=[1-9]", out))


def final_states(job_id: str) -> list[str]:
    """:func:`sacct_states` once SLURM has recorded the job's end: the driver may see a job's
    result before its process has exited and the end has reached the accounting database."""
    return wait_until(f"job {job_id} to end in sacct", lambda: (
        states if (states := sacct_states(job_id)) and states[-1] not in LIVE else None), 120)


def job_logs(sweep_dir: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace")
                   for p in sorted((sweep_dir / ".submitit" / job_id).glob("*_log.*")))


def arrays(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r", locking=False) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset)
                     else None)
    return out


def assert_same_arrays(got: Path, want: Path) -> None:
    a, b = arrays(got), arrays(want)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.kind == "f":  # batch composition may differ after a resume
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def reference_run(tmp_path: Path, image_dir: Path, *overrides: str) -> Path:
    """The same job uninterrupted, in this process (no gate: nothing stalls)."""
    from pipeline.cli import run

    run_dir = tmp_path / "reference"
    run(compose_cfg(*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
                    "model=custom", "model._target_=test_slurm.stalling_resnet18", *overrides),
        run_dir)
    return run_dir / "results.h5"


# -- tests ----------------------------------------------------------------------------------------

def test_requeued_job_with_loader_workers_resumes(cluster, tmp_path, image_dir):
    """``scontrol requeue`` of a running job with DataLoader workers: the workers ignore
    SLURM's SIGTERM, SLURM requeues the job, the new run computes only the missing images
    and the sweep ends normally with the arrays of an uninterrupted run."""
    sweep_dir, gates = tmp_path / "sweep", tmp_path / "gates"
    gates.mkdir()
    (gates / "0").touch()
    proc, out = start(sweep_command(sweep_dir, image_dir, *stalling(gates), "num_workers=2"),
                      tmp_path)
    results = sweep_dir / "0" / "results.h5"
    wait_until("the first batch in the results file", lambda: done_rows(results) >= 4,
               proc=proc, out=out)
    job_id = slurm_job_id(sweep_dir, 0)
    assert job_id and done_rows(results) == 4  # stalled on the second batch
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    wait_until("SLURM to requeue the job", lambda: restarted(job_id), proc=proc, out=out)
    (gates / "0").unlink()
    rc, text = finish(proc, out)
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text
    assert final_states(job_id) == ["REQUEUED", "COMPLETED"]
    logs = job_logs(sweep_dir, job_id)
    assert "killed by signal" not in logs
    assert "Bypassing signal SIGTERM" in logs  # submitit's handler saw it; workers ignored it
    assert re.search(r"6 of 6 images done, 0 failed \(4 were done before this run\)", logs), logs
    assert_same_arrays(results, reference_run(tmp_path, image_dir))
