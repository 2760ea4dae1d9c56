"""Scale out: multirun sweeps, load_sweep, sharded runs merged into one file."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import ROOT, TINY, compose_cfg, write_images

from pipeline.cli import run
from pipeline.cluster.states import TIME_LIMIT_REASON
from pipeline.errors import StoreError
from pipeline.extract import extract
from pipeline.merge import merge_if_complete, merge_shards
from pipeline.results import load_run, load_sweep


def assert_same(a: np.ndarray, b: np.ndarray, key: str) -> None:
    """Equal; floats up to the reassociation of a different batch composition."""
    if a.dtype.kind == "f":
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=key)
    else:
        np.testing.assert_array_equal(a, b, err_msg=key)


def _arrays(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset)
                     else None)
    return out


@pytest.mark.slow
def test_multirun_over_layers_gives_one_results_file_per_job(tmp_path, image_dir):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *TINY, "stage=extract", "data=glob",
           f"data.pattern={image_dir}/*.jpg",
           "model.target_layers=[layer2],[layer3],[layer4],[layer9]",
           f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    # One bad layer fails its job only; the sweep ends with its table and exits non-zero.
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    table = out[out.index(f"sweep {sweep_dir}: 4 jobs: 3 done, 1 failed"):].splitlines()
    assert table[1].split() == ["job", "model.target_layers", "state", "images", "error"]
    assert table[2].split() == ["0", "[layer2]", "done", "6/6"]
    assert table[5].split()[:6] == ["3", "[layer9]", "failed", "-", "unknown", "layer"]
    assert "'layer9'; did you mean 'layer4'" in table[5]
    assert table[6].startswith("1 job did not finish")
    assert table[7].strip().endswith(f"hydra.sweep.dir={sweep_dir}")
    sweep = load_sweep(sweep_dir)
    assert sweep.swept == ["model.target_layers"]  # not the constant overrides
    t = sweep.table
    assert list(t["job"]) == [0, 1, 2, 3]
    assert list(t["model.target_layers"]) == ["[layer2]", "[layer3]", "[layer4]", "[layer9]"]
    assert list(t["state"]) == ["done", "done", "done", "failed"]
    assert list(t["done"]) == [6, 6, 6, 0] and list(t["layers"][:3]) == ["layer2", "layer3",
                                                                          "layer4"]
    assert (t["mean_prob"][:3] > 0).all() and np.isnan(t["accuracy"][:3]).all()
    assert list(sweep.failed["job"]) == [3]
    with sweep.run(2) as r:
        assert r.cams("layer4").shape == (6, 2, 2)
    assert [row["job"] for row, _ in sweep.runs()] == [0, 1, 2]
    for job in range(3):
        assert (sweep_dir / str(job) / "results.h5").exists()
        assert (sweep_dir / str(job) / ".hydra" / "config.yaml").exists()
    with pytest.raises(StoreError, match="no job 7"):
        sweep.run(7)
    # The printed command runs the sweep again in its folder: done jobs find nothing to do.
    rerun = [sys.executable, str(ROOT / "run.py"), *shlex.split(table[7])[2:]]
    proc = subprocess.run(rerun, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert out.count("6 of 6 images done, 0 failed (6 were done before this run)") == 3
    assert f"sweep {sweep_dir}: 4 jobs: 3 done, 1 failed" in out


@pytest.mark.parametrize("num_shards", [2, 3])
def test_sharded_runs_merge_to_the_unsharded_run(tmp_path, num_shards):
    images = tmp_path / "images"
    write_images(images, 7)
    base = (*TINY, "stage=extract", "data=glob", f"data.pattern={images}/*.jpg",
            "model.target_layers=[layer3,layer4]")
    run(compose_cfg(*base), tmp_path / "whole")
    sharded = tmp_path / "sharded"
    for shard in range(num_shards):
        result = run(compose_cfg(*base, f"data.shard={shard}", f"data.num_shards={num_shards}"),
                     sharded)
    # The last shard to finish merged them all.
    assert result["results"] == str(sharded / "results.h5")
    whole, merged = _arrays(tmp_path / "whole" / "results.h5"), _arrays(sharded / "results.h5")
    assert whole.keys() == merged.keys()
    for key in whole:
        assert_same(merged[key], whole[key], key)
    with h5py.File(sharded / "results.h5") as f:
        assert f["gradcam/layer4"].is_virtual
        assert f.attrs["num_shards"] == 1 and f.attrs["n_images"] == 7
    # The folder moves as a whole: relative sources are found beside the merged file.
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(sharded), str(moved))
    with load_run(moved) as r:
        assert_same(r.cams("layer3"), whole["gradcam/layer3"], "layer3")
        assert list(r.paths) == list(whole["images/path"].astype(str))
    # A real copy needs no shard files.
    merge_shards(moved, copy=False)  # re-merging a merge is allowed
    (moved / "results.h5").unlink()
    merge_shards(moved, copy=True)
    copy = tmp_path / "copy.h5"
    shutil.copy(moved / "results.h5", copy)
    assert not h5py.File(copy)["gradcam/layer4"].is_virtual
    assert_same(_arrays(copy)["gradcam/layer4"], whole["gradcam/layer4"], "layer4")


def _hold_lock(path) -> subprocess.Popen:
    """Another process holding the POSIX lock on ``path``, as a camsweep writer does."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
        "fcntl.lockf(f, fcntl.LOCK_EX, 1, 0); print('locked', flush=True); time.sleep(600)"),
        str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_shard_still_writing_or_killed_while_merging(tmp_path, image_dir):
    """A shard still writing leaves the merge to whoever finishes last; a merge lock dies
    with its holder: after a kill -9 the waiting shard merges."""
    base = (*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg")
    for shard in range(2):
        run(compose_cfg(*base, f"data.shard={shard}", "data.num_shards=2"), tmp_path)
    merged = tmp_path / "results.h5"
    assert merge_if_complete(tmp_path) == merged  # up to date: kept as it is
    merged.unlink()
    holder = _hold_lock(tmp_path / ".results.shard-1-of-2.h5.lock")
    try:
        assert merge_if_complete(tmp_path) is None  # shard 1 is still being written
        with pytest.raises(StoreError, match="still being written"):
            merge_shards(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert not merged.exists()
    holder = _hold_lock(tmp_path / ".results.h5.lock")  # a shard merging right now
    result: dict = {}
    waiter = threading.Thread(target=lambda: result.update(out=merge_if_complete(tmp_path)))
    waiter.start()
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.wait()
    waiter.join(timeout=120)
    assert result["out"] == merged
    with load_run(tmp_path) as r:
        assert r.done.all() and len(r.paths) == 6


def test_shards_from_slurm_environment(tmp_path, image_dir, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")  # task 1 of a 2-task srun step
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    result = run(compose_cfg(*TINY, "stage=extract", "data=glob",
                             f"data.pattern={image_dir}/*.jpg"), tmp_path)
    assert result["results"].endswith("results.shard-1-of-2.h5") and result["n"] == 3
    assert not (tmp_path / "results.h5").exists()  # shard 0 not done: no merge yet
    with pytest.raises(StoreError, match=r"shards \[0\] of 2 are missing"):
        merge_shards(tmp_path)


def test_merge_refuses_to_replace_an_unsharded_run(tmp_path, image_dir):
    base = (*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg")
    run(compose_cfg(*base), tmp_path)
    run(compose_cfg(*base, "data.shard=0", "data.num_shards=1"), tmp_path)  # 1 shard = whole
    with pytest.raises(StoreError, match="holds no results.shard"):
        merge_shards(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("num_shards", "rounds"), [(2, 2), (4, 1)])
def test_shards_started_together_all_succeed_and_one_merges(tmp_path, num_shards, rounds):
    """Real concurrent processes: every shard exits 0, exactly one merges, and the merged
    file equals the unsharded run."""
    images = tmp_path / "images"
    write_images(images, 12)
    args = [*TINY, "stage=extract", "data=glob", f"data.pattern={images}/*.jpg"]
    whole = tmp_path / "whole"
    run(compose_cfg(*args), whole)
    for r in range(rounds):
        run_dir = tmp_path / f"sharded{r}"
        procs = [subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *args, f"run_dir={run_dir}",
             f"data.shard={i}", f"data.num_shards={num_shards}"], cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_shards)]
        outs = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
        assert [code for code, _ in outs] == [0] * num_shards, [o[-1500:] for _, o in outs]
        assert sum("all shards done, merged" in out for _, out in outs) == 1
        merged, ref = _arrays(run_dir / "results.h5"), _arrays(whole / "results.h5")
        for key in ref:
            assert_same(merged[key], ref[key], key)


# -- the sweep table: jobs that never ran, jobs being written, SLURM's records ------------------

MULTIRUN_YAML = """\
hydra:
  sweeper:
    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper
    max_batch_size: null
    params:
      method: gradcam,saliency
  overrides:
    hydra:
    - hydra/launcher=slurm_cpu
    - hydra.sweep.dir=somewhere/else
    - hydra.mode=MULTIRUN
    task:
    - model=resnet18
    - model.target_layers=[layer3],[layer4]
    - data.pattern=photos/*.jpg
"""


def _job_folder(sweep: Path, job: int, overrides: list[str]) -> Path:
    """A job folder as Hydra leaves it when the job starts."""
    folder = sweep / str(job)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return folder


def _extract(folder: Path, image_dir: Path, *overrides: str) -> Path:
    run(compose_cfg(*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
                    *overrides), folder)
    return folder / "results.h5"


def _mark_pending(results: Path, rows: slice) -> None:
    """As if the run had been stopped before those rows: their status back to pending."""
    with h5py.File(results, "r+", locking=False) as f:
        f["images/status"][rows] = 0


def test_sweep_lists_jobs_that_never_started_and_names_the_swept_keys(tmp_path, image_dir):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(MULTIRUN_YAML)
    # Job 1 ran; the others never started (no folder). Hydra's order: params first.
    job1 = ["method=gradcam", "model=resnet18", "model.target_layers=[layer4]",
            "data.pattern=photos/*.jpg"]
    _extract(_job_folder(sweep, 1, job1), image_dir, "model.target_layers=[layer4]")
    s = load_sweep(sweep)
    assert s.swept == ["method", "model.target_layers"]  # not model, not data.pattern
    t = s.table
    assert list(t["job"]) == [0, 1, 2, 3]
    assert list(t["state"]) == ["missing", "done", "missing", "missing"]
    assert list(t["method"]) == ["gradcam", "gradcam", "saliency", "saliency"]
    assert list(t["model.target_layers"]) == ["[layer3]", "[layer4]", "[layer3]", "[layer4]"]
    assert "slurm_job" not in t.columns  # not a SLURM sweep
    lines = s.report()
    assert lines[0] == f"sweep {sweep}: 4 jobs: 1 done, 3 missing (never ran)"
    assert lines[1].split() == ["job", "method", "model.target_layers", "state", "images"]
    assert lines[2].split() == ["0", "gradcam", "[layer3]", "missing", "-"]
    assert lines[3].split() == ["1", "gradcam", "[layer4]", "done", "6/6"]
    assert lines[6].startswith("3 jobs did not finish")
    assert lines[7] == ("  python run.py -m hydra/launcher=slurm_cpu model=resnet18 "
                        "'model.target_layers=[layer3],[layer4]' 'data.pattern=photos/*.jpg' "
                        f"hydra.sweep.dir={sweep.resolve()}")
    assert len(lines) == 8


def test_a_job_being_written_reads_as_running_then_incomplete(tmp_path, image_dir):
    """Another process holds the job's writer lock and has the file open for writing with
    HDF5's own file lock: the sweep reads it (running, images done so far), and after that
    process is killed, as incomplete; never as failed."""
    sweep = tmp_path / "sweep"
    results = _extract(_job_folder(sweep, 0, ["model.target_layers=[layer4]"]), image_dir)
    _mark_pending(results, slice(4, None))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, h5py\n"
        "from pipeline.locks import writer_lock\n"
        "with writer_lock(sys.argv[1]), h5py.File(sys.argv[1], 'r+'):\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(120)\n"), str(results)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert writer.stdout.readline().strip() == "writing"
        row = load_sweep(sweep).table.iloc[0]
        assert (row["state"], row["done"], row["n"], row["error"]) == ("running", 4, 6, "")
    finally:
        writer.kill()  # SIGKILL: the lock dies with it
        writer.wait()
    s = load_sweep(sweep)
    assert list(s.table["state"]) == ["incomplete"] and s.table.iloc[0]["error"] == ""
    assert s.report()[2].split() == ["0", "incomplete", "4/6"]


def test_sweep_states_from_the_slurm_launchers_records(tmp_path, image_dir):
    """slurm_jobs.json (written by the launcher) says how jobs ended; the results decide
    done. A job stopped by submitit's requeue (SystemExit in its status) is not failed."""
    sweep = tmp_path / "sweep"
    _extract(_job_folder(sweep, 0, ["model.target_layers=[layer3]"]), image_dir,
             "model.target_layers=[layer3]")
    cancelled = _extract(_job_folder(sweep, 1, ["model.target_layers=[layer4]"]), image_dir)
    _mark_pending(cancelled, slice(2, None))
    timed_out = _extract(_job_folder(sweep, 2, ["model.target_layers=[layer2]"]), image_dir,
                         "model.target_layers=[layer2]")
    _mark_pending(timed_out, slice(5, None))
    (sweep / "2" / "camsweep.json").write_text(json.dumps(
        {"status": "failed", "error": "SystemExit: -1", "stage": "extract"}))
    record = {"earlier_slurm_job_ids": [], "error": ""}
    (sweep / "slurm_jobs.json").write_text(json.dumps({"jobs": {
        "0": {**record, "overrides": ["model.target_layers=[layer3]"],
              "slurm_job_id": "7_0", "slurm_state": "COMPLETED", "outcome": "done"},
        "1": {**record, "overrides": ["model.target_layers=[layer4]"],
              "slurm_job_id": "7_1", "slurm_state": "CANCELLED", "outcome": "cancelled"},
        "2": {**record, "overrides": ["model.target_layers=[layer2]"],
              "slurm_job_id": "7_2", "slurm_state": "TIMEOUT", "outcome": "timeout",
              "error": TIME_LIMIT_REASON},
        "3": {**record, "overrides": ["model.target_layers=[layer1]"],
              "slurm_job_id": "7_3", "slurm_state": "CANCELLED", "outcome": "cancelled"},
    }}))
    s = load_sweep(sweep, slurm=False)
    t = s.table
    assert list(t["state"]) == ["done", "cancelled", "timeout", "missing"]
    assert list(t["slurm_job"]) == ["7_0", "7_1", "7_2", "7_3"]
    assert list(t["error"]) == ["", "", TIME_LIMIT_REASON, ""]
    assert s.swept == ["model.target_layers"]  # the only key that differs (no multirun.yaml)
    assert s.report()[0] == (f"sweep {sweep}: 4 jobs: 1 done, 1 timeout, 1 cancelled, "
                             "1 missing (never ran)")
    assert s.report()[3].split() == ["1", "[layer4]", "cancelled", "2/6", "7_1", "CANCELLED"]
    assert s.report()[5].split() == ["3", "[layer1]", "missing", "-", "7_3", "CANCELLED"]


@pytest.mark.parametrize(("stderr", "params", "key", "fix"), [
    ("sbatch: error: Invalid generic resource (gres) specification",
     {"gpus_per_node": 1, "cpus_per_task": 8}, "gpus_per_node=1",
     "use hydra.launcher.gpus_per_node=null (or hydra/launcher=slurm_cpu)"),
    ("sbatch: error: Batch job submission failed: More processors requested than permitted",
     {"gpus_per_node": None, "cpus_per_task": 8}, "cpus_per_task=8",
     "a smaller hydra.launcher.cpus_per_task"),
    ("sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job "
     "submission failed: Requested node configuration is not available",
     {"cpus_per_task": 1, "mem_gb": 32}, "mem_gb=32", "a smaller hydra.launcher.mem_gb"),
    ("sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission "
     "failed: Invalid partition name specified", {"partition": "gpu"}, "partition=gpu",
     "hydra.launcher.partition=NAME"),
])
def test_sbatch_refusal_names_the_launcher_key(stderr, params, key, fix):
    from pipeline.cluster import explain_sbatch_error

    message = explain_sbatch_error(stderr, params)
    assert "\n" not in message and message.startswith("sbatch refused the jobs (")
    assert f"hydra.launcher.{key}" in message and fix in message
    assert explain_sbatch_error("sbatch: error: Something new", {}).startswith(
        "sbatch refused the jobs: Something new; check the hydra.launcher.* settings")


def test_a_shard_finding_the_merge_done_does_not_claim_it(tmp_path, image_dir, caplog):
    """Shards finishing together: the one that takes the merge lock second finds the merge
    up to date and says so; only the first reports 'merged' (the log counts merges)."""
    base = (*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg")
    for shard in range(2):
        extract(compose_cfg(*base, f"data.shard={shard}", "data.num_shards=2"), tmp_path)
    caplog.set_level("INFO", logger="pipeline.merge")
    assert merge_if_complete(tmp_path) == tmp_path / "results.h5"
    assert merge_if_complete(tmp_path) == tmp_path / "results.h5"
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.merge"]
    assert [m.split(" ->")[0] for m in messages] == [
        "all shards done, merged", f"{tmp_path / 'results.h5'} already merges these shards"]


def _fake_slurm(bin_dir: Path, squeue: str | None, sacct: str) -> None:
    """``squeue`` and ``sacct`` on PATH printing the given ``JobID|State`` lines (squeue
    None: exits 1 as for job ids the controller no longer knows)."""
    bin_dir.mkdir(exist_ok=True)
    for name, out in (("squeue", squeue), ("sacct", sacct)):
        script = bin_dir / name
        body = ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"
                if out is None else f"printf '%s' {shlex.quote(out)}")
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)


