"""The long per-image table (Run.table, Sweep.images, stage=table), its map statistics with
hand-computed numbers (a center crop among them), Run.boxes / metrics / overlay, and the
read-only path without torch."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, TINY, compose_cfg, write_images

from pipeline.cli import run
from pipeline.config import RenderConfig
from pipeline.errors import ConfigError, DataError
from pipeline.images import input_box
from pipeline.mapstats import map_stats
from pipeline.pictures import COLORMAPS, overlay, overlay_cam
from pipeline.render import load_photo, render_run
from pipeline.results import load_run, load_sweep
from pipeline.store import CHECKSUMS, checksummed
from pipeline.store.checksums import digest
from pipeline.table import TABLE_FILE, run_table

IMAGE_COLUMNS = ["row", "path", "file", "label", "label_name", "pred", "pred_name", "prob",
                 "correct", "target", "rank", "score", "status", "error", "method", "layer",
                 "map"]
STAT_COLUMNS = ["entropy", "peak_y", "peak_x", "top10_mass"]

# The worked example: a 7 x 7 map whose mass lies evenly on rows 1..3, columns 2..4.
BLOCK = np.zeros((7, 7), np.float32)
BLOCK[1:4, 2:5] = 1.0
# In cell units of that map: a box from 1.5 to 5.5 in y and in x. Inside it: half of row 1,
# all of rows 2 and 3; all three columns. Mask 9 cells, box 16 cells, overlap 2.5 x 3 cells.
BOX_IN_CELLS = (1.5, 1.5, 5.5, 5.5)
IOU = 7.5 / (9 + 16 - 7.5)  # = 3/7
MASS = (0.5 + 1 + 1) / 3  # = 5/6
ENTROPY = math.log(9) / math.log(49)  # 9 equal cells of 49
TOP10 = 5 / 9  # ceil(4.9) = 5 cells of the 9


def in_photo(seen: np.ndarray, cells: tuple[float, ...], side: int = 7) -> np.ndarray:
    """A box given in cells of a side x side map, in photo pixels through ``seen``."""
    y0, x0, y1, x1 = seen
    ch, cw = (y1 - y0) / side, (x1 - x0) / side
    return np.array([y0 + cells[0] * ch, x0 + cells[1] * cw, y0 + cells[2] * ch,
                     x0 + cells[3] * cw])


# -- statistics, by hand --------------------------------------------------------------------

def test_statistics_of_the_worked_example_through_a_center_crop():
    """A 300 x 200 photo center-cropped for a 35-pixel input: the model saw the 175 x 175
    square at y 62.5, x 12.5 (25 photo pixels per cell of a 7 x 7 map)."""
    seen = np.array([input_box((300, 200), 35, "center_crop")])
    assert seen.tolist() == [[62.5, 12.5, 237.5, 187.5]]
    box = np.array([[100.0, 50.0, 200.0, 150.0]])  # = BOX_IN_CELLS through that square
    np.testing.assert_allclose(in_photo(seen[0], BOX_IN_CELLS), box[0])
    s = map_stats(BLOCK[None], seen, box)
    assert s["entropy"][0] == pytest.approx(ENTROPY)
    assert (s["peak_y"][0], s["peak_x"][0]) == (100.0, 75.0)  # centre of cell (1, 2)
    assert s["top10_mass"][0] == pytest.approx(TOP10)
    assert s["box_iou"][0] == pytest.approx(3 / 7)
    assert s["box_mass"][0] == pytest.approx(5 / 6)
    # Laid over the whole photo instead (the naive reading), the same map scores otherwise:
    # cells of 300/7 x 200/7 px; rows 1..3 cover y 42.9..171.4, columns 2..4 x 57.1..142.9.
    naive = map_stats(BLOCK[None], np.array([[0.0, 0.0, 300.0, 200.0]]), box)
    assert naive["box_iou"][0] == pytest.approx(30 / 73)  # 0.411 instead of 0.429
    assert naive["box_mass"][0] == pytest.approx(5 / 9)
    assert naive["peak_y"][0] == pytest.approx(1.5 * 300 / 7)


def test_statistics_of_edge_cases():
    seen = np.array([[0.0, 0.0, 70.0, 70.0]] * 5)
    maps = np.zeros((5, 7, 7), np.float32)
    maps[1] = 2.0  # constant: uniform mass, no bright half
    maps[2, 3, 3] = 5.0  # one cell
    maps[3] = BLOCK
    maps[3, 0, 0] = np.nan  # non-finite and negative values hold no mass
    maps[3, 6, 6] = -4.0
    maps[4, 6, 6] = 1.0
    boxes = np.array([[0, 0, 70, 70], [0, 0, 70, 70], [30, 30, 40, 40], [np.nan] * 4,
                      [80, 80, 90, 90]], np.float64)  # the last outside what the model saw
    s = map_stats(maps, seen, boxes)
    assert np.isnan([s[k][0] for k in s]).all()  # an all-zero map has no statistics
    assert s["entropy"][1] == pytest.approx(1.0) and s["top10_mass"][1] == pytest.approx(5 / 49)
    assert s["box_iou"][1] == 0.0 and s["box_mass"][1] == pytest.approx(1.0)
    assert (s["peak_y"][1], s["peak_x"][1]) == (5.0, 5.0)  # first cell of equal maxima
    assert s["entropy"][2] == 0.0 and s["top10_mass"][2] == 1.0
    assert (s["peak_y"][2], s["peak_x"][2], s["box_iou"][2], s["box_mass"][2]) == (
        35.0, 35.0, 1.0, 1.0)
    assert s["entropy"][3] == pytest.approx(ENTROPY) and s["top10_mass"][3] == pytest.approx(
        TOP10)
    assert np.isnan(s["box_iou"][3]) and np.isnan(s["box_mass"][3])  # no box
    assert s["box_iou"][4] == 0.0 and s["box_mass"][4] == 0.0
    # Several boxes: their union. A (the worked example's box) and B overlap in 15 x 15 px.
    a, b = [15.0, 15.0, 55.0, 55.0], [0.0, 0.0, 30.0, 30.0]
    two = map_stats(np.stack([BLOCK] * 3), seen[:3], np.array([[a, b], [a, a], [a, [np.nan] * 4]]))
    # Mask y 10..40 x 20..50; inside A 25 x 30, inside B 20 x 10, inside both 15 x 10 -> 800
    # of its 900 px; the union is 1600 + 900 - 225 = 2275 px.
    assert two["box_iou"][0] == pytest.approx(800 / (900 + 2275 - 800))
    assert two["box_mass"][0] == pytest.approx(800 / 900)
    assert two["box_iou"][1:].tolist() == pytest.approx([IOU, IOU])  # a box twice: once
    assert two["box_mass"][1:].tolist() == pytest.approx([MASS, MASS])
    one = map_stats(np.ones((2, 1, 1)), seen[:2], None)
    assert one["entropy"].tolist() == [0.0, 0.0] and "box_iou" not in one


# -- a run's table --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crop_run(tmp_path_factory) -> Path:
    """The bundled samples (two labelled, two not), center-cropped for a 56-pixel input,
    Grad-CAM at layer2 (7 x 7) and layer4 (2 x 2), evaluated (deletion, confidence)."""
    run_dir = tmp_path_factory.mktemp("table") / "run"
    base = (*TINY, "data=samples", "data.image_size=56", "data.resize=center_crop",
            "model.target_layers=[layer2,layer4]")
    run(compose_cfg(*base, "stage=extract"), run_dir)
    run(compose_cfg(*base, "stage=evaluate", f"run_dir={run_dir}",
                    "evaluate.metrics=[deletion,confidence]", "evaluate.steps=2"), run_dir)
    return run_dir


def test_every_column_of_a_run(crop_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(crop_run, run_dir)
    with h5py.File(run_dir / "results.h5", "r+") as f:  # the worked example in row 1
        f["gradcam/layer2"][1] = BLOCK
        # ... with its checksum, as the writer would have stored it
        f[CHECKSUMS][1, checksummed(f)["gradcam/layer2"]] = digest(BLOCK)
    with load_run(run_dir) as r:
        seen = r.boxes
        sizes = r.sizes
        cats, (cls, prob), (tcls, tscore) = r.categories, r.predictions, r.targets
        boxes = np.full((4, 4), np.nan)
        boxes[1] = in_photo(seen[1], BOX_IN_CELLS)
        t = r.table(boxes=boxes)
        cams = {layer: r.cams(layer) for layer in ("layer2", "layer4")}
    # The region each photo's model input covers: the 7/8 center square of the photo.
    for i in range(4):
        np.testing.assert_allclose(seen[i], input_box(tuple(sizes[i]), 56, "center_crop"),
                                   rtol=1e-6)
    assert list(t.columns) == [*IMAGE_COLUMNS, "deletion_auc", "drop", "explanation_score",
                               "increase", *STAT_COLUMNS, "box_iou", "box_mass"]
    assert len(t) == 8
    assert list(t["map"]) == ["gradcam/layer2"] * 4 + ["gradcam/layer4"] * 4
    assert list(t["method"]) == ["gradcam"] * 8 and list(t["layer"][::4]) == ["layer2", "layer4"]
    assert list(t["row"]) == [0, 1, 2, 3] * 2
    assert list(t["file"][:4]) == ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"]
    assert list(t["path"][:4]) == [str(ROOT / "pipeline" / "samples" / n) for n in t["file"][:4]]
    assert list(t["label"][:4]) == [285, 967, -1, -1]  # pipeline/samples/labels.csv
    assert list(t["label_name"][:4]) == ["Egyptian cat", "espresso", "", ""]
    assert list(t["pred"][:4]) == list(cls[:, 0])
    assert list(t["pred_name"][:4]) == [cats[c] for c in cls[:, 0]]
    np.testing.assert_array_equal(t["prob"][:4], prob[:, 0])
    correct = t["correct"][:4]
    assert correct.isna().tolist() == [False, False, True, True]
    assert correct[0] == (cls[0, 0] == 285) and correct[1] == (cls[1, 0] == 967)
    assert list(t["target"][:4]) == list(tcls) and list(t["rank"]) == [0] * 8
    np.testing.assert_array_equal(t["score"][:4], tscore)
    assert list(t["status"].astype(str)) == ["done"] * 8 and set(t["error"]) == {""}
    # Metrics: the per-image values metrics.h5 holds, per map (curves are left out).
    with h5py.File(run_dir / "metrics.h5") as m:
        for i, key in enumerate(("gradcam/layer2", "gradcam/layer4")):
            for name in ("deletion_auc", "drop", "increase", "explanation_score"):
                np.testing.assert_array_equal(t[name][4 * i:4 * i + 4], m[key][name][:])
    # Statistics: the worked example in row 1, whatever size the photo was.
    ex = t.iloc[1]
    assert ex["entropy"] == pytest.approx(ENTROPY) and ex["top10_mass"] == pytest.approx(TOP10)
    y0, x0, y1, x1 = seen[1]
    assert ex["peak_y"] == pytest.approx(y0 + 1.5 * (y1 - y0) / 7)
    assert ex["peak_x"] == pytest.approx(x0 + 2.5 * (x1 - x0) / 7)
    assert ex["box_iou"] == pytest.approx(IOU) and ex["box_mass"] == pytest.approx(MASS)
    assert t["box_iou"].isna().sum() == 6  # no box for the other images
    # The other rows: the same numbers as the statistics of each map on its own.
    for j, row in t.iterrows():
        one = map_stats(cams[row["layer"]][row["row"]][None], seen[row["row"]][None])
        for name in STAT_COLUMNS:
            assert row[name] == pytest.approx(one[name][0]), (j, name)
    # The same boxes from a CSV file (x before y, as evaluate.boxes takes them), and
    # stage=table with evaluate.boxes: the rows of the image with a box hold the same.
    y0, x0, y1, x1 = boxes[1]
    csv = tmp_path / "boxes.csv"
    csv.write_text(f"file,xmin,ymin,xmax,ymax\nsamples/coffee.jpg,{x0},{y0},{x1},{y1}\n"
                   f"nothere.jpg,1,2,3,4\n")
    with load_run(run_dir) as r:
        from_csv = r.table(boxes=csv)
    pd.testing.assert_frame_equal(from_csv, t)
    run(compose_cfg("stage=table", f"run_dir={run_dir}", f"evaluate.boxes={csv}"), run_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / TABLE_FILE), t)
    loc = tmp_path / "LOC_val_solution.csv"  # ImageNet's: by file stem, wnid x0 y0 x1 y1
    loc.write_text(f"ImageId,PredictionString\ncoffee,n07920052 {x0} {y0} {x1} {y1} \n")
    with load_run(run_dir) as r:
        pd.testing.assert_frame_equal(r.table(boxes=loc), t)
    csv.write_text("file,xmin,ymin,xmax,ymax\ncoffee.jpg,1,2,3\n")
    with load_run(run_dir) as r, pytest.raises(DataError, match=r"boxes.csv:2: not a box"):
        r.table(boxes=csv)
    # Without metrics or statistics: the image columns alone.
    with load_run(run_dir) as r:
        plain = run_table(r, metrics=False, stats=False)  # what Run.table delegates to
        with pytest.raises(ConfigError, match=r"boxes must be an \(N, 4\) array"):
            r.table(boxes=np.zeros((3, 4)))
        with pytest.raises(ConfigError, match="pass stats=True"):
            r.table(stats=False, boxes=boxes)
    assert list(plain.columns) == IMAGE_COLUMNS
    pd.testing.assert_frame_equal(plain, t[IMAGE_COLUMNS])


def test_metrics_as_labelled_datasets(crop_run):
    with load_run(crop_run) as r:
        ds = r.metrics()
        paths = list(r.paths)
    assert sorted(ds) == ["gradcam/layer2", "gradcam/layer4"]
    layer4 = ds["gradcam/layer4"]
    assert list(layer4["image"].values) == paths
    assert layer4["deletion"].dims == ("image", "step") and layer4["deletion"].shape == (4, 3)
    with h5py.File(crop_run / "metrics.h5") as m:
        np.testing.assert_array_equal(layer4["deletion_auc"].values,
                                      m["gradcam/layer4/deletion_auc"][:])


def test_topk_rows_failed_rows_and_no_metrics(tmp_path):
    images = tmp_path / "images"
    write_images(images, 3)
    (images / "broken.jpg").write_text("not an image")
    base = (*TINY, "data=glob", f"data.pattern={images}/*.jpg", "target=topk", "target.k=2")
    run(compose_cfg(*base, "stage=extract"), tmp_path / "run")
    with load_run(tmp_path / "run") as r:
        assert list(r.table().columns) == IMAGE_COLUMNS + STAT_COLUMNS  # no metrics.h5
    run(compose_cfg(*base, "stage=evaluate", f"run_dir={tmp_path / 'run'}",
                    "evaluate.metrics=[deletion]", "evaluate.steps=2"), tmp_path / "run")
    with load_run(tmp_path / "run") as r:
        t = r.table()
        cams, (tcls, tscore), seen = r.cams("layer4"), r.targets, r.boxes
        status = r.status
    assert list(t.columns) == [*IMAGE_COLUMNS, "deletion_auc", *STAT_COLUMNS]
    with h5py.File(tmp_path / "run" / "metrics.h5") as m:
        auc = m["gradcam/layer4/deletion_auc"][:]  # (image, class)
    assert auc.shape == (4, 2)
    np.testing.assert_array_equal(t["deletion_auc"], auc.ravel())  # per explained class
    assert len(t) == 8  # 4 images x 2 explained classes
    assert list(t["file"]) == ["broken.jpg"] * 2 + [f"img00{i}.jpg" for i in (0, 0, 1, 1, 2, 2)]
    assert list(t["rank"]) == [0, 1] * 4
    assert list(status) == [2, 1, 1, 1]
    bad = t[t["row"] == 0]
    assert list(bad["status"].astype(str)) == ["failed"] * 2
    assert bad["error"].str.contains("cannot identify image file").all()
    assert (bad["pred"] == -1).all() and (bad["target"] == -1).all() and bad["correct"].isna().all()
    assert bad[STAT_COLUMNS].isna().all().all() and bad["score"].isna().all()
    good = t[t["row"] > 0]
    np.testing.assert_array_equal(good["target"], tcls[1:].ravel())
    np.testing.assert_array_equal(good["score"], tscore[1:].ravel())
    want = map_stats(cams[1:].reshape(-1, 2, 2), np.repeat(seen[1:], 2, axis=0))
    for name in STAT_COLUMNS:
        np.testing.assert_allclose(good[name], want[name], err_msg=name)


def test_activations_are_no_maps(tmp_path, image_dir):
    """Activations (and Grad-CAM's channel weights) are not maps of the image: a run of
    activations alone has a row per image, with its facts and no map."""
    run(compose_cfg(*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
                    "method=activations"), tmp_path / "run")
    with load_run(tmp_path / "run") as r:
        t = r.table()
        pred = r.predictions[0][:, 0]
        with pytest.raises(ConfigError, match="stores no maps to draw"):
            r.overlay(0)
    assert list(t.columns) == IMAGE_COLUMNS and len(t) == 6
    assert set(t["map"]) == {""} and list(t["pred"]) == list(pred)


def test_ragged_run_at_native_resolution(tmp_path):
    images = tmp_path / "images"
    write_images(images, 2, size=(64, 96))
    write_images(images, 2, size=(96, 64), start=2)
    write_images(images, 1, size=(80, 80), start=4)
    run(compose_cfg(*TINY, "stage=extract", "data=glob", f"data.pattern={images}/*.jpg",
                    "data.resize=null", "model.target_layers=[layer3]"), tmp_path / "run")
    with load_run(tmp_path / "run") as r:
        assert r.ragged
        cams, seen, sizes = r.cams("layer3"), r.boxes, r.sizes
        t = r.table()
    assert {c.shape for c in cams} == {(4, 6), (6, 4), (5, 5)}
    np.testing.assert_array_equal(seen, np.column_stack([np.zeros((5, 2)), sizes]))
    assert len(t) == 5
    for i in range(5):
        want = map_stats(cams[i][None], seen[i][None])
        for name in STAT_COLUMNS:
            assert t[name][i] == pytest.approx(want[name][0]), (i, name)
    # Peak: the centre of its cell in photo pixels (16 photo pixels per cell here).
    top = np.unravel_index(np.argmax(cams[2]), cams[2].shape)
    assert (t["peak_y"][2], t["peak_x"][2]) == (16 * top[0] + 8, 16 * top[1] + 8)
    written = render_run(tmp_path / "run", RenderConfig(title=False))
    with load_run(tmp_path / "run") as r:
        for row, path in enumerate(written):
            np.testing.assert_array_equal(r.overlay(row), read_png(path), err_msg=path.name)


# -- sweeps and the stage -----------------------------------------------------------------

def _job(sweep: Path, job: int, images: Path, method: str, layers: str) -> None:
    folder = sweep / str(job)
    (folder / ".hydra").mkdir(parents=True)
    overrides = ["model=resnet18", f"method={method}", f"model.target_layers={layers}"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    run(compose_cfg(*TINY, "stage=extract", "data=glob", f"data.pattern={images}/*.jpg",
                    *overrides[1:]), folder)


def test_sweep_table_and_stage_table_write_parquet(tmp_path):
    images = tmp_path / "images"
    write_images(images, 3)
    sweep = tmp_path / "sweep"
    _job(sweep, 0, images, "gradcam", "[layer3]")
    _job(sweep, 1, images, "xgradcam", "[layer3,layer4]")
    s = load_sweep(sweep)
    assert s.swept == ["method", "model.target_layers"]
    t = s.images(stats=False)
    # The swept method is the table's own column: one column, not two.
    assert list(t.columns[:2]) == ["job", "model.target_layers"]
    assert list(t.columns[2:]) == IMAGE_COLUMNS
    assert list(t["job"]) == [0] * 3 + [1] * 6
    assert list(t["model.target_layers"]) == ["[layer3]"] * 3 + ["[layer3,layer4]"] * 6
    assert list(t["method"]) == ["gradcam"] * 3 + ["xgradcam"] * 6
    assert list(t["map"]) == ["gradcam/layer3"] * 3 + ["xgradcam/layer3"] * 3 + [
        "xgradcam/layer4"] * 3
    with s.run(1) as r:
        pd.testing.assert_frame_equal(t[t["job"] == 1].iloc[:, 2:].reset_index(drop=True),
                                      r.table(stats=False))
    # stage=table, for the sweep folder and for one run: Parquet that pandas reads back.
    result = run(compose_cfg("stage=table", f"run_dir={sweep}"), sweep)
    assert result["table"] == str(sweep / TABLE_FILE) and result["rows"] == 9
    back = pd.read_parquet(sweep / TABLE_FILE)
    pd.testing.assert_frame_equal(back, s.images())
    run(compose_cfg("stage=table", f"run_dir={sweep / '0'}"), sweep / "0")
    with load_run(sweep / "0") as r:
        pd.testing.assert_frame_equal(pd.read_parquet(sweep / "0" / TABLE_FILE), r.table())
    assert not list(sweep.glob(".images.parquet*"))  # no temporaries left
    with pytest.raises(ConfigError, match="stage=table needs run_dir"):
        run(compose_cfg("stage=table"), tmp_path)


def test_table_and_overlay_import_no_torch(crop_run, tmp_path):
    """The read-only path (table, stage function, overlay) in a fresh interpreter."""
    code = f"""
import sys
from pipeline.results import load_run
from pipeline.table import table_stage
with load_run({str(crop_run)!r}) as r:
    t = r.table()
    picture = r.overlay(1, "gradcam/layer4")
out = table_stage({{"run_dir": {str(crop_run)!r}}}, {str(crop_run)!r})
assert "torch" not in sys.modules, "torch was imported"
print(len(t), picture.shape, out["rows"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "8" and done.stdout.split()[-1] == "8"


# -- overlays -------------------------------------------------------------------------------

def read_png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_overlay_is_the_picture_render_draws(crop_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(crop_run, run_dir)
    written = render_run(run_dir, RenderConfig(title=False))
    assert len(written) == 8
    with load_run(run_dir) as r:
        for path in written:
            row = int(path.name.split("__")[0].rsplit("-", 1)[1])
            layer = path.name.split("__")[1]
            np.testing.assert_array_equal(r.overlay(row, f"gradcam/{layer}"), read_png(path),
                                          err_msg=path.name)
        # Opacity and colormap: the photo's weight is 1 - alpha, any OpenCV colormap by name.
        photo, box = load_photo(r.paths[2], r.sizes[2], r.boxes[2])
        cam = r.cams("layer4")[2]
        np.testing.assert_array_equal(
            r.overlay(2, "gradcam/layer4", alpha=0.3, cmap="viridis"),
            overlay_cam(photo, cam, box, 0.7, outline=True, colormap=cv2.COLORMAP_VIRIDIS))
        assert r.overlay(2, alpha=0.3, cmap="VIRIDIS").shape == photo.shape  # first map
        with pytest.raises(ConfigError, match=r"unknown colormap 'viridiss'; did you mean "
                                              r"'viridis' .* turbo, twilight"):
            r.overlay(2, cmap="viridiss")
        with pytest.raises(ConfigError, match=r"unknown map 'gradcam/layer5'; did you mean "
                                              r"'gradcam/layer4'"):
            r.overlay(2, "gradcam/layer5")
        with pytest.raises(ConfigError, match=r"row 4 is not an image row .* \(0\.\.3\)"):
            r.overlay(4)
        with pytest.raises(ConfigError, match=r"k=1: gradcam/layer4 has one map per image"):
            r.overlay(0, "gradcam/layer4", k=1)
        with pytest.raises(ConfigError, match=r"alpha .* must be in \[0, 1\], got 1.5"):
            r.overlay(0, alpha=1.5)
    with h5py.File(run_dir / "results.h5", "r+") as f:
        f["images/status"][3] = 2
    with load_run(run_dir) as r, pytest.raises(DataError, match="row 3 .* is failed"):
        r.overlay(3)
    assert {"jet", "viridis", "inferno", "magma", "turbo", "hot"} <= set(COLORMAPS)
    # The public function is the private one with opacity instead of the photo's weight.
    img = np.full((20, 30, 3), 90, np.uint8)
    np.testing.assert_array_equal(overlay(img, BLOCK, None, 0.25, "jet"),
                                  overlay_cam(img, BLOCK, None, 0.75))


def test_topk_and_saliency_overlays_equal_render(tmp_path):
    images = tmp_path / "images"
    write_images(images, 2, size=(90, 60))
    base = (*TINY, "data=glob", f"data.pattern={images}/*.jpg", "data.resize=center_crop")
    run(compose_cfg(*base, "stage=extract", "target=topk", "target.k=2"), tmp_path / "k")
    run(compose_cfg(*base, "stage=extract", "method=saliency"), tmp_path / "sal")
    for name, maps in (("k", 4), ("sal", 2)):
        written = render_run(tmp_path / name, RenderConfig(title=False))
        assert len(written) == maps
        with load_run(tmp_path / name) as r:
            for path in written:
                row = int(path.name.split("__")[0].rsplit("-", 1)[1])
                shown = path.name.split("__")[1]
                k = int(shown.rsplit("top", 1)[1]) - 1 if "-top" in shown else None
                np.testing.assert_array_equal(r.overlay(row, k=k), read_png(path),
                                              err_msg=path.name)
            assert len(r.table()) == maps
    with load_run(tmp_path / "k") as r, pytest.raises(ConfigError, match=r"k = 0\.\.1"):
        r.overlay(0, k=2)


def test_stage_table_from_the_command_line(crop_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(crop_run, run_dir)
    cmd = [sys.executable, str(ROOT / "run.py"), "stage=table"]
    done = subprocess.run([*cmd, f"run_dir={run_dir}"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "table: " in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"table: 8 rows (run, 4 images, 2 maps: gradcam/layer2, gradcam/layer4), 25 columns "
        f"-> {run_dir / TABLE_FILE}")
    assert len(pd.read_parquet(run_dir / TABLE_FILE)) == 8
    gone = subprocess.run([*cmd, f"run_dir={tmp_path / 'nothing'}"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert gone.returncode == 2
    assert gone.stderr.strip().splitlines()[-1] == (
        f"error: no results.h5 and no sweep (multirun.yaml, job folders) in "
        f"{tmp_path / 'nothing'}; give run_dir=<a run or sweep folder>")


def test_table_reports_progress(crop_run, monkeypatch, caplog):
    """Off a terminal (a job log) the bar is a line per update when due; here every one."""
    import functools

    import pipeline.table as table
    from pipeline.progress import Progress

    monkeypatch.setattr(table, "Progress", functools.partial(Progress, every=0.0))
    with caplog.at_level("INFO", logger="camsweep"), load_run(crop_run) as r:
        r.table()
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("table")]
    counts = [line.split(" img")[0] for line in lines]  # a map at a time, then the last again
    assert counts in (["table run: 4/8", "table run: 8/8"],
                      ["table run: 4/8", "table run: 8/8", "table run: 8/8"])
