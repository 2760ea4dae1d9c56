"""Integrity under faults: every row marked done holds the right image's arrays from the
configuration the file names, and nothing a user or the machine does loses finished work.

Faults are real: files added/removed between a kill and a resume, a full tmpfs, concurrent
processes, crafted and damaged files. Waits are for progress read from the file, never a
fixed sleep, so the tests hold on a loaded machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, TINY, compose_cfg, write_images

from pipeline.cli import main
from pipeline.errors import RunRefused, StoreError
from pipeline.extract import extract, prepare
from pipeline.locks import run_dir_lock, writer_lock
from pipeline.merge import merge_shards
from pipeline.results import load_run
from pipeline.store import DONE, FAILED, PENDING, open_results

CI = os.environ.get("CI") is not None
ARRAYS = ("gradcam/layer4", "gradcam_weights/layer4", "targets/class", "targets/score",
          "predictions/class", "predictions/prob", "images/size")


def _cfg(images: Path, *extra: str):
    return compose_cfg(*TINY, "data=glob", f"data.pattern={images}/*.jpg", *extra)


def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), *args]


def _cli_args(images: Path, run_dir: Path, *extra: str) -> list[str]:
    return _cmd("stage=extract", f"run_dir={run_dir}", *TINY, "data=glob",
                f"data.pattern={images}/*.jpg", *extra)


def _done(results: Path) -> int:
    """Rows marked done, read as any reader would while the run writes."""
    try:
        with h5py.File(results, "r", locking=False) as f:
            return int((f["images/status"][:] == DONE).sum())
    except (OSError, KeyError):
        return 0


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            return  # finished before: the caller's assertions still hold
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no progress within {timeout}s: {what}")
        time.sleep(0.02)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][:] for k in ARRAYS if k in f}


# -- 1. the image list is fixed at creation --------------------------------------------------

@pytest.mark.slow
def test_killed_run_refuses_resume_after_files_were_added_or_removed(tmp_path):
    images = tmp_path / "images"
    write_images(images, 10)
    run_dir = tmp_path / "run"
    results = run_dir / "results.h5"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli_args(images, run_dir, "batch_size=2"), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _done(results) >= 2, proc, "2 rows done")
    proc.kill()
    proc.wait()
    with h5py.File(results, "r", locking=False) as f:
        before = f["images/status"][:].copy()
    write_images(images, 1, start=99)  # a new file, sorting between the others
    (images / "img099.jpg").rename(images / "aaa_new.jpg")
    again = subprocess.run(_cli_args(images, run_dir, "batch_size=2"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "1 file(s) added, 0 removed" in again.stderr and "overwrite=true" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    with h5py.File(results, "r", locking=False) as f:  # untouched
        np.testing.assert_array_equal(f["images/status"][:], before)
    (images / "aaa_new.jpg").unlink()
    (images / "img004.jpg").unlink()
    gone = subprocess.run(_cli_args(images, run_dir), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert gone.returncode == 2 and "0 file(s) added, 1 removed" in gone.stderr
    # Starting over on the new list gives what a fresh run on it gives.
    over = subprocess.run(_cli_args(images, run_dir, "overwrite=true"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert over.returncode == 0, over.stderr[-2000:]
    fresh = subprocess.run(_cli_args(images, tmp_path / "fresh"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    a, b = _arrays(results), _arrays(tmp_path / "fresh" / "results.h5")
    for key in ARRAYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with load_run(results) as r:
        assert len(r) == 9 and r.done.all() and "img004.jpg" not in " ".join(r.paths)


def test_resume_reads_the_files_own_rows(tmp_path):
    """The dataset of a resume is the file's /images/path, not today's listing."""
    images = tmp_path / "images"
    write_images(images, 5)
    run_dir = tmp_path / "run"
    cfg = _cfg(images)
    extract(cfg, run_dir)
    full = _arrays(run_dir / "results.h5")
    with h5py.File(run_dir / "results.h5", "r+") as f:
        f["images/status"][2:] = PENDING
        f["gradcam/layer4"][2:] = -1
    summary = extract(cfg, run_dir)
    assert (summary.done, summary.skipped) == (5, 2)
    # Equal up to float rounding: the resumed batch holds other images (rows 2-4).
    np.testing.assert_allclose(_arrays(run_dir / "results.h5")["gradcam/layer4"],
                               full["gradcam/layer4"], rtol=1e-5, atol=1e-6)


def test_sharded_run_refuses_a_changed_listing(tmp_path):
    images = tmp_path / "images"
    write_images(images, 6)
    run_dir = tmp_path / "run"
    extract(_cfg(images, "data.shard=0", "data.num_shards=2"), run_dir)
    write_images(images, 1, start=50)
    with pytest.raises(RunRefused, match="7 files now, 6 then"):
        extract(_cfg(images, "data.shard=1", "data.num_shards=2"), run_dir)
    with pytest.raises(RunRefused, match="7 files now, 6 then"):
        extract(_cfg(images, "data.shard=0", "data.num_shards=2"), run_dir)


# -- 2. a failed first image ----------------------------------------------------------------

def test_run_whose_first_image_failed_finishes_and_resumes(tmp_path):
    images = tmp_path / "images"
    write_images(images, 11)
    (images / "aaa_empty.jpg").write_bytes(b"")
    summary = extract(_cfg(images), tmp_path / "run")
    assert (summary.n, summary.done, summary.failed) == (12, 11, 1)
    assert [Path(p).name for p, _, _ in summary.top1][:2] == ["img000.jpg", "img001.jpg"]
    with load_run(tmp_path / "run") as r:
        cls = r.predictions[0][:, 0]
    assert summary.top1[0][1].startswith(f"{cls[1]} ")  # row 1 is the first done row
    # Failed rows are retried on resume: the file is fixed now, so it gets done.
    write_images(images, 1, start=70)
    (images / "img070.jpg").replace(images / "aaa_empty.jpg")
    again = extract(_cfg(images), tmp_path / "run")
    assert (again.done, again.failed, again.skipped) == (12, 0, 11)
    assert "11 were done before this run" in again.lines()[0]
    with load_run(tmp_path / "run") as r:
        assert r.errors[0] == "" and r.status[0] == DONE


# -- 3. a full disk -------------------------------------------------------------------------



def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    return filler


def _punch(path: Path, offset: int, length: int) -> None:
    """Give back the disk blocks of a byte range (as a copy-on-write file system may hold
    none for a rewrite): writes there need new space again."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        start, end = -(-offset // 4096) * 4096, (offset + length) // 4096 * 4096
        assert libc.fallocate(fd, 3, start, end - start) == 0, ctypes.get_errno()  # PUNCH|KEEP
    finally:
        os.close(fd)


