"""Native resolution (``data.resize=null``): each image at its own size, batches of equal
size, maps stored ragged; resume, merge, render, evaluate and load_run on such runs.

Seven small images of three sizes (JPEG and PNG, sizes repeating) run through the real
pipeline; the stored maps are checked against one-image batches and against the method
class called directly on each image alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY, compose_cfg, photo
from omegaconf import OmegaConf
from PIL import Image

from pipeline.config import validate
from pipeline.data import ImageDataset, Record, SizeBatches, native_size
from pipeline.errors import ConfigError, StoreError
from pipeline.evaluate import evaluate
from pipeline.extract import extract, fingerprint
from pipeline.images import open_image
from pipeline.merge import merge_shards
from pipeline.methods import build_method, target_fn
from pipeline.models import build_model, resolve_layers
from pipeline.render import render_run
from pipeline.report import report
from pipeline.results import load_run
from pipeline.runtime import Normalize
from pipeline.store import DONE, FAILED, PENDING, ResultsWriter, open_results, read_map

pytestmark = pytest.mark.usefixtures("one_thread")

# (height, width) of img0..img6: three sizes, each repeating, in mixed order.
SIZES = [(40, 56), (64, 48), (40, 56), (33, 71), (64, 48), (40, 56), (33, 71)]
# Their layer4 maps in resnet18 (five stride-2 steps, rounding up).
LAYER4 = [(2, 2), (2, 2), (2, 2), (2, 3), (2, 2), (2, 2), (2, 3)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("native") / "images"
    folder.mkdir()
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(photo(i, h, w)).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return folder


def _cfg(images: Path, *extra: str):
    return compose_cfg(*TINY, "data=glob", f"data.pattern={images}/img*", "data.resize=null",
                       "batch_size=3", "channels_last=false", *extra)


@pytest.fixture(scope="module")
def batched(images, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("batched")
    extract(_cfg(images), run_dir)
    return run_dir / "results.h5"


def _direct(cfg, pixels: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The method class itself on each image alone (uint8 HWC pixels as decoded)."""
    torch.manual_seed(cfg.seed)
    model, info = build_model(cfg.model)
    layers = resolve_layers(model, cfg.model.target_layers)
    normalize = Normalize(info.mean, info.std)
    out = []
    with build_method(cfg.method, model, layers, topk=cfg.topk) as method:
        for p in pixels:
            x = normalize(torch.from_numpy(np.array(p)).permute(2, 0, 1)[None])
            out.append({k: v[0].detach().numpy() for k, v in method(x, target_fn("pred")).items()})
    return out


def test_batches_group_equal_sizes_in_row_order(images):
    assert SizeBatches(np.array(SIZES), 3).batches == [[0, 2, 5], [1, 4], [3, 6]]
    assert SizeBatches(np.array(SIZES), 2).batches == [[0, 2], [5], [1, 4], [3, 6]]
    # Over pending rows only (a resumed run): positions in the dataset, grouped by size.
    records = [Record(str(p)) for p in sorted(images.iterdir())]
    data = ImageDataset(records, np.array([1, 2, 3, 5, 6]), 64, None,
                        input_sizes=np.array(SIZES))
    assert data.batches(2).batches == [[0], [1, 3], [2, 4]]
    item = data[1]  # img2: its own size, the whole image seen
    assert tuple(item["pixels"].shape) == (3, 40, 56) and item["error"] == ""
    assert item["box"].tolist() == [0.0, 0.0, 40.0, 56.0]


