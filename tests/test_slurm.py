"""Sweeps through hydra-submitit-launcher on a real one-node SLURM cluster with real
accounting (slurmdbd): requeue, time limits, cancellation, sbatch refusals.

CI (root) starts the cluster with .ci/slurm_up.sh before the tests; these tests start it
themselves when it is missing and they can (root, apt). Under CI (CI=1) a missing cluster
fails them; elsewhere, without root, they are skipped with the reason.

Jobs that must be interrupted mid-run use ``tests/stalling.py``: a random-init resnet18
that, while a gate file of its job exists, blocks in its forward pass after the first
batch, as a job longer than its time limit (or slowed data) would. The gates make the
timing deterministic on any machine: the test waits for the first batch in the results
file, interrupts the job the way SLURM does, and removes the gate once SLURM has requeued
it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, TINY, compose_cfg, done_rows
from stalling import stalling

from pipeline.cluster import slurm_states
from pipeline.results import load_sweep
from pipeline.store import CHECKSUMS, verify_results

# pyproject's --dist loadfile: these tests run one after another on one worker (they share
# the one-node cluster) while the other workers run the rest of the suite.
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

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


def sweep_command(sweep_dir: Path | None, image_dir: Path, *overrides: str) -> list[str]:
    """The sweep driver's command; ``sweep_dir`` None: the sweep's folder is camsweep's
    choice (a new ``multirun/<date>/<time>``, or the unfinished one of the same command)."""
    where = [f"hydra.sweep.dir={sweep_dir}"] if sweep_dir else []
    return [sys.executable, str(ROOT / "run.py"), "-m", *SMALL,
            f"data.pattern={image_dir}/*.jpg", *where, *overrides]


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


def slurm_job_id(sweep_dir: Path, job: int) -> str | None:
    """SLURM's id of a sweep job, from the launcher's ``slurm_jobs.json`` (written as soon
    as the jobs are submitted): ``<array>_<job>``, or ``<id>`` for a one-job sweep."""
    from pipeline.cluster import read_jobs

    return read_jobs(sweep_dir).get(str(job), {}).get("slurm_job_id")


def table_of(text: str, sweep_dir: Path) -> list[str]:
    """The sweep report's lines at the end of the driver's output."""
    start = text.find(f"sweep {sweep_dir}: ")
    assert start >= 0, text[-3000:]
    return text[start:].splitlines()


LIVE = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "SUSPENDED", "RESIZING")


def sacct_states(job_id: str) -> list[str]:
    """Every state SLURM's accounting recorded for the job, oldest first (-D: requeues too).
    Array tasks that never started are recorded only in a range (``12_[1-2%1]``)."""
    from pipeline.cluster import _expand_job_ids

    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id.split("_")[0],
                          "-o", "JobID,State"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return [state.split()[0] for line in out.splitlines()
            for job, _, state in [line.partition("|")] if job_id in _expand_job_ids(job)]


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


def resume_after_requeue(proc: subprocess.Popen, out: Path, gate: Path, sweep_dir: Path,
                         job_id: str) -> tuple[str, str]:
    """Open the stalled job's gate once SLURM requeued it; the driver ends well, the job
    ran twice (requeued, then completed) and its second run did the 2 images the first
    left. Returns the driver's output and the job's logs."""
    gate.unlink()
    rc, text = finish(proc, out)
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text
    assert final_states(job_id) == ["REQUEUED", "COMPLETED"]
    logs = job_logs(sweep_dir, job_id)
    assert "killed by signal" not in logs
    assert re.search(r"6 of 6 images done, 0 failed \(4 were done before this run\)", logs), logs
    return text, logs


def arrays(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r", locking=False) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset)
                     else None)
    return out


def assert_same_arrays(got: Path, want: Path) -> None:
    a, b = arrays(got), arrays(want)
    assert a.keys() == b.keys()
    # Checksums are of the bytes each file holds: maps equal to float rounding (another batch
    # composition) have other checksums. What they must do is vouch for their own file.
    check = verify_results(got)
    assert check.clean and not check.unchecked, (check.damaged, check.note, check.error)
    for key in a:
        if key == CHECKSUMS:
            continue
        if a[key].dtype.kind == "f":  # batch composition may differ after a resume
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def reference_run(tmp_path: Path, image_dir: Path, *overrides: str) -> Path:
    """The same job uninterrupted, in this process (no gate: nothing stalls)."""
    from pipeline.cli import run

    run_dir = tmp_path / f"reference-{time.monotonic_ns()}"
    run(compose_cfg(*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
                    "model=custom", "model._target_=stalling.stalling_resnet18", *overrides),
        run_dir)
    return run_dir / "results.h5"


# -- tests ----------------------------------------------------------------------------------------

def stalled_job(tmp_path: Path, image_dir: Path) -> tuple[Path, Path, Path,
                                                         subprocess.Popen, Path, str]:
    """A one-job sweep on SLURM (loader workers on) stalled after its first batch: (sweep
    folder, gates folder, results file, driver process, its output, SLURM job id)."""
    sweep_dir, gates = tmp_path / "sweep", tmp_path / "gates"
    gates.mkdir()
    (gates / "0").touch()
    proc, out = start(sweep_command(sweep_dir, image_dir, *stalling(gates), "num_workers=2"),
                      tmp_path)
    results = sweep_dir / "0" / "results.h5"
    wait_until("the first batch in the results file", lambda: done_rows(results) >= 4,
               proc=proc, out=out)
    return sweep_dir, gates, results, proc, out, slurm_job_id(sweep_dir, 0)


def test_requeued_job_with_loader_workers_resumes(cluster, tmp_path, image_dir):
    """``scontrol requeue`` of a running job with DataLoader workers: the workers ignore
    SLURM's SIGTERM, SLURM requeues the job, the new run computes only the missing images
    and the sweep ends normally with the arrays of an uninterrupted run."""
    sweep_dir, gates, results, proc, out, job_id = stalled_job(tmp_path, image_dir)
    assert job_id and done_rows(results) == 4  # stalled on the second batch
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    wait_until("SLURM to requeue the job", lambda: restarted(job_id), proc=proc, out=out)
    _, logs = resume_after_requeue(proc, out, gates / "0", sweep_dir, job_id)
    assert "Bypassing signal SIGTERM" in logs  # submitit's handler saw it; workers ignored it
    assert_same_arrays(results, reference_run(tmp_path, image_dir))


def test_time_limit_requeues_through_submitit_and_resumes(cluster, tmp_path, image_dir):
    """A job that outlives its time limit: SLURM sends SIGUSR2 ``signal_delay_s`` before the
    limit, submitit's handler checkpoints and requeues it (max_num_timeout), the loader
    workers ignore the signal, and the next run resumes with the missing images."""
    sweep_dir, gates = tmp_path / "sweep", tmp_path / "gates"
    gates.mkdir()
    (gates / "0").touch()
    # With a 1-minute limit, SIGUSR2 comes at SLURM's first check (every 30 s) at least
    # 25 s after the start: the job has started and is stalled by then.
    proc, out = start(sweep_command(sweep_dir, image_dir, *stalling(gates), "num_workers=2",
                                    "hydra.launcher.timeout_min=1",
                                    "hydra.launcher.signal_delay_s=5",
                                    "hydra.launcher.max_num_timeout=2"), tmp_path)
    results = sweep_dir / "0" / "results.h5"
    wait_until("the first batch in the results file", lambda: done_rows(results) >= 4,
               proc=proc, out=out)
    job_id = slurm_job_id(sweep_dir, 0)
    wait_until("submitit to requeue the job at its time limit", lambda: restarted(job_id),
               timeout=120, proc=proc, out=out)
    text, logs = resume_after_requeue(proc, out, gates / "0", sweep_dir, job_id)
    assert "Caught signal SIGUSR2" in logs and "this job is timed-out" in logs
    assert "Calling checkpoint method" in logs
    assert table_of(text, sweep_dir)[0] == f"sweep {sweep_dir}: 1 job: 1 done"
    assert_same_arrays(results, reference_run(tmp_path, image_dir))


def test_cancelled_sweep_ends_with_a_table_and_its_rerun_continues(cluster, tmp_path,
                                                                   image_dir):
    """``scancel`` of a sweep while job 1 runs and job 2 waits: the driver ends with a table
    (done, cancelled, never ran), exit 1, no traceback. The command it prints runs the sweep
    again in the same folder: job 0 is not resubmitted, job 1 resumes, job 2 runs and fails
    on its bad layer, and SLURM's records say FAILED for it."""
    sweep_dir, gates = tmp_path / "sweep", tmp_path / "gates"
    gates.mkdir()
    (gates / "1").touch()
    layers = "model.target_layers=[layer3],[layer4],[layer9]"
    proc, out = start(sweep_command(sweep_dir, image_dir, *stalling(gates), layers,
                                    "hydra.launcher.array_parallelism=1"), tmp_path)
    results = sweep_dir / "1" / "results.h5"
    wait_until("job 1's first batch", lambda: done_rows(results) >= 4, proc=proc, out=out)
    ids = [slurm_job_id(sweep_dir, job) for job in range(3)]
    subprocess.run(["scancel", ids[0].split("_")[0]], check=True, timeout=30)  # the array
    rc, text = finish(proc, out)
    assert rc == 1, text[-3000:]
    assert "Traceback" not in text
    table = table_of(text, sweep_dir)
    assert table[0] == (f"sweep {sweep_dir}: 3 jobs: 1 done, 1 cancelled, "
                        "1 missing (never ran)")
    assert table[1].split() == ["job", "model.target_layers", "state", "images", "slurm"]
    assert table[2].split() == ["0", "[layer3]", "done", "6/6", ids[0], "COMPLETED"]
    assert table[3].split() == ["1", "[layer4]", "cancelled", "4/6", ids[1], "CANCELLED"]
    assert table[4].split() == ["2", "[layer9]", "missing", "-", ids[2], "CANCELLED"]
    assert table[5].startswith("2 jobs did not finish")
    rerun = table[6].strip()
    assert rerun.startswith("python run.py -m ") and f"hydra.sweep.dir={sweep_dir}" in rerun
    assert [final_states(i)[-1] for i in ids] == ["COMPLETED", "CANCELLED", "CANCELLED"]

    (gates / "1").unlink()
    cmd = [sys.executable, str(ROOT / "run.py"), *shlex.split(rerun)[2:]]
    rc, text = finish(*start(cmd, tmp_path))
    assert rc == 1, text[-3000:]
    assert "Traceback" not in text
    assert "#0 : " in text and "(done earlier: not submitted)" in text
    table = table_of(text, sweep_dir)
    assert table[0] == f"sweep {sweep_dir}: 3 jobs: 2 done, 1 failed"
    new = [slurm_job_id(sweep_dir, job) for job in range(3)]
    assert new[0] == ids[0] and new[1] != ids[1]  # job 0 was not submitted again
    assert table[3].split() == ["1", "[layer4]", "done", "6/6", new[1], "COMPLETED"]
    assert table[4].split()[:6] == ["2", "[layer9]", "failed", "-", new[2], "FAILED"]
    assert "unknown layer 'layer9'" in table[4]
    assert final_states(new[2]) == ["FAILED"]  # SLURM's own record of the failed job
    assert re.search(r"\(4 were done before this run\)", job_logs(sweep_dir, new[1]))
    assert_same_arrays(results, reference_run(tmp_path, image_dir, "model.target_layers=[layer4]"))