def test_slurm_states_trust_the_controller_over_lagging_accounting(tmp_path, monkeypatch):
    """slurmdbd records a start late: sacct says PENDING while the controller runs the job
    (a CI failure). squeue answers for jobs it holds; sacct only for the ones it forgot."""
    from pipeline.cluster import slurm_states

    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    _fake_slurm(tmp_path / "bin", squeue="41|RUNNING\n42_[1-2]|PENDING\n",
                sacct="41|PENDING\n40|COMPLETED\n42_[1-2]|PENDING\n43|CANCELLED by 0\n")
    assert slurm_states(["41", "40", "42_2", "43", "44"]) == {
        "41": "RUNNING", "42_2": "PENDING", "40": "COMPLETED", "43": "CANCELLED"}
    # Every id forgotten by the controller (squeue fails): accounting answers for all.
    _fake_slurm(tmp_path / "bin", squeue=None, sacct="41|COMPLETED\n")
    assert slurm_states(["41"]) == {"41": "COMPLETED"}
    # No SLURM at all.
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert slurm_states(["41"]) == {}


def _identity(sweep: Path, pid: int) -> None:
    """The sweep's record of its driver, as SweepReport writes it when the sweep starts."""
    (sweep / "camsweep.identity.json").write_text(json.dumps({
        "format": "camsweep-identity", "kind": "sweep", "pid": pid,
        "host": os.uname().nodename, "ended": False}))