ACT = ("method=activations", "method.dtype=float32", "model.target_layers=[layer1]",
       "batch_size=4")


def test_full_disk_at_creation_is_one_line_and_leaves_nothing(tmp_path, tmpfs):
    images = tmp_path / "images"
    write_images(images, 48)
    disk = tmpfs(600)  # the file needs ~3.2 MB (48 rows of 64 KB activations)
    with pytest.raises(StoreError, match=r"not enough disk space for .*results.h5 \(needs"):
        extract(_cfg(images, *ACT), disk / "run")
    assert sorted(p.name for p in (disk / "run").iterdir()) == [".camsweep.lock",
                                                                ".results.h5.lock"]


def test_full_disk_mid_run_marks_nothing_unwritten_done_and_resume_completes(tmp_path, tmpfs):
    images = tmp_path / "images"
    write_images(images, 48)
    cfg = _cfg(images, *ACT)
    extract(cfg, tmp_path / "clean")
    clean = tmp_path / "clean" / "results.h5"
    disk = tmpfs(8000)
    run_dir = disk / "run"
    results = run_dir / "results.h5"
    with writer_lock(results):
        prepare(cfg, results)  # the file, blocks reserved
    with h5py.File(results, "r", locking=False) as f:
        ds = f["activations/layer1"]
        chunk_rows = ds.chunks[0]
        infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
    assert len(infos) >= 3 and chunk_rows % 4 == 0
    for info in infos[1:]:  # rows past the first chunk lose their reserved blocks
        _punch(results, info.byte_offset, info.size)
    filler = _fill(disk)
    with pytest.raises(StoreError, match="not enough disk space"):
        extract(cfg, run_dir)
    with load_run(results) as r:
        done = r.done
        assert 0 < done.sum() < len(done) and not (r.status == FAILED).any()
        assert done[:chunk_rows].all() and not done[chunk_rows:].any()
        with h5py.File(clean, "r") as c:
            np.testing.assert_array_equal(r.activations("layer1")[done],
                                          c["activations/layer1"][:][done])
    filler.unlink()  # space freed: the same command completes the run
    summary = extract(cfg, run_dir)
    assert summary.done == 48 and summary.skipped == chunk_rows
    with h5py.File(results, "r") as a, h5py.File(clean, "r") as b:
        for key in ("activations/layer1", "predictions/prob", "targets/score"):
            np.testing.assert_allclose(a[key][:], b[key][:], rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_array_equal(a["predictions/class"][:], b["predictions/class"][:])


def test_failures_write_no_hdf5_metadata_mid_run(tmp_path, bad_dir):
    """/images/error is preallocated like every dataset: a run with failures changes raw
    data only, so the file's size is the one it had when it was created."""
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={bad_dir}/*")
    results = tmp_path / "run" / "results.h5"
    with writer_lock(results):
        prepare(cfg, results)
    size = results.stat().st_size
    summary = extract(cfg, tmp_path / "run")
    assert summary.failed == 3 and results.stat().st_size == size
    assert list((tmp_path / "run").glob(".results.h5.tmp-*")) == []


# -- 4. one writer per run --------------------------------------------------------------------

@pytest.mark.slow
def test_two_runs_started_together_in_one_run_dir(tmp_path):
    images = tmp_path / "images"
    write_images(images, 24)
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(_cli_args(images, run_dir, f"model.target_layers=[{layer}]"),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for layer in ("layer3", "layer4")]
    outs = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 2], outs
    (loser,) = [err for code, err in outs if code == 2]
    assert ("another camsweep process" in loser or "different config" in loser), loser
    winner = ["layer3", "layer4"][[code for code, _ in outs].index(0)]
    with load_run(run_dir) as r:
        assert r.layers == [winner] and r.done.all()


def test_a_second_writer_fails_at_once(tmp_path, image_dir):
    results = tmp_path / "run" / "results.h5"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline.locks import run_dir_lock, writer_lock\n"
        "with writer_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)"),
        str(results)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunRefused, match=r"another camsweep process \(pid \d+"):
            extract(_cfg(image_dir), tmp_path / "run")
        # The refused run does not rewrite the run's status.
        status = tmp_path / "run" / "camsweep.json"
        status.write_text('{"status": "ok"}')
        with pytest.raises(SystemExit) as e:
            main(_cfg(image_dir, f"run_dir={tmp_path / 'run'}", "stage=extract"))
        assert e.value.code == 2 and status.read_text() == '{"status": "ok"}'
    finally:
        holder.kill()
        holder.wait()
    assert extract(_cfg(image_dir), tmp_path / "run").done == 6  # the lock died with it


@pytest.mark.slow
def test_default_run_dirs_started_in_the_same_second_differ(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pipeline.config import _run_dir\n"
            "print(_run_dir(None, 'outputs/day/12-00-00'), _run_dir(None, "
            "'outputs/day/12-00-00'))")
    outs = [subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.split()
            for _ in range(3)]
    # One folder per process (a process asks twice, gets the same), none shared.
    assert [o[0] == o[1] for o in outs] == [True] * 3
    assert sorted(o[0] for o in outs) == ["outputs/day/12-00-00", "outputs/day/12-00-00-2",
                                          "outputs/day/12-00-00-3"]


# -- 6. seed ----------------------------------------------------------------------------------

def test_seed_is_part_of_the_run_identity(tmp_path, image_dir):
    extract(_cfg(image_dir), tmp_path / "run")
    with pytest.raises(RunRefused, match="seed: 0 -> 1"):
        extract(_cfg(image_dir, "seed=1"), tmp_path / "run")
    # Keys that change no number may change on resume.
    extract(_cfg(image_dir, "batch_size=2", "micro_batch=1", "channels_last=false"),
            tmp_path / "run")


# -- 7. merged runs whose shards went missing ---------------------------------------------------

def test_merged_run_with_a_missing_or_replaced_shard_is_refused(tmp_path, image_dir):
    for shard in range(2):
        extract(_cfg(image_dir, f"data.shard={shard}", "data.num_shards=2"), tmp_path)
    merge_shards(tmp_path)
    shard1 = tmp_path / "results.shard-1-of-2.h5"
    saved = tmp_path / "saved.h5"
    shutil.copy(shard1, saved)
    shard1.unlink()
    with pytest.raises(StoreError, match="merge of shards, but results.shard-1-of-2.h5 is "
                                         "missing"):
        load_run(tmp_path)
    # A shard computed again is another file: the merge no longer describes it.
    extract(_cfg(image_dir, "data.shard=1", "data.num_shards=2"), tmp_path)
    with pytest.raises(StoreError, match="replaced since the merge"):
        load_run(tmp_path)
    merge_shards(tmp_path)
    with load_run(tmp_path) as r:
        assert r.done.all()
    # Its rows live in the shards: an unsharded run does not write through the merge.
    with pytest.raises(RunRefused, match="is a merge of shards; rerun the shards"):
        extract(_cfg(image_dir), tmp_path)


# -- 9. smaller ones ----------------------------------------------------------------------------

def test_damaged_files_are_one_line_errors(tmp_path, image_dir):
    extract(_cfg(image_dir), tmp_path / "run")
    results = tmp_path / "run" / "results.h5"
    good = tmp_path / "good.h5"
    shutil.copy(results, good)
    with h5py.File(results, "r+") as f:
        f["images/status"][2] = 7
    with pytest.raises(StoreError, match=r"damaged: /images/status holds 7 at row 2"):
        load_run(results)
    shutil.copy(good, results)
    with h5py.File(results, "r+") as f:
        del f["targets/score"]
    with pytest.raises(StoreError, match="damaged: missing targets/score"):
        load_run(results)
    with pytest.raises(StoreError, match="damaged"):
        extract(_cfg(image_dir), tmp_path / "run")
    shutil.copy(good, results)
    with h5py.File(results, "r+") as f:
        del f["gradcam/layer4"]
        f.create_dataset("gradcam/layer4", data=np.zeros((2, 2, 2), np.float32))
    with pytest.raises(StoreError, match="gradcam/layer4 has shape"):
        open_results(results)


def test_stale_temporary_files_are_cleaned(tmp_path, image_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / ".results.h5.tmp-999999"  # a creation that was killed
    stale.write_bytes(b"half a file")
    extract(_cfg(image_dir), run_dir)
    assert not stale.exists()


def test_symlink_loop_lists_each_image_once(tmp_path):
    images = tmp_path / "images"
    write_images(images / "a", 3)
    (images / "a" / "loop").symlink_to("..")
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={images}/**/*.jpg")
    summary = extract(cfg, tmp_path / "run")
    assert summary.n == 3 and summary.done == 3


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["stage=bogus"], "unknown stage 'bogus'"),
    (["data.limit=-1"], "data.limit must be >= 1"),
    (["num_workers=-3"], "num_workers must be >= 0"),
    (["data.image_size=0"], "data.image_size must be >= 8"),
    (["batch_size=abc"], "batch_size must be auto or an integer >= 1, got 'abc'"),
    (["+model.kwargs.foo=1"], "does not accept model.kwargs (foo)"),
    (["model.colour=1"], "unknown config key 'model.colour'"),
    (["resume_changed=ignore"], "unknown resume_changed 'ignore'"),
    (["-m", "method=choice(gradcam,saliencyy)"], "unknown method 'saliencyy'"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, image_dir, args, message):
    proc = subprocess.run(_cli_args(image_dir, tmp_path / "run", *args), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert message in lines[0]


def test_checkpoint_of_other_shapes_is_one_line(tmp_path, image_dir):
    import torch
    import torchvision

    ckpt = tmp_path / "ten.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), ckpt)
    with pytest.raises(Exception, match=r"does not fit the model: size mismatch for fc.weight"):
        extract(_cfg(image_dir, f"model.weights={ckpt}"), tmp_path / "run")


def test_names_with_newlines_cannot_forge_log_lines(tmp_path):
    images = tmp_path / "images"
    write_images(images, 2)
    (images / "evil\n0 of 0 images done.jpg").write_bytes(b"")
    summary = extract(_cfg(images), tmp_path / "run")
    lines = summary.lines()
    assert summary.failed == 1
    assert not any(line.startswith("0 of 0") for line in "\n".join(lines).splitlines())
    assert any("evil\\n0 of 0 images done.jpg" in line for line in lines)


@pytest.mark.slow
def test_sigint_stops_with_one_line_and_resume_completes(tmp_path):
    images = tmp_path / "images"
    write_images(images, 40)
    run_dir = tmp_path / "run"
    results = run_dir / "results.h5"
    proc = subprocess.Popen(_cli_args(images, run_dir, "batch_size=2"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _done(results) >= 2, proc, "2 rows done")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    if _done(results) < 40:  # interrupted (not already finished)
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err and "rerun the same command to resume" in err
    again = subprocess.run(_cli_args(images, run_dir, "batch_size=2"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and _done(results) == 40


def test_a_run_being_written_reads_as_running(tmp_path, image_dir):
    extract(_cfg(image_dir), tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r+") as f:
        f["images/status"][3:] = PENDING  # as if interrupted
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline.locks import run_dir_lock, writer_lock\n"
        "with writer_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)"),
        str(tmp_path / "run" / "results.h5")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with load_run(tmp_path / "run") as r:
            assert r.state == "running" and "state=running" in repr(r)
    finally:
        holder.kill()
        holder.wait()
    with load_run(tmp_path / "run") as r:
        assert r.state == "incomplete"


def test_each_shard_writes_its_own_status(tmp_path, image_dir):
    for shard in range(2):
        result = main(_cfg(image_dir, f"run_dir={tmp_path}", "stage=extract",
                           f"data.shard={shard}", "data.num_shards=2"))
        assert result["status"] == "ok"
    for shard in range(2):
        status = json.loads((tmp_path / f"camsweep.shard-{shard}-of-2.json").read_text())
        assert status["status"] == "ok" and status["n"] == 3
    assert json.loads((tmp_path / "camsweep.shard-1-of-2.json").read_text())["results"] == str(
        tmp_path / "results.h5")  # the last shard merged


def test_a_crafted_config_is_data_not_code(tmp_path, image_dir):
    """A colleague's file whose stored config carries a Python tag: every reader refuses it
    as damaged, nothing runs."""
    extract(_cfg(image_dir), tmp_path / "run")
    marker = tmp_path / "PWNED"
    with h5py.File(tmp_path / "run" / "results.h5", "r+") as f:
        f.attrs["config"] = f"model: !!python/object/apply:os.system ['touch {marker}']\n"
    with load_run(tmp_path / "run") as r, pytest.raises(StoreError, match="not plain YAML"):
        r.config  # noqa: B018
    proc = subprocess.run(_cmd("stage=evaluate", f"run_dir={tmp_path / 'run'}"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "stored config is not plain YAML" in proc.stderr
    assert not marker.exists()


def test_full_disk_while_rendering_is_one_line(tmp_path, tmpfs, image_dir):
    """Extraction fits, the pictures do not: one line, exit 2, no half-written PNG."""
    disk = tmpfs(150)  # the results file (checksums, content hashes) fits; 6 pictures do not
    proc = subprocess.run(_cmd("stage=all", f"run_dir={disk / 'run'}", *TINY, "data=glob",
                               f"data.pattern={image_dir}/*.jpg", "data.image_size=32"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: No space left on device" in proc.stderr
    assert "finished work is kept" in proc.stderr
    with load_run(disk / "run") as r:
        assert r.done.all()
    for png in (disk / "run" / "pictures").glob("*"):
        assert png.suffix == ".png" and png.stat().st_size > 100  # whole pictures only


@pytest.mark.slow
def test_names_with_newlines_cannot_forge_lines_of_the_cli_log(tmp_path):
    images = tmp_path / "images"
    write_images(images, 2)
    (images / "evil\n0 of 0 images done.jpg").write_bytes(b"")
    proc = subprocess.run(_cli_args(images, tmp_path / "run"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not any(line.startswith("0 of 0 images done") for line in lines)
    assert any("evil\\n0 of 0 images done.jpg" in line for line in lines)
    log = (tmp_path / "run" / "run.log").read_text().splitlines()
    assert not any(line.startswith("0 of 0 images done") for line in log)


# -- one writer per run directory, locks and Hydra's record on a full disk ------------------

def _hold_run_dir(run_dir: Path, what: str, shared: bool = False) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline.locks import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1], sys.argv[2], shared=sys.argv[3] == '1'):\n"
        "    print('locked', flush=True); time.sleep(600)"),
        str(run_dir), what, "1" if shared else "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_extract_while_another_stage_writes_the_run_dir_fails_at_once(tmp_path, image_dir):
    """extract with another config during evaluate: refused before anything is created
    (not at the merge at the end), with one line naming the holder."""
    run_dir = tmp_path / "run"
    holder = _hold_run_dir(run_dir, "evaluating")
    try:
        with pytest.raises(RunRefused, match=r"another camsweep process \(pid \d+ on .*, "
                                             r"evaluating\) is writing in"):
            extract(_cfg(image_dir, "model.target_layers=[layer3]"), run_dir)
        assert not (run_dir / "results.h5").exists()
        out = subprocess.run(_cli_args(image_dir, run_dir), cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
        assert "evaluating) is writing in" in out.stderr
        with pytest.raises(RunRefused, match="is writing in"):
            merge_shards(run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert extract(_cfg(image_dir), run_dir).done == 6  # the lock died with its holder


def test_shards_of_one_run_write_together(tmp_path, image_dir):
    """A shard holds the run directory shared: its sibling runs beside it, an unsharded run
    or an explicit merge does not."""
    run_dir = tmp_path / "run"
    holder = _hold_run_dir(run_dir, "extracting results.shard-0-of-2.h5", shared=True)
    try:
        one = extract(_cfg(image_dir, "data.shard=1", "data.num_shards=2"), run_dir)
        assert one.done == 3 and one.path.name == "results.shard-1-of-2.h5"
        with pytest.raises(RunRefused, match="is writing in"):
            extract(_cfg(image_dir), run_dir)
        with pytest.raises(RunRefused, match="is writing in"):
            merge_shards(run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert extract(_cfg(image_dir, "data.shard=0", "data.num_shards=2"), run_dir).done == 3
    merge_shards(run_dir)
    with load_run(run_dir) as r:
        assert r.done.all() and len(r.paths) == 6


def _blocked_on(path: Path, pid: int) -> bool:
    """Whether process ``pid`` waits for a POSIX lock on ``path`` (the kernel's own list)."""
    inode = path.stat().st_ino
    return any(f" {pid} " in line and f":{inode} " in line and "->" in line
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_lock_taken_but_not_yet_noted_is_read_only_once_noted(tmp_path):
    """Two reports at once, the first caught between taking the lock and writing who it
    is: the second does not read the empty note as an unknown holder and refuse; it reads
    the note once written, waits (a report waits for a report), then takes the lock."""
    from pipeline.locks import _LOCK, _NOTE, RUN_DIR_LOCK

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / RUN_DIR_LOCK
    # The first report, stopped by the test between the steps camsweep takes in a row.
    first = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "note, lock = int(sys.argv[2]), int(sys.argv[3])\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX, 1, note); fcntl.lockf(fd, fcntl.LOCK_EX, 1, lock)\n"
        "print('locked', flush=True); sys.stdin.readline()\n"
        "os.pwrite(fd, f'pid {os.getpid()} on here, writing the report'.encode(), 0)\n"
        "fcntl.lockf(fd, fcntl.LOCK_UN, 1, note)\n"
        "sys.stdin.readline()\n"), str(lock), str(_NOTE), str(_LOCK)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    second = None
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.Popen([sys.executable, "-c", (
            "import logging, sys; from pipeline.locks import run_dir_lock\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "with run_dir_lock(sys.argv[1], 'writing the report',"
            " wait_for='writing the report'):\n    print('mine', flush=True)"),
            str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not _blocked_on(lock, second.pid):  # the kernel says it waits for the note
            assert second.poll() is None, second.communicate()
        first.stdin.write("\n")  # the note is written
        first.stdin.flush()
        heard = second.stderr.readline()
        assert f"another process (pid {first.pid} on here, writing the report) is writing " \
               f"the report in {run_dir}; waiting for it" in heard
        assert second.poll() is None  # still waiting for the first report to finish
        first.stdin.write("\n")  # the first report is done
        first.stdin.flush()
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0 and out == "mine\n", err
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_locks_on_a_full_disk(tmp_path, tmpfs):
    """Taking a lock needs no space: with 0 bytes free both locks hold (the holder's note
    is left out) and a second writer is still refused."""
    disk = tmpfs(64)
    _fill(disk)
    with run_dir_lock(disk / "run", "evaluating"), writer_lock(disk / "run" / "results.h5"):
        probe = subprocess.run([sys.executable, "-c", (
            "import sys; from pipeline.locks import run_dir_lock\n"
            "with run_dir_lock(sys.argv[1], 'x'): pass"), str(disk / "run")], cwd=ROOT,
            capture_output=True, text=True, timeout=120)
        assert probe.returncode == 1
        assert "another camsweep process (?) is writing in" in probe.stderr


def test_resume_on_a_full_disk_is_no_traceback(tmp_path, tmpfs):
    """Hydra's record (.hydra/), the log file and the status file cannot be written: one
    warning line each, the old record kept, and the resume completes in reserved space."""
    images = tmp_path / "images"
    write_images(images, 10)
    disk = tmpfs(4000)
    run_dir = disk / "run"
    results = run_dir / "results.h5"
    proc = subprocess.Popen(_cli_args(images, run_dir, "batch_size=2"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _done(results) >= 2, proc, "2 rows done")
    proc.kill()
    proc.wait()
    record = (run_dir / ".hydra" / "config.yaml").read_text()
    _fill(disk)
    again = subprocess.run(_cli_args(images, run_dir, "batch_size=2"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr and "Logging error" not in again.stderr
    assert "warning: cannot save" in again.stderr and "No space left" in again.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == record
    assert _done(results) == 10