def test_sbatch_refusals_are_one_line_naming_the_key(cluster, tmp_path, image_dir):
    """The GPU launcher's defaults on a cluster without GPUs, then impossible CPU and memory
    requests: sbatch refuses, the driver says so in one line naming the key to change."""
    cases = [((), "hydra.launcher.gpus_per_node=null"),
             (("hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=4096"),
              "a smaller hydra.launcher.cpus_per_task"),
             (("hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
               "hydra.launcher.mem_gb=100000"), "a smaller hydra.launcher.mem_gb")]
    for overrides, fix in cases:
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=slurm", *TINY,
               "data=glob", f"data.pattern={image_dir}/*.jpg",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides]
        proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: sbatch refused the jobs"), (
            proc.stderr)
        assert fix in errors[0], errors[0]
        assert "Traceback" not in proc.stdout + proc.stderr


def test_two_job_layer_sweep_renders_on_slurm(cluster, tmp_path, image_dir):
    """The plain case: stage=all through SLURM, two jobs, both COMPLETED in SLURM's records."""
    sweep_dir = tmp_path / "sweep"
    cmd = sweep_command(sweep_dir, image_dir, "stage=all", "model.target_layers=[layer3],[layer4]")
    rc, text = finish(*start(cmd, tmp_path))
    assert rc == 0, text[-3000:]
    assert "Submitit 'slurm' sweep output dir" in text
    assert table_of(text, sweep_dir)[0] == f"sweep {sweep_dir}: 2 jobs: 2 done"
    sweep = load_sweep(sweep_dir)
    assert list(sweep.table["state"]) == ["done", "done"]
    assert list(sweep.table["layers"]) == ["layer3", "layer4"]
    assert list(sweep.table["done"]) == [6, 6]
    assert list(sweep.table["slurm_state"]) == ["COMPLETED", "COMPLETED"]
    assert [final_states(i)[-1] for i in sweep.table["slurm_job"]] == ["COMPLETED"] * 2
    for job in (0, 1):
        assert len(list((sweep_dir / str(job) / "pictures").glob("*.png"))) == 6
    with sweep.run(1) as run:
        assert run.cams("layer4").shape == (6, 2, 2)