def test_live_sweep_states_from_slurm_and_the_job_folders(tmp_path, image_dir, monkeypatch):
    """A job resubmitted after a failure is pending (SLURM's word), not its stale error; a
    job out of requeues is timeout, not failed; a requeued job says so; a job whose metrics
    writer lock is held is evaluating; the table lists logs and, while jobs run, never
    tells to run the sweep again."""
    sweep = tmp_path / "sweep"
    stale = _job_folder(sweep, 0, ["model.target_layers=[layer3]"])
    (stale / "camsweep.json").write_text(json.dumps(
        {"status": "failed", "error": "RuntimeError: CUDA error", "stage": "extract"}))
    late = _extract(_job_folder(sweep, 1, ["model.target_layers=[layer4]"]), image_dir)
    _mark_pending(late, slice(4, None))
    (sweep / "1" / "camsweep.json").write_text(json.dumps({"status": "failed", "error": (
        "UncompletedJobError: Job not requeued because: timed-out too many times."),
        "stage": "extract"}))
    _extract(_job_folder(sweep, 3, ["model.target_layers=[layer1]"]), image_dir,
                       "model.target_layers=[layer1]")
    record = {"earlier_slurm_job_ids": [], "error": "", "outcome": "submitted",
              "slurm_state": "PENDING"}
    (sweep / "slurm_jobs.json").write_text(json.dumps({"jobs": {
        "0": {**record, "overrides": ["model.target_layers=[layer3]"], "slurm_job_id": "9"},
        "1": {**record, "overrides": ["model.target_layers=[layer4]"], "slurm_job_id": "7_1",
              "outcome": "failed", "slurm_state": "FAILED"},
        "2": {**record, "overrides": ["model.target_layers=[layer2]"], "slurm_job_id": "7_2"},
        "3": {**record, "overrides": ["model.target_layers=[layer1]"], "slurm_job_id": "7_3"},
    }}))
    logs = sweep / ".submitit" / "7_2"
    logs.mkdir(parents=True)
    (logs / "7_2_0_log.out").write_text("starting\n")
    (logs / "7_2_0_log.err").write_text("submitit WARNING: Bypassing signal SIGTERM\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    _fake_slurm(tmp_path / "bin", squeue="9|PENDING\n7_2|PENDING\n7_3|RUNNING\n",
                sacct="9|FAILED\n9|PENDING\n7_2|REQUEUED\n7_2|PENDING\n7_3|RUNNING\n")
    holder = _hold_lock(sweep / "3" / ".metrics.h5.lock")
    try:
        s = load_sweep(sweep)
    finally:
        holder.kill()
        holder.wait()
    t = s.table
    assert list(t["job"]) == [0, 1, 2, 3]
    assert list(t["state"]) == ["pending", "timeout", "pending", "evaluating"]
    assert list(t["error"]) == ["", "time limit reached after every requeue (max_num_timeout)"
                                ": raise hydra.launcher.timeout_min or max_num_timeout", "", ""]
    assert list(t["requeued"]) == [0, 0, 1, 0]  # sacct -D: an earlier run ended REQUEUED
    assert t.iloc[2]["logs"] == [str(logs / "7_2_0_log.out"), str(logs / "7_2_0_log.err")]
    assert t.iloc[3]["logs"] == []  # run here, not by Hydra: no run.log
    lines = s.report(logs=True)
    assert lines[0] == f"sweep {sweep}: 4 jobs: 1 evaluating, 2 pending, 1 timeout"
    assert lines[2].split() == ["0", "[layer3]", "pending", "-", "9", "PENDING"]
    assert lines[4].split() == ["2", "[layer2]", "pending", "-", "7_2", "PENDING",
                                "preempted,", "requeued", "1x"]
    assert lines[5] == f"      log: {logs / '7_2_0_log.out'}"
    assert lines[-1] == ("3 jobs still running or queued; follow them with: python run.py "
                         f"stage=status run_dir={sweep}")
    assert not any("run again" in line for line in lines)


