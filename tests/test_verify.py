"""Row checksums and ``stage=verify`` (issue 18, item 2): each done row carries an xxh3 of
what was written; verify re-reads everything and names each damaged row (file, row,
dataset); readers may check the rows they read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY, compose_cfg
from store_files import make_results, make_shards

from pipeline.errors import StoreError
from pipeline.extract import extract
from pipeline.merge import merge_shards
from pipeline.store import (
    DONE,
    PENDING,
    open_results,
    read_column,
    read_map,
    read_map_rows,
    read_table,
)
from pipeline.store.audit import verify_results
from pipeline.store.checksums import sums_of
from pipeline.verify import verify_stage

ROOT = Path(__file__).resolve().parent.parent
KEY = "gradcam/layer4"


def flip_bit(path: Path, key: str, row: int) -> None:
    """Flip one bit in the middle of ``row``'s stored values of ``key``, on disk (byte
    offset from the dataset's chunk index: our datasets are chunked, uncompressed)."""
    with h5py.File(path, "r") as f:
        ds = f[key]
        if ds.attrs.get("encoding") == "ragged":  # the row's span of flat values
            index = f[f"ragged/{key}"]
            first = int(index["offset"][row])
            count = int(np.prod(index["shape"][row]))
            element = first + count // 2
            item = (element,)
        else:
            element = row
            item = (row,) + (0,) * (ds.ndim - 1)
        chunk = (item[0] // ds.chunks[0]) * ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((chunk,) + (0,) * (ds.ndim - 1))
        row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
        offset = info.byte_offset + (element - chunk) * row_bytes
        if ds.attrs.get("encoding") != "ragged":
            offset += row_bytes // 2
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x10]))


def run_verify(target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), "stage=verify",
                           f"run_dir={target}"], cwd=target if target.is_dir() else target.parent,
                          capture_output=True, text=True, timeout=300)


def test_each_done_row_has_a_checksum_of_what_was_written(tmp_path):
    path = tmp_path / "results.h5"
    stored = make_results(path)[KEY]
    with h5py.File(path, "r+") as f:
        assert (sums_of(f, KEY, slice(None)) != 0).all()
        f["images/status"][3] = PENDING  # as if not written: a reader skips its checksum
        f["gradcam/layer4"][3] = 0
        f["checksums/rows"][2] = 0  # a done row stored by other means: none to check
        f["gradcam/layer4"][2] = 1
    with open_results(path) as f:
        for row in (0, 1):
            np.testing.assert_array_equal(read_map(f, KEY, row, verify=True), stored[row])
        assert read_map(f, KEY, slice(2, 4), verify=True).tolist() == [[[1] * 4] * 3, [[0] * 4] * 3]
    check = verify_results(path)
    assert check.clean and check.rows == 3 and check.unchecked == 8  # row 2, every dataset
    assert "carry no checksum" in check.note


def test_a_flipped_bit_is_named_by_verify_and_by_readers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "results.h5"
    make_results(path)
    assert verify_stage(None, run)["files"] == 1
    flip_bit(path, KEY, 2)
    with open_results(path) as f:
        read_map(f, KEY, 1, verify=True)  # other rows read fine
        assert read_map(f, KEY, 2).shape == (3, 4)  # unchecked reads still read
        with pytest.raises(StoreError, match=r"row 2 of /gradcam/layer4: checksum mismatch"):
            read_map_rows(f, KEY, path, slice(None))
    with pytest.raises(StoreError, match=r"1 damaged rows .* \(first: .*results.h5 row 2 "
                                         r"/gradcam/layer4\)"):
        verify_stage(None, run)
    proc = run_verify(run)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    out = proc.stdout + proc.stderr
    assert f"damaged: {path} row 2 /gradcam/layer4: checksum mismatch" in out
    assert out.count("damaged: ") == 1


def test_a_flipped_bit_in_a_ragged_map_names_its_row(tmp_path):
    path = tmp_path / "results.h5"
    make_results(path, ragged=True)
    flip_bit(path, KEY, 1)
    with pytest.raises(StoreError, match=r"row 1 /gradcam/layer4\)"):
        verify_stage(None, path)
    with open_results(path) as f:
        assert [m.shape for m in read_map(f, KEY, [0, 2, 3], verify=True)] == [
            (3, 4), (2, 5), (3, 3)]
        with pytest.raises(StoreError, match=r"row 1 of /gradcam/layer4"):
            read_map(f, KEY, slice(0, 2), verify=True)