def test_an_interrupted_driver_rerun_without_sweep_dir_waits_and_resubmits_only_the_rest(
        cluster, tmp_path, image_dir):
    """Ctrl-C in the sweep driver (or a lost login session): the jobs go on in SLURM, and
    the interrupt message says what the same command does. Job 1 is then scancelled alone.
    The same command, without hydra.sweep.dir, finds the sweep: it waits for job 0 (no
    second copy ever writes its results file) and submits job 1 again, which resumes."""
    gates = tmp_path / "gates"
    gates.mkdir()
    for job in ("0", "1"):
        (gates / job).touch()
    cmd = sweep_command(None, image_dir, *stalling(gates),
                        "model.target_layers=[layer3],[layer4]")
    proc, out = start(cmd, tmp_path)
    wait_until("the first batch of both jobs", lambda: all(
        done_rows(p) >= 4 for p in tmp_path.glob("multirun/*/*/[01]/results.h5"))
        and len(list(tmp_path.glob("multirun/*/*/[01]/results.h5"))) == 2, proc=proc, out=out)
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    ids = [slurm_job_id(sweep_dir, job) for job in (0, 1)]
    assert ids[0].split("_")[0] == ids[1].split("_")[0]  # one array
    name = subprocess.run(["squeue", "-h", "-o", "%j", "-j", ids[0]], capture_output=True,
                          text=True, timeout=30).stdout.strip()
    assert name == f"camsweep-{sweep_dir.parent.name}_{sweep_dir.name}-0-1"
    proc.send_signal(signal.SIGINT)
    rc, text = finish(proc, out)
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text
    assert "interrupted: the sweep's 2 job(s) go on in SLURM" in text
    assert f"The same command run again finds this sweep ({sweep_dir.relative_to(tmp_path)})" \
        in text
    subprocess.run(["scancel", ids[1]], check=True, timeout=30)
    wait_until("job 1 to end", lambda: slurm_states([ids[1]]).get(ids[1]) == "CANCELLED")
    # The controller knows at once; a live table never tells to run again.
    sweep = load_sweep(sweep_dir)
    assert list(sweep.table["state"]) == ["running", "cancelled"]
    assert not any("run again" in line for line in sweep.report())

    (gates / "1").unlink()
    proc, out = start(cmd, tmp_path)
    wait_until("the rerun to find the running job",
               lambda: f"(still in SLURM as {ids[0]}, RUNNING: waiting for it)" in
               out.read_text(), proc=proc, out=out)
    (gates / "0").unlink()
    rc, text = finish(proc, out)
    assert rc == 0, text[-3000:]
    assert list(tmp_path.glob("multirun/*/*")) == [sweep_dir]  # the same sweep
    new = [slurm_job_id(sweep_dir, job) for job in (0, 1)]
    assert new[0] == ids[0] and new[1] != ids[1]
    table = table_of(text, sweep_dir.relative_to(tmp_path))
    assert table[0].endswith(": 2 jobs: 2 done")
    assert table[2].split() == ["0", "[layer3]", "done", "6/6", ids[0], "COMPLETED"]
    assert table[3].split() == ["1", "[layer4]", "done", "6/6", new[1], "COMPLETED"]
    assert final_states(ids[0]) == ["COMPLETED"]  # one run of the job, never two
    assert re.search(r"\(4 were done before this run\)", job_logs(sweep_dir, new[1]))


