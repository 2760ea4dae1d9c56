"""Scale out: multirun sweeps, load_sweep, sharded runs merged into one file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest
from conftest import ROOT, TINY, compose_cfg, write_images

from pipeline.cli import run
from pipeline.errors import StoreError
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
    # One bad layer fails its job only; the sweep reports it and exits non-zero.
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "job 3 failed: unknown layer 'layer9'" in proc.stdout + proc.stderr
    sweep = load_sweep(sweep_dir)
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
        "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)"),
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
