"""A full disk or a file-size limit while creating or merging results files (issue 18,
item 3): one line and exit code 2, never a traceback or a signal, nothing done lost. Real
limits: a small tmpfs (root) and RLIMIT_FSIZE (``ulimit -f``) in a subprocess."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, write_images
from store_files import make_shards

from pipeline.merge import merge_shards
from pipeline.verify import verify_stage

ROOT = Path(__file__).resolve().parent.parent




def fill(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s file system up to ``leave`` bytes free."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


def file_size_limit(nbytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))


def run(args: list[str], cwd: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env,
                          preexec_fn=file_size_limit(limit) if limit else None)


def one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed in one line, exit code 2: no traceback, no signal."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_full_disk_or_size_limit_at_creation_is_one_line(tmp_path, tmpfs):
    images = tmp_path / "images"
    write_images(images, 48)  # their file needs more than the few kB left
    disk = tmpfs(64)
    fill(disk, 24 << 10)  # room for Hydra's .hydra/ files (its own concern), ~8 KB after
    args = [str(ROOT / "run.py"), *TINY, "data=glob", f"data.pattern={images}/*.jpg",
            "stage=extract"]
    one_line(run([*args, f"run_dir={disk}/run"], tmp_path),
             "not enough disk space for", "results.h5 (needs", "free on")
    assert not (disk / "run" / "results.h5").exists()
    assert not list((disk / "run").glob(".results.h5.tmp-*"))
    one_line(run([*args, f"run_dir={tmp_path}/limited"], tmp_path, limit=100 << 10),
             "file-size limit of 102 kB (ulimit -f)")
    assert not (tmp_path / "limited" / "results.h5").exists()


CREATE = ("import sys; import pipeline.store.create as c, pipeline.store.mergefile as m; "
          "from pipeline.errors import StoreError; from store_files import make_results; "
          "from pipeline.merge import merge_shards; "
          "c.estimated_size = m.merged_size = lambda *a: 0  # as if filled meanwhile\n"
          "try:\n    {call}\nexcept StoreError as e:\n"
          "    print('error:', e, file=sys.stderr); sys.exit(2)")


@pytest.mark.parametrize("limit", ["disk", "ulimit"])
def test_a_limit_hit_while_hdf5_writes_is_one_line_not_a_crash(tmp_path, tmpfs, limit):
    """The space check passed (another program filled the disk afterwards): HDF5 fails in
    its metadata writes, which would crash the process; the write runs isolated."""
    if limit == "disk":
        folder = tmpfs(64)
        fill(folder, 4 << 10)
        proc = run(["-c", CREATE.format(call=f"make_results(__import__('pathlib').Path("
                                              f"{str(folder / 'r.h5')!r}), n=50)")], tmp_path)
    else:
        folder = tmp_path
        proc = run(["-c", CREATE.format(call=f"make_results(__import__('pathlib').Path("
                                              f"{str(folder / 'r.h5')!r}), n=400)")],
                   tmp_path, limit=30 << 10)
    line = one_line(proc, "r.h5")
    assert "free" in line or "file-size limit" in line
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(("r.h5", ".r.h5"))
                  ) == []


def test_merge_copy_on_a_full_disk_is_one_line_and_keeps_the_shards(tmp_path, tmpfs):
    disk = tmpfs(1024)
    run_dir = disk / "run"
    make_shards(run_dir)
    filler = fill(disk, 40 << 10)
    merge = [str(ROOT / "run.py"), "stage=merge", "merge_copy=true", f"run_dir={run_dir}"]
    one_line(run(merge, tmp_path), "not enough disk space for", "results.h5 (needs")
    # The same with the check passed: the isolated HDF5 write fails, the process does not.
    proc = run(["-c", CREATE.format(call=f"merge_shards({str(run_dir)!r}, copy=True)")],
               tmp_path)
    one_line(proc, "results.h5")
    assert not (run_dir / "results.h5").exists()  # no merge, no temporary left
    assert not list(run_dir.glob(".results.h5.tmp-*"))
    assert verify_stage(None, run_dir)["files"] == 2  # shards whole, every row verified
    filler.unlink()  # space freed: the same merge completes
    merge_shards(run_dir, copy=True)
    assert verify_stage(None, run_dir)["files"] == 3


def test_merge_copy_over_the_file_size_limit_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    make_shards(run_dir)
    proc = run(["-c", "import sys; from pipeline.merge import merge_shards\n"
                "from pipeline.errors import StoreError\n"
                f"try:\n    merge_shards({str(run_dir)!r}, copy=True)\n"
                "except StoreError as e:\n    print('error:', e, file=sys.stderr); sys.exit(2)"],
               tmp_path, limit=64 << 10)
    one_line(proc, "results.h5 needs", "file-size limit of 66 kB (ulimit -f)")
    assert not (run_dir / "results.h5").exists()
    merge_shards(run_dir, copy=True)  # without the limit
    assert verify_stage(None, run_dir)["files"] == 3