def test_a_sweep_folder_verifies_every_job_and_merges_carry_the_shards_checksums(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    make_results(sweep / "0" / "results.h5")
    make_shards(sweep / "1")
    merge_shards(sweep / "1")  # virtual: rows checked in the shards
    make_shards(sweep / "2", ragged=True)
    merge_shards(sweep / "2", copy=True)  # a copy carries the checksums
    result = verify_stage(None, sweep)
    assert result["files"] == 7 and result["unchecked"] == []
    with open_results(sweep / "1" / "results.h5") as f:  # virtual: the shards' checksums
        assert (sums_of(f, KEY, slice(None)) != 0).all()
    flip_bit(sweep / "1" / "results.shard-1-of-2.h5", KEY, 0)
    flip_bit(sweep / "2" / "results.h5", KEY, 3)
    with (open_results(sweep / "1" / "results.h5") as f,  # a reader of the merge sees it
          pytest.raises(StoreError, match=r"row 2 of /gradcam/layer4: checksum mismatch")):
        read_map(f, KEY, 2, verify=True)
    proc = run_verify(sweep)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    out = proc.stdout + proc.stderr
    assert f"damaged: {sweep}/1/results.shard-1-of-2.h5 row 0 /gradcam/layer4" in out
    assert f"damaged: {sweep}/2/results.h5 row 3 /gradcam/layer4" in out
    assert out.count("damaged: ") == 2 and "2 damaged rows and 0 refused files among 7" in out


def test_a_file_without_checksums_verifies_with_a_note(tmp_path):
    path = tmp_path / "results.h5"
    make_results(path)
    with h5py.File(path, "r+") as f:
        del f["checksums"]
    assert verify_stage(None, path)["unchecked"] == [str(path)]
    with open_results(path) as f:  # readers asked to verify read on
        assert read_map(f, KEY, slice(None), verify=True).shape == (4, 3, 4)


def test_a_refused_file_fails_verify_in_one_line(tmp_path):
    (tmp_path / "results.h5").write_bytes(b"not hdf5")
    proc = run_verify(tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "0 damaged rows and 1 refused files among 1" in proc.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="nothing to verify under"):
        verify_stage(None, tmp_path / "empty")


def test_an_extracted_run_verifies_clean_without_torch(tmp_path, image_dir):
    run = tmp_path / "run"
    extract(compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg"), run)
    with open_results(run / "results.h5") as f:
        assert (f["images/status"][:] == DONE).all()
    code = ("import sys; from pipeline.verify import verify_stage; "
            f"r = verify_stage(None, {str(run)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r['files'], r['bytes'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    files, nbytes = proc.stdout.split()
    assert files == "1" and int(nbytes) > 0
    assert run_verify(run).returncode == 0


def test_per_image_tables_read_typed_and_checked(tmp_path):
    path = tmp_path / "results.h5"
    make_results(path)
    with open_results(path) as f:
        images = read_table(f, "images")
        assert list(images["path"]) == ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]
        assert list(images["error"]) == [""] * 4 and "image" not in images  # no scales
        assert images["size"].tolist() == [[24, 32]] * 4 and (images["status"] == DONE).all()
        assert read_table(f, "targets", slice(1, 3))["class"].tolist() == [1, 2]
        assert read_column(f, "images/path", 2) == "img2.jpg"  # one row: one str
        assert read_column(f, "images/size", 3).tolist() == [24, 32]
        with pytest.raises(StoreError, match="'gradcam' is not a per-image table"):
            read_table(f, "gradcam")
        with pytest.raises(StoreError, match="damaged: /images/nothing is missing"):
            read_column(f, "images/nothing")
    flip_bit(path, "images/size", 1)
    with open_results(path) as f:
        with pytest.raises(StoreError, match="row 1 of /images/size"):
            read_table(f, "images")
        with pytest.raises(StoreError, match="row 1 of /images/size"):
            read_column(f, "images/size", 1)
        assert read_column(f, "images/size", 1, verify=False).shape == (2,)