def test_batched_maps_equal_one_by_one_and_the_method_alone(images, batched, tmp_path):
    cfg = _cfg(images)
    extract(_cfg(images, "batch_size=1"), tmp_path / "single")
    paths = sorted(images.iterdir())
    direct = _direct(cfg, [np.array(Image.open(p).convert("RGB")) for p in paths])
    with load_run(batched) as a, load_run(tmp_path / "single") as b:
        assert a.ragged and (a.status == DONE).all()
        assert a.file.attrs["format_version"] == 2
        assert a.input_sizes.tolist() == [list(s) for s in SIZES]
        assert a.sizes.tolist() == [list(s) for s in SIZES]
        np.testing.assert_array_equal(a.file["images/box"][:],
                                      [[0, 0, h, w] for h, w in SIZES])
        cams_a, cams_b = a.cams("layer4"), b.cams("layer4")
        assert [c.shape for c in cams_a] == LAYER4
        weights_a, weights_b = a.weights("layer4"), b.weights("layer4")
        assert weights_a.shape == (7, 512)  # per-image vectors stay fixed-size
        for i in range(7):
            np.testing.assert_allclose(cams_a[i], cams_b[i], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(cams_a[i], direct[i]["gradcam/layer4"], rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_allclose(weights_a[i], direct[i]["gradcam_weights/layer4"],
                                       rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(weights_a[i], weights_b[i], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a.targets[1], [d["targets/score"] for d in direct],
                                   rtol=1e-5)
        assert cams_a[3].max() > 0  # real maps, not zeros


def test_saliency_maps_are_input_sized(images, tmp_path):
    cfg = _cfg(images, "method=saliency")
    extract(cfg, tmp_path / "sal")
    paths = sorted(images.iterdir())
    direct = _direct(cfg, [np.array(Image.open(p).convert("RGB")) for p in paths])
    with load_run(tmp_path / "sal") as run:
        maps = run.saliency()
        assert [m.shape for m in maps] == SIZES
        for i in range(7):
            np.testing.assert_allclose(maps[i], direct[i]["saliency/input"], rtol=1e-5,
                                       atol=1e-8)


def test_max_side_caps_the_longest_side(images, tmp_path):
    # 64x48 -> 50 x 37.5: halves round to even, 38.
    assert native_size((64, 48), 50) == (50, 38)
    assert native_size((40, 56), 50) == (36, 50)
    assert native_size((33, 71), 50) == (23, 50)
    assert native_size((33, 71), 71) == (33, 71)  # not longer than the cap: untouched
    cfg = _cfg(images, "data.max_side=50")
    extract(cfg, tmp_path / "capped")
    paths = sorted(images.iterdir())
    pixels = [np.asarray(open_image(str(p), max_side=50)[0]) for p in paths]
    capped = [native_size(s, 50) for s in SIZES]
    assert [p.shape[:2] for p in pixels] == capped
    direct = _direct(cfg, pixels)
    with load_run(tmp_path / "capped") as run:
        assert run.input_sizes.tolist() == [list(s) for s in capped]
        assert run.sizes.tolist() == [list(s) for s in SIZES]  # the originals
        for i, cam in enumerate(run.cams()):
            np.testing.assert_allclose(cam, direct[i]["gradcam/layer4"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="data.max_side=50 applies to data.resize=null"):
        validate(compose_cfg(*TINY, "data.max_side=50"))
    with pytest.raises(ConfigError,
                       match="unknown data.resize 'none' valid: center_crop, null, square"):
        validate(compose_cfg(*TINY, "data.resize=none"))
    with pytest.raises(ConfigError, match="data.max_side must be >= 8"):
        validate(_cfg(images, "data.max_side=4"))
    with pytest.raises(ConfigError, match="data.decode=device needs data.resize=square or "
                                          "center_crop; native resolution"):
        validate(_cfg(images, "data.decode=device"))
    # Runs made before the key: a null max_side leaves the fingerprint as it was.
    assert "max_side" not in fingerprint(compose_cfg(*TINY))
    assert '"max_side": 50' in fingerprint(cfg)


def test_interrupted_run_resumes_to_the_same_maps_in_the_same_space(images, batched, tmp_path,
                                                                   monkeypatch):
    """A crash after a batch's values were written but before its status: the rows stay
    pending, resume recomputes only them, into the places reserved at creation."""
    original = ResultsWriter.write
    calls = []

    def crash_on_second(self, rows, arrays, errors):
        calls.append(list(rows))
        if len(calls) == 2:  # values written (garbage), status never: then the "kill"
            for key in self._ragged:
                self._write_ragged(key, self.file[key], np.asarray(rows),
                                   np.full_like(arrays[key], 99.0))
            self.file.flush()
            raise RuntimeError("killed")
        return original(self, rows, arrays, errors)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(ResultsWriter, "write", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        extract(_cfg(images), run_dir)
    monkeypatch.setattr(ResultsWriter, "write", original)
    results = run_dir / "results.h5"
    with load_run(results) as run:  # readable; only the first batch (one size) is done
        assert np.flatnonzero(run.status == DONE).tolist() == [0, 2, 5]
        assert (run.status[[1, 3, 4, 6]] == PENDING).all()
    size = results.stat().st_size
    summary = extract(_cfg(images, "batch_size=2"), run_dir)  # other batches this time
    assert summary.done == 7 and summary.skipped == 3
    assert results.stat().st_size == size  # written into the reserved places, nothing grew
    with load_run(results) as a, load_run(batched) as b:
        assert (a.status == DONE).all()
        for x, y in zip(a.cams(), b.cams(), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.weights(), b.weights(), rtol=1e-5, atol=1e-7)


def test_shards_merge_into_one_ragged_file_equal_to_unsharded(images, batched, tmp_path):
    run_dir = tmp_path / "sharded"
    for shard in (0, 1):
        extract(_cfg(images, f"data.shard={shard}", "data.num_shards=2"), run_dir)
    with h5py.File(run_dir / "results.shard-1-of-2.h5") as f:
        assert f["ragged/gradcam/layer4/offset"][:].tolist() == [0, 4, 8]  # its own
    with h5py.File(batched) as f:
        offsets = f["ragged/gradcam/layer4/offset"][:]
        values = f["gradcam/layer4"][:]
    for copy in (False, True):
        merge_shards(run_dir, copy=copy)
        with load_run(run_dir) as run, load_run(batched) as clean:
            assert run.ragged and len(run) == 7 and (run.status == DONE).all()
            f = run.file
            assert f.attrs["merge"] == ("copy" if copy else "virtual")
            np.testing.assert_array_equal(f["ragged/gradcam/layer4/offset"][:], offsets)
            np.testing.assert_array_equal(f["ragged/gradcam/layer4/shape"][:], LAYER4)
            np.testing.assert_allclose(f["gradcam/layer4"][:], values, rtol=1e-5, atol=1e-6)
            assert run.paths.tolist() == clean.paths.tolist()
            for x, y in zip(run.cams(), clean.cams(), strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_render_draws_each_image_at_its_own_size(images, batched, tmp_path):
    run_dir = tmp_path / "render"
    run_dir.mkdir()
    shutil.copy(batched, run_dir / "results.h5")
    written = render_run(run_dir, OmegaConf.create({"title": False}))
    assert len(written) == 7
    for path, (h, w) in zip(written, SIZES, strict=True):
        assert Image.open(path).size == (w, h)


def test_evaluate_and_report_at_native_size(images, batched, tmp_path):
    run_dir = tmp_path / "evaluate"
    run_dir.mkdir()
    shutil.copy(batched, run_dir / "results.h5")
    cfg = compose_cfg(*TINY, "stage=evaluate", f"run_dir={run_dir}", "channels_last=false",
                      "evaluate.metrics=[deletion,confidence]", "evaluate.steps=4",
                      "evaluate.score=logit")
    summary = evaluate(cfg, run_dir)
    assert summary.evaluated == 7
    with h5py.File(run_dir / "metrics.h5") as m, load_run(batched) as run:
        # The re-loaded inputs at native size reproduce the stored target logits.
        assert m.attrs["score_check_max_abs_diff"] < 1e-4
        curves = m["gradcam/layer4/deletion"][:]
        assert curves.shape == (7, 5) and np.isfinite(curves).all()
        # Step 0 removes nothing: the model's own score of each image (the logit of the
        # explained class), as extract stored it.
        np.testing.assert_allclose(curves[:, 0], m["score"][:], rtol=1e-6)
        np.testing.assert_allclose(m["score"][:], run.targets[1], rtol=1e-5, atol=1e-5)
    # The report of the run: its gallery draws the ragged maps (one thumbnail each, inside
    # the report), with the metrics.
    index = report(run_dir, compose_cfg(*TINY))
    text = index.read_text()
    assert len(list((run_dir / "report" / "img").glob("*.jpg"))) == 7
    assert "Deletion AUC" in text and all(f"img{i}" in text for i in range(7))


def test_load_run_gives_each_map_its_own_shape(batched):
    with load_run(batched) as run:
        assert run.cams(rows=3).shape == (2, 3)
        assert [c.shape for c in run.cams(rows=[3, 4])] == [(2, 3), (2, 2)]
        mask = np.zeros(7, bool)
        mask[[0, 6]] = True
        picked = run.cams(rows=mask)
        np.testing.assert_array_equal(picked[1], run.cams()[6])
        with pytest.raises(StoreError, match="hold maps of different sizes"):
            run.to_xarray()
        with h5py.File(batched) as f:  # the same through the format's own reader
            np.testing.assert_array_equal(read_map(f, "gradcam/layer4", 6), run.cams()[6])


def test_damaged_ragged_index_is_one_clear_error(batched, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(batched, bad)
    with h5py.File(bad, "r+") as f:
        f["ragged/gradcam/layer4/offset"][3] = 10**6
    with pytest.raises(StoreError, match="points outside its 32 values"):
        open_results(bad).close()
    shutil.copy(batched, bad)
    with h5py.File(bad, "r+") as f:  # row 3 pointed at row 2's values: in range, but wrong
        index = f["ragged/gradcam/layer4/offset"]
        index[3] = index[2]
    with pytest.raises(StoreError, match=r"ragged map gradcam/layer4 is not laid out image "
                                         r"after image \(row 3 at 8, expected 12\)"):
        open_results(bad).close()
    shutil.copy(batched, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(StoreError, match="ragged maps in a format_version 1 file"):
        open_results(bad).close()


def test_unreadable_images_become_failed_rows(images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(images.iterdir())[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "img7.jpg").write_text("not an image\n")  # no header: nothing reserved
    whole = (images / "img0.jpg").read_bytes()
    (folder / "img8.jpg").write_bytes(whole[: len(whole) * 4 // 5])  # header fine, data cut
    summary = extract(compose_cfg(*TINY, "data=glob", f"data.pattern={folder}/img*",
                                  "data.resize=null"), tmp_path / "run")
    assert (summary.done, summary.failed) == (3, 2)
    with load_run(tmp_path / "run") as run:
        assert run.status.tolist() == [DONE, DONE, DONE, FAILED, FAILED]
        assert "cannot identify image file" in run.errors[3]
        assert "image file is truncated" in run.errors[4]
        assert run.input_sizes.tolist()[3:] == [[0, 0], [40, 56]]
        assert [c.shape for c in run.cams(rows=slice(0, 4))] == [(2, 2), (2, 2), (2, 2),
                                                                (0, 0)]



def test_shards_whose_images_all_fail_still_make_valid_files(tmp_path):
    """No image with values: empty flat datasets (HDF5 takes no chunks for them), which
    open, merge (virtual or copied) and read as empty maps."""
    folder = tmp_path / "unreadable"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_text("not an image\n")
    run_dir = tmp_path / "run"
    for shard in (0, 1):
        summary = extract(compose_cfg(*TINY, "data=glob", f"data.pattern={folder}/*",
                                      "data.resize=null", f"data.shard={shard}",
                                      "data.num_shards=2"), run_dir)
        assert (summary.done, summary.failed) == (0, 1)
    for copy in (False, True):
        merge_shards(run_dir, copy=copy)
        with load_run(run_dir) as run:
            assert (run.status == FAILED).all() and run.input_sizes.tolist() == [[0, 0]] * 2
            assert [c.shape for c in run.cams()] == [(0, 0), (0, 0)]
            assert run.file["gradcam/layer4"].shape == (0,)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A real kill -9 of a native-resolution run, waited for by progress read from the file:
    the file opens, and the same command completes it to the arrays of a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        h, w = SIZES[i % 3]
        Image.fromarray(photo(i, h, w)).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    args = [*TINY, "data=glob", f"data.pattern={folder}/img*", "data.resize=null",
            "batch_size=2", "channels_last=false"]
    run_dir = tmp_path / "killed"
    results = run_dir / "results.h5"
    command = [sys.executable, str(ROOT / "run.py"), "stage=extract", f"run_dir={run_dir}",
               *args]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def done() -> int:
        try:
            with h5py.File(results, "r", locking=False) as f:
                return int((f["images/status"][:] == DONE).sum())
        except (OSError, KeyError):  # not created yet
            return 0

    deadline = time.monotonic() + 300
    while done() < 4 and proc.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with load_run(results) as run:  # opens; statuses readable
        before = int(run.done.sum())
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    extract(compose_cfg(*args), tmp_path / "clean")
    with load_run(results) as a, load_run(tmp_path / "clean") as b:
        assert (a.status == DONE).all() and before < len(a)
        for x, y in zip(a.cams(), b.cams(), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.weights(), b.weights(), rtol=1e-5, atol=1e-7)


def test_a_vit_at_native_size_fails_only_the_sizes_its_patches_do_not_divide(images, tmp_path):
    """timm's patch embedding asserts (AssertionError, not RuntimeError) that the input is a
    multiple of the patch: those images fail with the model's reason, the others are done,
    each with its own token grid (dynamic_img_size)."""
    cfg = compose_cfg(*TINY, "model=timm", "model.name=vit_tiny_patch16_224",
                      "model.weights=null", "model.target_layers=[blocks.0]",
                      "+model.kwargs={depth: 1, patch_size: 8, dynamic_img_size: true}",
                      "data=glob", f"data.pattern={images}/img*", "data.resize=null",
                      "channels_last=false")
    summary = extract(cfg, tmp_path)
    assert (summary.done, summary.failed) == (5, 2)
    with load_run(tmp_path) as run:
        failed = run.status == FAILED
        assert [Path(p).name for p in run.paths[failed]] == ["img3.png", "img6.jpg"]
        assert all("the model cannot take a 33x71 input: Input height (33) should be "
                   "divisible by patch size (8)" in e for e in run.errors[failed])
        assert [c.shape for c in run.cams()] == [(5, 7), (8, 6), (5, 7), (0, 0), (8, 6),
                                                 (5, 7), (0, 0)]