def test_usr1_preemption_requeues_and_resumes(cluster, tmp_path, image_dir):
    """``scancel --signal=USR1`` (clusters that preempt with SIGUSR1): the loader workers
    ignore it, the job stops cleanly, is requeued and resumes with the missing images."""
    sweep_dir, gates, results, proc, out, job_id = stalled_job(tmp_path, image_dir)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    wait_until("the job to be requeued", lambda: restarted(job_id), proc=proc, out=out)
    text, logs = resume_after_requeue(proc, out, gates / "0", sweep_dir, job_id)
    # submitit calls any stop within 10 min of a limit under 10 min "timed-out"; either way
    # it checkpoints and requeues the job.
    assert "Caught signal SIGUSR1" in logs and "Calling checkpoint method" in logs
    assert table_of(text, sweep_dir)[0] == f"sweep {sweep_dir}: 1 job: 1 done"


def test_a_job_out_of_requeues_at_its_time_limit_is_timeout(cluster, tmp_path, image_dir):
    """``--time=1`` with data slower than that and ``max_num_timeout=0``: submitit does not
    requeue it again; the table says timeout (not failed), with what to change, whether
    submitit's word reached the driver or SLURM ended the job first (on a loaded machine)."""
    sweep_dir, gates = tmp_path / "sweep", tmp_path / "gates"
    gates.mkdir()
    (gates / "0").touch()
    proc, out = start(sweep_command(sweep_dir, image_dir, *stalling(gates),
                                    "hydra.launcher.timeout_min=1",
                                    "hydra.launcher.signal_delay_s=5",
                                    "hydra.launcher.max_num_timeout=0"), tmp_path)
    rc, text = finish(proc, out)
    assert rc == 1, text[-3000:]
    assert "Traceback" not in text[text.find(f"sweep {sweep_dir}: "):]
    table = table_of(text, sweep_dir)
    assert table[0] == f"sweep {sweep_dir}: 1 job: 1 timeout"
    assert table[2].split()[:3] == ["0", "timeout", "4/6"]
    assert table[2].endswith("raise hydra.launcher.timeout_min or max_num_timeout"), table[2]
    assert load_sweep(sweep_dir).table.iloc[0]["state"] == "timeout"


