"""The results file: refusal of foreign/newer files, resume, no silent overwrite."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import TINY, compose_cfg

from pipeline.errors import StoreError
from pipeline.extract import extract
from pipeline.merge import merge_shards
from pipeline.results import load_run
from pipeline.store import DONE, PENDING, chunk_rows, open_results


@pytest.fixture
def run_cfg(image_dir):
    return compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg")


def test_resume_recomputes_only_pending_rows(tmp_path, run_cfg):
    run = tmp_path / "run"
    extract(run_cfg, run)
    with load_run(run) as r:
        full = r.cams("layer4").copy()
    with h5py.File(run / "results.h5", "r+") as f:  # as if killed after row 2
        f["images/status"][3:] = PENDING
        f["gradcam/layer4"][3:] = -1.0
    summary = extract(run_cfg, run)
    assert summary.skipped == 3 and summary.done == 6
    with load_run(run) as r:
        np.testing.assert_array_equal(r.cams("layer4"), full)
        assert (r.status == DONE).all()


def test_rerun_of_a_finished_run_does_nothing(tmp_path, run_cfg):
    extract(run_cfg, tmp_path / "run")
    summary = extract(run_cfg, tmp_path / "run")
    assert summary.skipped == 6 and summary.done == 6


def test_other_config_in_same_run_dir_is_refused(tmp_path, run_cfg, image_dir):
    extract(run_cfg, tmp_path / "run")
    other = compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg",
                        "model.target_layers=[layer3]")
    with pytest.raises(StoreError, match=r"different config: model.target_layers.*overwrite=true"):
        extract(other, tmp_path / "run")
    with load_run(tmp_path / "run") as r:  # untouched
        assert r.layers == ["layer4"]
    extract(compose_cfg(*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg",
                        "model.target_layers=[layer3]", "overwrite=true"), tmp_path / "run")
    with load_run(tmp_path / "run") as r:
        assert r.layers == ["layer3"]


def test_resume_false_refuses_existing_results(tmp_path, run_cfg):
    extract(run_cfg, tmp_path / "run")
    run_cfg.resume = False
    with pytest.raises(StoreError, match="exists and resume=false"):
        extract(run_cfg, tmp_path / "run")


def test_batch_size_may_change_on_resume(tmp_path, run_cfg):
    extract(run_cfg, tmp_path / "run")
    run_cfg.batch_size = 2
    assert extract(run_cfg, tmp_path / "run").skipped == 6


def test_foreign_and_newer_files_are_refused(tmp_path, run_cfg):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a camsweep results file"):
        open_results(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="cannot open"):
        open_results(tmp_path / "junk.h5")
    extract(run_cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r+") as f:
        f.attrs["format_version"] = 3  # 2 is ragged maps (data.resize=null)
    with pytest.raises(StoreError, match="format_version 3, newer than this camsweep reads"):
        load_run(tmp_path / "run")
    with pytest.raises(StoreError, match="no results file"):
        load_run(tmp_path / "nowhere")


def test_chunks_are_about_a_megabyte():
    assert chunk_rows((7, 7), 4, 50_000) == (1 << 20) // 196
    assert chunk_rows((2048, 7, 7), 2, 10) == 5
    assert chunk_rows((4096, 64, 64), 4, 10) == 1  # one row is larger than a chunk
    assert chunk_rows((), 1, 3) == 3


def test_run_table(tmp_path, run_cfg):
    extract(run_cfg, tmp_path / "run")
    with load_run(tmp_path / "run") as r:
        t = r.table()
        assert list(t["status"].astype(str)) == ["done"] * 6
        assert len(t) == 6 and (t["pred"] == r.predictions[0][:, 0]).all()
        assert "done=6" in repr(r)
        assert len(r.categories) == 1000 and r.categories[281] == "tabby"
        assert (t["pred_name"] == [r.categories[c] for c in t["pred"]]).all()


def test_xarray_reads_named_dims_and_paths(tmp_path, image_dir):
    """HDF5 dimension scales (netCDF-4 conventions): h5netcdf/xarray see labelled arrays,
    in a plain run, a target=topk run (a class axis) and a merged sharded run."""
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    base = (*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg")
    extract(compose_cfg(*base, "model.target_layers=[layer3,layer4]", "target=topk",
                        "target.k=2"), tmp_path / "topk")
    with load_run(tmp_path / "topk") as run:
        cams3, paths = run.cams("layer3"), list(run.paths)
        lazy = run.to_xarray()
        assert lazy["layer3"].chunks is not None  # dask-backed: nothing read yet
        np.testing.assert_array_equal(lazy["layer3"].values, cams3)
    ds = xr.open_dataset(tmp_path / "topk" / "results.h5", engine="h5netcdf", group="gradcam")
    assert ds["layer3"].dims == ("image", "class", "h_layer3", "w_layer3")
    assert ds["layer4"].dims == ("image", "class", "h_layer4", "w_layer4")
    assert list(ds["image"].values) == paths
    np.testing.assert_array_equal(ds["layer3"].sel(image=paths[2]).values, cams3[2])
    w = xr.open_dataset(tmp_path / "topk" / "results.h5", engine="h5netcdf",
                        group="gradcam_weights")
    assert w["layer4"].dims == ("image", "class", "channel_layer4")
    with h5py.File(tmp_path / "topk" / "results.h5") as f:
        assert json.loads(f["gradcam/layer4"].attrs["dims"]) == [
            "image", "class", "h_layer4", "w_layer4"]
    for shard in range(2):
        extract(compose_cfg(*base, f"data.shard={shard}", "data.num_shards=2"),
                tmp_path / "sharded")
    merge_shards(tmp_path / "sharded")
    with load_run(tmp_path / "sharded") as run:
        merged = run.to_xarray("gradcam", "layer4")
        assert merged.dims == ("image", "h", "w") and list(merged["image"].values) == paths
        np.testing.assert_array_equal(merged.values, run.cams("layer4"))
    images = xr.open_dataset(tmp_path / "sharded" / "results.h5", engine="h5netcdf",
                             group="images")
    assert images["size"].dims == ("image", "hw") and (images["status"].values == DONE).all()
