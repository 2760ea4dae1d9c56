"""Received files are validated before use (issue 18, item 4): nothing in a results file
may read outside it but a camsweep merge's virtual datasets over its own shards, and every
map has the dtype, rank and shape its kind has. Each forgery is one StoreError line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from store_files import make_results, make_shards

from pipeline.errors import StoreError
from pipeline.merge import merge_shards
from pipeline.results import load_run
from pipeline.store import open_results, read_map

ROOT = Path(__file__).resolve().parent.parent
KEY = "gradcam/layer4"


def _replace(path: Path, key: str, make) -> None:
    """Put ``make(f, key)``'s object where dataset ``key`` was."""
    with h5py.File(path, "r+") as f:
        del f[key]
        make(f, key)


def _virtual(source: str, name: str = KEY, shape: tuple[int, ...] = (4, 3, 4)):
    def make(f: h5py.File, key: str) -> None:
        layout = h5py.VirtualLayout(shape=shape, dtype=np.float32)
        layout[:] = h5py.VirtualSource(source, name, shape=shape)
        f.create_virtual_dataset(key, layout)
    return make


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    make_results(tmp_path / "run" / "results.h5")
    return tmp_path / "run" / "results.h5"


def test_a_clean_file_opens(plain):
    with open_results(plain) as f:
        assert read_map(f, KEY).shape == (4, 3, 4)


@pytest.mark.parametrize("source", ["missing.h5", "/etc/passwd"])
def test_a_virtual_dataset_in_a_file_that_is_not_a_merge_is_refused(plain, source):
    """A missing source would read as zeros, /etc/passwd as a raw OSError."""
    _replace(plain, KEY, _virtual(source))
    with pytest.raises(StoreError, match=r"/gradcam/layer4 is a virtual dataset, and the file "
                                         r"is not a merge written by camsweep"):
        load_run(plain.parent)


def test_external_links_and_external_storage_are_refused(plain, tmp_path):
    other = tmp_path / "other.h5"
    make_results(other, seed=1)
    _replace(plain, KEY, lambda f, k: f.__setitem__(k, h5py.ExternalLink(str(other), KEY)))
    with pytest.raises(StoreError, match=r"/gradcam/layer4 is an external link"):
        open_results(plain)
    _replace(plain, KEY, lambda f, k: f.__setitem__(k, h5py.SoftLink("/targets/score")))
    with pytest.raises(StoreError, match=r"/gradcam/layer4 is a soft link"):
        open_results(plain)
    _replace(plain, KEY, lambda f, k: f.create_dataset(
        k, shape=(4, 3, 4), dtype=np.float32, external=[("/etc/passwd", 0, 192)]))
    with pytest.raises(StoreError, match=r"/gradcam/layer4 keeps its data in another file "
                                         r"\(/etc/passwd\)"):
        open_results(plain)


def test_a_merge_reads_only_its_own_shards(tmp_path):
    run = tmp_path / "sharded"
    make_shards(run)
    merged = merge_shards(run)
    with open_results(merged) as f:  # the merge itself is fine
        assert read_map(f, KEY).shape == (4, 3, 4)
    # A virtual source outside merged_from (or another dataset of a shard) is refused.
    for source, name in [("/etc/passwd", KEY), ("results.shard-0-of-2.h5", "targets/score"),
                         ("../elsewhere/results.shard-0-of-2.h5", KEY)]:
        _replace(merged, KEY, _virtual(source, name, (2, 3, 4)) if name == KEY else
                 _virtual(source, name, (4, 3, 4)))
        with pytest.raises(StoreError, match=rf"/gradcam/layer4 reads {source}:"):
            open_results(merged)
        merged = merge_shards(run)
    with h5py.File(merged, "r+") as f:  # a shard name that leaves the folder
        f.attrs["merged_from"] = '[{"file": "/etc/passwd", "run_id": "x"}]'
    with pytest.raises(StoreError, match=r"merged_from names '/etc/passwd', not a file beside"):
        open_results(merged)


@pytest.mark.parametrize(("forged", "message"), [
    (lambda f, k: f.create_dataset(k, data=np.array(["a", "b", "c", "d"], dtype=object),
                                   dtype=h5py.string_dtype()),
     r"/gradcam/layer4 has dtype object \(layer_map maps are float16 or float32\)"),
    (lambda f, k: f.create_dataset(k, data=np.zeros((4, 12), np.float32)),
     r"/gradcam/layer4 has 2 axes \(image axis included\), expected 3 for a layer_map"),
    (lambda f, k: f.create_dataset(k, data=np.zeros((4, 2, 3, 4), np.float32)),
     r"/gradcam/layer4 has 4 axes \(image axis included\), expected 3 for a layer_map"),
])
def test_a_map_of_the_wrong_type_is_one_line(plain, forged, message):
    def make(f: h5py.File, key: str) -> None:
        forged(f, key).attrs["kind"] = "layer_map"
    _replace(plain, KEY, make)
    with pytest.raises(StoreError, match=message):
        open_results(plain)


def test_a_forged_map_is_one_line_from_the_command_line(plain):
    """render of a map forged as a 1-D string dataset: exit 2, one line, no traceback."""
    _replace(plain, KEY, lambda f, k: f.create_dataset(
        k, data=np.array(["a"] * 4, dtype=object), dtype=h5py.string_dtype()))
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "stage=render",
                           f"run_dir={plain.parent}"], cwd=plain.parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/gradcam/layer4 has dtype object" in errors[0]


def test_a_ragged_shape_changed_with_the_same_size_is_caught(tmp_path):
    """3x4 made 4x3: the same number of values, so only the index digest can tell."""
    path = tmp_path / "native.h5"
    stored = make_results(path, ragged=True)[KEY]
    with open_results(path) as f:
        np.testing.assert_array_equal(read_map(f, KEY, 0), stored[0])
    with h5py.File(path, "r+") as f:
        f[f"ragged/{KEY}/shape"][0] = [4, 3]
    with pytest.raises(StoreError, match=r"the index of ragged map gradcam/layer4 "
                                         r"\(/ragged/gradcam/layer4\) was changed since"):
        open_results(path)
    with h5py.File(path, "r+") as f:  # a file without the digest: the old checks still hold
        del f[f"ragged/{KEY}"].attrs["index_xxh3"]
    with open_results(path) as f:
        assert read_map(f, KEY, 0).shape == (4, 3)


def test_a_ragged_input_map_must_have_its_image_input_size(tmp_path):
    path = tmp_path / "saliency.h5"
    make_results(path, ragged=True, input_map=True)
    with h5py.File(path, "r+") as f:
        f["ragged/saliency/input/shape"][0] = [32, 24]  # was 24x32
        del f["ragged/saliency/input"].attrs["index_xxh3"]
    with pytest.raises(StoreError, match=r"/saliency/input of row 0 has shape \(32, 24\), not "
                                         r"that of its image \(input \(24, 32\)\)"):
        open_results(path)


def test_a_merged_ragged_run_carries_a_valid_index_digest(tmp_path):
    run = tmp_path / "native"
    make_shards(run, ragged=True)
    merged = merge_shards(run)
    with h5py.File(merged) as f:
        assert f[f"ragged/{KEY}"].attrs["index_xxh3"]
    with open_results(merged) as f:
        assert [m.shape for m in read_map(f, KEY)] == [(3, 4), (4, 4), (2, 5), (3, 3)]
