"""The same command continues its run or sweep: identity records, Ctrl-C and the rerun,
srun steps sharing a folder, job folders under any subdir, the status stage, and commands
that cannot run as one line (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, done_rows
from stalling import stalling

from pipeline.cluster.states import IDENTITY_FILE
from pipeline.folders import claim, command_identity, find_unfinished, read_identity

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def run_py(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd,
                          env=env or ENV, capture_output=True, text=True, timeout=600)


def interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGINT (Ctrl-C) to ``proc`` once ``ready()`` is true (polled: progress read from
    files); fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)


def test_ctrl_c_then_the_same_command_continues_the_same_run(tmp_path, image_dir):
    """`python run.py ...` stopped by Ctrl-C after its first batch says "rerun the same
    command to resume", and that is what happens: the rerun continues in the same folder
    (no new time-stamped one) and computes only the missing images; a finished run's
    command run again starts a new run."""
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "0").touch()
    args = [*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
            *stalling(gates)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

    def first_batch() -> bool:
        found = list(tmp_path.glob("outputs/*/*/results.h5"))
        return bool(found) and done_rows(found[0]) >= 4

    interrupt_when(proc, first_batch)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "rerun the same command to resume" in out and "Traceback" not in out
    (folder,) = [p.parent for p in tmp_path.glob("outputs/*/*/results.h5")]
    record = read_identity(folder)
    assert record["kind"] == "run" and record["overrides"] == args
    (gates / "0").unlink()
    again = run_py(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 of 6 images done, 0 failed (4 were done before this run)" in again.stdout
    assert [p.parent for p in tmp_path.glob("outputs/*/*/results.h5")] == [folder]
    # Finished: the same command is a new run, in a new folder.
    third = run_py(*args, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "6 of 6 images done, 0 failed -> " in third.stdout  # nothing done before
    assert len(list(tmp_path.glob("outputs/*/*/results.h5"))) == 2


def test_an_interrupted_local_sweep_continues_with_the_same_command(tmp_path, image_dir):
    """Ctrl-C in a local multirun while job 1 runs: the same command, without
    hydra.sweep.dir, finds the sweep and finishes it there (job 1 resumes)."""
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "1").touch()
    args = ["-m", *TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
            *stalling(gates), "model.target_layers=[layer2],[layer3],[layer4]"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)

    def job1_started() -> bool:
        found = list(tmp_path.glob("multirun/*/*/1/results.h5"))
        return bool(found) and done_rows(found[0]) >= 4

    interrupt_when(proc, job1_started)
    (sweep_dir,) = [p.parent.parent for p in tmp_path.glob("multirun/*/*/1/results.h5")]
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out
    (gates / "1").unlink()
    again = run_py(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert list(tmp_path.glob("multirun/*/*")) == [sweep_dir]
    text = again.stdout + again.stderr
    assert "(4 were done before this run)" in text
    assert f"continuing sweep {sweep_dir.relative_to(tmp_path)}" in text
    assert f"sweep {sweep_dir.relative_to(tmp_path)}: 3 jobs: 3 done" in text
    assert read_identity(sweep_dir)["finished"] is True
    # Finished: the same command is a new sweep.
    third = run_py(*args, cwd=tmp_path)
    assert third.returncode == 0
    assert len(list(tmp_path.glob("multirun/*/*"))) == 2


def _record(folder: Path, identity: str, kind: str = "run", **fields) -> None:
    folder.mkdir(parents=True)
    (folder / IDENTITY_FILE).write_text(json.dumps({
        "format": "camsweep-identity", "identity": identity, "kind": kind, "pid": 1 << 22,
        "host": "elsewhere-" * 0 + os.uname().nodename, "created": fields.pop("created", 1.0),
        **fields}))


def test_the_latest_unfinished_folder_of_the_same_command_is_found(tmp_path):
    me = command_identity(["a=1"], "config", "run")
    assert me != command_identity(["a=2"], "config", "run")
    assert me != command_identity(["a=1"], "config", "sweep")
    _record(tmp_path / "d1" / "t1", me, created=1.0)
    _record(tmp_path / "d1" / "t2", me, created=2.0)
    _record(tmp_path / "d2" / "t3", command_identity(["a=2"], "config", "run"), created=3.0)
    _record(tmp_path / "d2" / "t4", me, created=4.0, pid=os.getpid())  # alive: not taken
    (tmp_path / "d1" / "t2" / "camsweep.json").write_text('{"status": "ok"}')  # finished
    assert find_unfinished(tmp_path, me, "run") == tmp_path / "d1" / "t1"
    # Shards: finished only when every shard is.
    (tmp_path / "d1" / "t1" / "camsweep.shard-0-of-2.json").write_text('{"status": "ok"}')
    assert find_unfinished(tmp_path, me, "run") == tmp_path / "d1" / "t1"
    (tmp_path / "d1" / "t1" / "camsweep.shard-1-of-2.json").write_text('{"status": "ok"}')
    assert find_unfinished(tmp_path, me, "run") is None
    # A task of the same srun step shares the folder its sibling claimed, alive or not.
    assert find_unfinished(tmp_path, me, "run", step="9.0") is None
    _record(tmp_path / "d3" / "t5", me, created=5.0, pid=os.getpid(), step="9.0")
    assert find_unfinished(tmp_path, me, "run", step="9.0") == tmp_path / "d3" / "t5"
    assert find_unfinished(tmp_path, me, "run", step="9.1") is None


def test_srun_tasks_of_one_step_share_one_folder(tmp_path, monkeypatch):
    """Two tasks of one srun step (two processes) without run_dir: one folder, named after
    the SLURM job and step, whatever second each started in."""
    code = ("import sys; from pipeline.folders import claim; "
            "print(claim(sys.argv[1], 'run'))")
    env = {**ENV, "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "2"}
    outs = {subprocess.run([sys.executable, "-c", code, f"outputs/day/12-00-0{i}"],
                           cwd=tmp_path, env={**env, "SLURM_PROCID": str(i)},
                           capture_output=True, text=True, check=True).stdout.strip()
            for i in range(2)}
    assert outs == {"outputs/day/slurm-77.3"}
    # Outside a step: a new folder per process, as before.
    monkeypatch.chdir(tmp_path)
    assert claim("outputs/day/13-00-00", "run") == "outputs/day/13-00-00"


def test_custom_job_folders_and_glob_sweeps_are_listed_in_full(tmp_path, image_dir):
    """hydra.sweep.subdir=job_<num> and a glob over a config group: every job found by the
    number Hydra recorded in its folder, no phantom jobs, the swept column there; the
    status stage prints the same table with log paths, without importing torch."""
    sweep_dir = tmp_path / "sweep"
    proc = run_py("-m", *TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
                  "method=glob([gradcam,gradcampp])", "hydra.sweep.subdir=job_${hydra.job.num}",
                  f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index(f"sweep {sweep_dir}"):].splitlines()
    assert table[0] == f"sweep {sweep_dir}: 2 jobs: 2 done"
    assert table[1].split() == ["job", "method", "state", "images"]
    assert table[2].split() == ["0", "gradcam", "done", "6/6"]
    assert table[3].split() == ["1", "gradcampp", "done", "6/6"]
    assert len(table) == 4
    code = ("import runpy, sys\nscript, folder = sys.argv[1:3]\n"
            "sys.argv = [script, 'stage=status', 'run_dir=' + folder]\ncode = None\n"
            "try:\n    runpy.run_path(script, run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('exit', code, 'torch' in sys.modules)\n")
    status = subprocess.run([sys.executable, "-c", code, str(ROOT / "run.py"), str(sweep_dir)],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    lines = status.stdout.splitlines()
    assert lines[-1] == "exit 0 False", status.stdout + status.stderr
    assert lines[0] == f"sweep {sweep_dir}: 2 jobs: 2 done"
    assert lines[3] == f"      log: {sweep_dir / 'job_0' / 'run.log'}"
    # A single run folder.
    status = run_py("stage=status", f"run_dir={sweep_dir / 'job_1'}", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == f"run {sweep_dir / 'job_1'}: done, 6/6 images"
    bad = run_py("stage=status", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: stage=status needs run_dir")


@pytest.mark.parametrize(("args", "message"), [
    (["-m", "seed=interval(0,1)"], "error: seed=interval(0,1): interval() needs a sweeper "
     "that samples"),
    (["-m", "model.target_layers=glob(*)"], "error: model.target_layers=glob(*): glob() "
     "picks options of a config group"),
    (["-m", "hydra/launcher=slurm_cpu"], "error: hydra/launcher=slurm needs a SLURM cluster, "
     "and this machine has no 'sbatch' and 'srun' on its PATH"),
])
def test_commands_that_cannot_run_are_one_line_exit_2(tmp_path, args, message):
    env = {**ENV, "PATH": str(tmp_path / "empty")}  # no SLURM here
    proc = run_py(*args, *TINY, "stage=extract", f"hydra.sweep.dir={tmp_path / 's'}",
                  cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_status_rate_and_eta_of_a_job_being_written(tmp_path):
    """Rows done since the writer took the lock (the lock file's time), over the time since."""
    from pipeline.status import progress

    lock = tmp_path / ".results.h5.lock"
    lock.write_text("pid 1 on here, writing")
    os.utime(lock, (1000.0, 1000.0))
    assert progress(tmp_path, 5, 10, now=1010.0) == "0.5 img/s, ETA 10s"
    assert progress(tmp_path, 10, 10, now=1010.0) == "1 img/s"
    assert progress(tmp_path, 0, 10, now=1010.0) == ""
    lock.unlink()
    assert progress(tmp_path, 5, 10, now=1010.0) == ""


def test_jobs_in_other_processes_find_the_sweep_folder_the_driver_chose(tmp_path, image_dir):
    """submitit_local runs each job in its own process, which resolves hydra.sweep.dir
    again: every job lands in the driver's folder, not a folder of its own."""
    proc = run_py("-m", "hydra/launcher=submitit_local", *TINY, "stage=extract", "data=glob",
                  f"data.pattern={image_dir}/*.jpg", "model.target_layers=[layer3],[layer4]",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    assert sorted(p.parent.name for p in sweep_dir.glob("*/results.h5")) == ["0", "1"]
    assert f"{sweep_dir.relative_to(tmp_path)}: 2 jobs: 2 done" in proc.stdout