def test_srun_tasks_are_shards_and_a_batch_script_without_srun_does_all(cluster, tmp_path,
                                                                           image_dir):
    """`srun -n 4` inside `sbatch -n 4`: four shards started together, every task exits 0,
    exactly one merges, the merge equals an unsharded run. The same allocation's batch
    script without srun is one process: it does every image itself, never a quarter.
    `srun -n 2` without run_dir: both tasks find one folder (named after the job and
    step) and merge there; `srun -n 2 ... -m` (a sweep in each task, one shard of every
    job each): one sweep folder, every job merged, one table, printed by the last task."""
    from pipeline.cli import run as run_in_process

    args = [*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg"]
    run_in_process(compose_cfg(*args), tmp_path / "reference")
    reference = tmp_path / "reference" / "results.h5"
    cmd = [sys.executable, str(ROOT / "run.py"), *args]
    sharded = shlex.join([*cmd, "run_dir=" + str(tmp_path / "srun")])
    whole = shlex.join([*cmd, "run_dir=" + str(tmp_path / "batch")])
    no_dir = shlex.join(cmd)
    sweep = shlex.join([sys.executable, str(ROOT / "run.py"), "-m", *args,
                        "model.target_layers=[layer3],[layer4]"])
    script = tmp_path / "job.sh"  # -O: four tasks on this 2-CPU test node
    script.write_text(f"#!/bin/bash\nsrun -O {sharded}\n{whole}\nsrun -O -n 2 {no_dir}\n"
                      f"srun -O -n 2 {sweep}\n")
    out = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--wait", "-O", "-n", "4", "--mem=4G", "-o", str(out),
                           "-D", str(tmp_path), str(script)], env=ENV, capture_output=True,
                          text=True, timeout=900)
    log = out.read_text()
    assert proc.returncode == 0, proc.stderr + log[-3000:]
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    assert final_states(job_id) == ["COMPLETED"]
    steps = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    assert all(line.split("|")[1] == "COMPLETED" and line.split("|")[2] == "0:0"
               for line in steps.splitlines() if line), steps
    # Step 0 (4 shards) and step 1 (2 shards) merge once each; each sweep job once.
    assert log.count("all shards done, merged") == 1 + 1 + 2
    assert sorted(p.name for p in (tmp_path / "srun").glob("results*.h5")) == [
        "results.h5", *[f"results.shard-{i}-of-4.h5" for i in range(4)]]
    assert_same_arrays(tmp_path / "srun" / "results.h5", reference)
    assert "not an srun task: it processes every image itself" in log
    assert_same_arrays(tmp_path / "batch" / "results.h5", reference)
    (shared,) = tmp_path.glob("outputs/*/*/results.h5")
    assert shared.parent.name == f"slurm-{job_id}.1"
    assert sorted(p.name for p in shared.parent.glob("results*.h5")) == [
        "results.h5", "results.shard-0-of-2.h5", "results.shard-1-of-2.h5"]
    assert_same_arrays(shared, reference)
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    assert sweep_dir.name == f"slurm-{job_id}.2"
    assert log.count(f"{sweep_dir.name}: 2 jobs: 2 done") == 1  # one table, by the last task
    assert "the last task of the srun step to finish prints" in log
    for job in ("0", "1"):
        assert (sweep_dir / job / "results.h5").exists()