def test_jobs_not_started_are_pending_while_the_driver_runs(tmp_path, image_dir):
    """A local sweep's jobs wait for their turn: pending while the driver (its pid in the
    sweep's record) runs, missing (never ran) once it is gone."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(MULTIRUN_YAML)
    job0 = ["method=gradcam", "model=resnet18", "model.target_layers=[layer3]",
            "data.pattern=photos/*.jpg"]
    _extract(_job_folder(sweep, 0, job0), image_dir, "model.target_layers=[layer3]")
    _identity(sweep, os.getpid())
    s = load_sweep(sweep)
    assert list(s.table["state"]) == ["done", "pending", "pending", "pending"]
    assert s.report()[-1].startswith("3 jobs still running or queued; follow them with")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _identity(sweep, int(dead.stdout))
    s = load_sweep(sweep)
    assert list(s.table["state"]) == ["done", "missing", "missing", "missing"]
    assert s.report()[-2].startswith("3 jobs did not finish; the same command run again")


def test_sharded_jobs_count_as_done_once_every_shard_is(tmp_path, image_dir):
    """Jobs run as srun shards (tasks_per_node>1) write camsweep.shard-i-of-N.json: done
    (and not submitted again) when all N say ok and the merge exists; one shard alone is
    incomplete, never done."""
    from pipeline.cli import main
    from pipeline.jobs import already_done

    overrides = ["model.target_layers=[layer4]"]
    job = _job_folder(tmp_path / "sweep", 0, overrides)
    base = (*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
            f"run_dir={job}")
    main(compose_cfg(*base, "data.shard=0", "data.num_shards=2"))
    assert already_done(job, overrides) is None
    s = load_sweep(tmp_path / "sweep")
    assert (s.table.iloc[0]["state"], s.table.iloc[0]["done"], s.table.iloc[0]["n"]) == (
        "incomplete", 3, 3)
    main(compose_cfg(*base, "data.shard=1", "data.num_shards=2"))
    assert already_done(job, overrides) == {"status": "ok", "shards": 2, "done": 6, "n": 6}
    assert already_done(job, ["model.target_layers=[layer3]"]) is None
    s = load_sweep(tmp_path / "sweep")
    assert (s.table.iloc[0]["state"], s.table.iloc[0]["done"]) == ("done", 6)


def test_job_folders_are_found_by_the_job_number_hydra_recorded(tmp_path, image_dir):
    """hydra.sweep.subdir=job_<num> (nested too): no phantom numbered jobs."""
    from pipeline.jobs import job_folders

    sweep = tmp_path / "sweep"
    for num, sub in ((0, "a/job_0"), (1, "b/job_1")):
        folder = sweep / sub
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"job": {"num": num, "name": "run"}}}))
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={num}"]))
    assert job_folders(sweep) == {0: sweep / "a/job_0", 1: sweep / "b/job_1"}
    s = load_sweep(sweep)
    assert list(s.table["job"]) == [0, 1] and list(s.table["seed"]) == ["0", "1"]


def test_a_job_ended_at_its_time_limit_says_what_to_raise_however_it_ended():
    """Out of requeues, a job ends by submitit's word (the driver gets its error) or, when
    SLURM kills it at the limit before that word is out, by SLURM's TIMEOUT alone: both
    say timeout and what to raise. Other ends keep SLURM's word."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from pipeline.cluster.launch import outcome
    from pipeline.cluster.states import OUT_OF_TIMEOUTS_REASON

    class Ended:
        def __init__(self, error: Exception, state: str) -> None:
            self.error, self.state = error, state

        def results(self) -> None:
            raise self.error

    words = FailedJobError("Job not requeued because: timed-out too many times.")
    assert outcome(Ended(words, "FAILED")) == ("timeout", None, OUT_OF_TIMEOUTS_REASON,
                                               "FAILED")
    killed = UncompletedJobError("Job 7 (task: 0) with path ... has not produced any output")
    assert outcome(Ended(killed, "TIMEOUT")) == ("timeout", None, TIME_LIMIT_REASON, "TIMEOUT")
    for reason in (OUT_OF_TIMEOUTS_REASON, TIME_LIMIT_REASON):
        assert reason.endswith("raise hydra.launcher.timeout_min or max_num_timeout")
    assert outcome(Ended(killed, "CANCELLED by 0")) == ("cancelled", None, "", "CANCELLED")
    assert outcome(Ended(killed, "OUT_OF_MEMORY")) == (
        "failed", None, "SLURM: out of memory (hydra.launcher.mem_gb)", "OUT_OF_MEMORY")
    assert outcome(Ended(killed, "BOOT_FAIL")) == ("failed", None, "SLURM: ended as BOOT_FAIL",
                                                   "BOOT_FAIL")
