"""Rendering: overlays equal pytorch-grad-cam's, maps land where they belong, only done rows
are drawn, file names stay inside pictures/, and nothing crashes on missing photos."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import ROOT, TINY, compose_cfg, photo, write_images
from peers import require
from PIL import Image

from pipeline.config import RenderConfig
from pipeline.errors import ConfigError
from pipeline.extract import extract
from pipeline.pictures import (
    activation_grid,
    activation_strip,
    add_title,
    grid_shape,
    normalize_cam,
    overlay_cam,
    picture_name,
    safe_name,
    saliency_picture,
)
from pipeline.render import MAX_SIDE, _Labels, render_run
from pipeline.store import DONE, FAILED, PENDING, create_results


def show_cam_on_image(*args, **kwargs):
    """pytorch-grad-cam's, imported by the test that compares with it (peers.require)."""
    return require("pytorch_grad_cam.utils.image").show_cam_on_image(*args, **kwargs)

CATEGORIES = [f"class {i}" for i in range(10)]
SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def read_png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def gray_photo(path: Path, h: int, w: int, value: int = 128) -> str:
    """A flat photo: any colour in an overlay then comes from the map."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return str(path)


def peak_cam(h: int, w: int, y: int, x: int) -> np.ndarray:
    cam = np.zeros((h, w), np.float32)
    cam[y, x] = 5.0
    return cam


def make_run(
    run_dir: Path,
    paths: list[str],
    maps: dict[str, np.ndarray],
    status: list[int] | None = None,
    sizes: list[tuple[int, int]] | None = None,
    boxes: list[tuple[float, float, float, float]] | None = None,
    method: str = "gradcam",
    resize: str = "square",
) -> Path:
    """A results file as extract writes it, filled with the given arrays.

    ``maps`` keys are dataset paths ("gradcam/layer4"), values (N, ...) arrays.
    """
    n = len(paths)
    run_dir.mkdir(parents=True, exist_ok=True)
    layers = [k.split("/", 1)[1] for k in maps if not k.startswith("saliency")]
    layout = {k: (v.shape[1:], v.dtype) for k, v in maps.items()}
    layout.update({"targets/class": ((), np.int32), "targets/score": ((), np.float32),
                   "predictions/class": ((3,), np.int32), "predictions/prob": ((3,), np.float32)})
    attrs = {"method": method, "model": "test", "target_layers": layers,
             "categories": CATEGORIES, "image_size": 32, "resize": resize}
    path = run_dir / "results.h5"
    create_results(path, paths, np.full(n, -1), np.arange(n), layout, attrs)
    if sizes is None:
        sizes = [np.asarray(Image.open(p)).shape[:2] if Path(p).is_file() else (40, 60)
                 for p in paths]
    if boxes is None:
        boxes = [(0.0, 0.0, float(h), float(w)) for h, w in sizes]
    with h5py.File(path, "r+") as f:
        for key, value in maps.items():
            f[key][...] = value
        f["images/size"][...] = np.asarray(sizes, np.int32)
        f["images/box"][...] = np.asarray(boxes, np.float32)
        f["targets/class"][...] = np.arange(n) % 10
        f["targets/score"][...] = 3.5
        f["predictions/class"][...] = np.stack([np.arange(n) % 10, np.full(n, 7),
                                                np.full(n, 8)], 1)
        f["predictions/prob"][...] = [[0.6, 0.3, 0.1]] * n
        f["images/status"][...] = DONE if status is None else np.asarray(status, np.uint8)
    return run_dir


def render(run_dir: Path, **options) -> list[Path]:
    return render_run(run_dir, RenderConfig(**options))


# -- the overlay itself --------------------------------------------------------------------

@pytest.mark.parametrize("weight", [0.5, 0.3, 1.0])
def test_overlay_equals_show_cam_on_image(weight):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    cam = np.maximum(rng.normal(size=(7, 7)), 0).astype(np.float32) * 3
    mask = cv2.resize((cam - cam.min()) / (1e-7 + cam.max() - cam.min()), (70, 50))
    expected = show_cam_on_image(image / np.float32(255), mask, use_rgb=True, image_weight=weight)
    got = overlay_cam(image, cam, None, weight)
    assert got.dtype == np.uint8 and got.shape == image.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    full = overlay_cam(image, cam, (0, 0, 50, 70), weight, outline=True)  # whole-image box
    np.testing.assert_array_equal(full, got)


def test_center_crop_box_blends_inside_only():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    cam = rng.random((7, 7)).astype(np.float32)
    box = (7.5, 17.5, 52.5, 62.5)  # a 45 x 45 center crop, as stored: floats
    got = overlay_cam(image, cam, box, 0.5, outline=False)
    y0, x0, y1, x1 = (round(v) for v in box)  # as render rounds the stored floats
    inside = image[y0:y1, x0:x1]
    mask = cv2.resize(normalize_cam(cam), (x1 - x0, y1 - y0))
    expected = show_cam_on_image(inside / np.float32(255), mask, use_rgb=True)
    assert np.abs(got[y0:y1, x0:x1].astype(int) - expected.astype(int)).max() <= 1
    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(got[outside], image[outside])
    framed = overlay_cam(image, cam, box, 0.5, outline=True)
    np.testing.assert_array_equal(framed[y0:y1, x0:x1], got[y0:y1, x0:x1])  # frame is outside
    assert (framed[y0 - 1, x0:x1] == 255).all() and (framed[y1, x0:x1] == 255).all()


def test_constant_and_nonfinite_maps_give_no_nan():
    assert not normalize_cam(np.full((7, 7), 3.0)).any()
    assert not normalize_cam(np.zeros((7, 7))).any()
    cam = np.ones((7, 7), np.float32)
    cam[2, 3], cam[0, 0], cam[6, 6] = np.nan, np.inf, 4.0
    norm = normalize_cam(cam)
    assert np.isfinite(norm).all() and norm.min() == 0 and norm[6, 6] == 1
    image = np.full((30, 30, 3), 100, np.uint8)
    out = overlay_cam(image, np.full((7, 7), 2.0), None)
    # A constant map is all "cold": the same blue everywhere, no NaN turned into garbage.
    assert (out == out[0, 0]).all() and out[0, 0, 2] > out[0, 0, 0]
    black = overlay_cam(np.zeros((10, 10, 3), np.uint8), np.zeros((3, 3)), None, 1.0)
    assert not black.any()  # the reference would divide by zero here


@pytest.mark.parametrize(("cy", "cx"), [(1, 5), (5, 1), (3, 3)])
def test_hot_spot_lands_where_the_map_peaks(cy, cx):
    h, w = 140, 210
    image = np.full((h, w, 3), 128, np.uint8)
    out = overlay_cam(image, peak_cam(7, 7, cy, cx), None).astype(int)
    red = out[..., 0] - out[..., 2]
    y, x = np.unravel_index(np.argmax(red), red.shape)
    assert abs(y - (cy + 0.5) * h / 7) <= h / 7 and abs(x - (cx + 0.5) * w / 7) <= w / 7


def test_image_weight_out_of_range_is_a_config_error(tmp_path):
    run = make_run(tmp_path / "run", [gray_photo(tmp_path / "a.png", 20, 20)],
                   {"gradcam/l": np.ones((1, 3, 3), np.float32)})
    with pytest.raises(ConfigError, match="image_weight"):
        render(run, image_weight=1.5)


# -- render_run ----------------------------------------------------------------------------

def test_hot_spot_in_rendered_file_follows_the_center_crop_box(tmp_path):
    h, w = 90, 160
    photo = gray_photo(tmp_path / "flat.png", h, w)
    box = (0.0, 35.0, 90.0, 125.0)  # a 90 x 90 crop in the middle
    run = make_run(tmp_path / "run", [photo], {"gradcam/layer4": peak_cam(7, 7, 6, 0)[None]},
                   boxes=[box])
    (path,) = render(run, title=False)
    out = read_png(path).astype(int)
    assert out.shape == (h, w, 3)
    red = out[..., 0] - out[..., 2]
    y, x = np.unravel_index(np.argmax(red), red.shape)
    # Cell (6, 0) of the 7 x 7 map: bottom left of the box, not of the photo.
    assert y > 90 * 5 / 7 and 35 <= x < 35 + 90 / 7 + 2
    assert (out[:, :34] == 128).all() and (out[:, 127:] == 128).all()  # outside untouched


def test_only_done_rows_are_drawn_once_per_layer(tmp_path):
    photos = [gray_photo(tmp_path / "img" / f"p{i}.png", 30, 40) for i in range(5)]
    cams = np.random.default_rng(0).random((5, 4, 4)).astype(np.float32)
    layers = ["layer4.2.conv3", "features[-1]"]
    run = make_run(tmp_path / "run", photos, {f"gradcam/{name}": cams for name in layers},
                   status=[DONE, PENDING, FAILED, DONE, DONE])
    written = render(run)
    assert len(written) == 3 * 2
    assert sorted(written) == sorted((run / "pictures").iterdir())
    stems = {p.name.split("__")[0] for p in written}
    assert stems == {"p0-0", "p3-3", "p4-4"}
    assert {p.name.split("__")[1] for p in written} == {"layer4.2.conv3", "features_-1"}
    assert all(p.name.endswith("__gradcam.png") for p in written)
    assert len(render(run, max_images=2)) == 2 * 2


def test_names_from_hostile_paths_stay_inside_pictures(tmp_path):
    photo = gray_photo(tmp_path / "ok.png", 20, 20)
    paths = ["../../etc/passwd.jpg", "/abs/olute/a.jpg", "x/a.jpg", "y/a.jpg",
             "..\\..\\windows\\evil.png", "..", "", "café résumé;rm -rf ~.jpg",
             "a/.hidden.jpg", photo]
    n = len(paths)
    layer = "../../layer[0]/x"
    run = make_run(tmp_path / "deep" / "run", paths,
                   {f"gradcam/{layer.replace('/', '|')}": np.ones((n, 3, 3), np.float32)},
                   sizes=[(20, 20)] * n)
    with h5py.File(run / "results.h5", "r+") as f:  # a layer attribute no writer would make
        next(iter(f["gradcam"].values())).attrs["layer"] = layer
    written = render(run)
    pictures = (run / "pictures").resolve()
    assert len(written) == n == len({p.name for p in written})  # x/a.jpg and y/a.jpg differ
    assert sorted(p.resolve() for p in written) == sorted(pictures.iterdir())
    for p in written:
        assert p.resolve().parent == pictures
        assert SAFE.match(p.name) and ".." not in p.name and not p.name.startswith(".")
    assert not (tmp_path / "etc").exists() and not Path("/abs").exists()
    names = {p.name for p in written}
    assert "passwd-0__layer_0_x__gradcam.png" in names
    assert "cafe_resume_rm_-rf-7__layer_0_x__gradcam.png" in names


def test_safe_name_and_picture_name():
    assert safe_name("../../etc", "x") == "etc"
    assert safe_name("....", "fallback") == "fallback"
    assert safe_name("features[-1]", "x") == "features_-1"
    assert safe_name("a__b  c", "x") == "a_b_c"
    assert picture_name("C:\\photos\\cat.JPG", 7, 3, "layer4", "gradcam") == \
        "cat-007__layer4__gradcam.png"


def test_missing_photo_draws_the_map_alone(tmp_path, caplog):
    cam = peak_cam(7, 7, 0, 6)[None]
    run = make_run(tmp_path / "run", [str(tmp_path / "gone.jpg")], {"gradcam/layer4": cam},
                   sizes=[(70, 105)], boxes=[(0.0, 17.5, 70.0, 87.5)])
    with caplog.at_level(logging.WARNING, logger="pipeline.render"):
        (path,) = render(run, title=False)
    assert "gone.jpg" in caplog.text
    out = read_png(path).astype(int)
    assert out.shape == (70, 70, 3)  # the box the model saw
    y, x = np.unravel_index(np.argmax(out[..., 0] - out[..., 2]), out.shape[:2])
    assert y < 10 and x > 60
    (titled,) = render(run, title=True)
    assert read_png(titled).shape[0] > 70


def banner_height(width: int, parts: list[str]) -> int:
    """Rows add_title puts above a 10-row picture of ``width`` pixels."""
    return add_title(np.zeros((10, width, 3), np.uint8), parts).shape[0] - 10


def test_title_is_a_banner_above_the_picture(tmp_path):
    photo = gray_photo(tmp_path / "p.png", 80, 96)
    run = make_run(tmp_path / "run", [photo], {"gradcam/layer4": peak_cam(7, 7, 3, 3)[None]})
    (plain,) = render(run, title=False)
    bare = read_png(plain)
    (titled,) = render(run, title=True)
    pic = read_png(titled)
    banner = pic.shape[0] - bare.shape[0]
    assert pic.shape[1] == bare.shape[1] and banner >= 12
    np.testing.assert_array_equal(pic[banner:], bare)  # the picture itself is untouched
    text = pic[:banner]
    assert text.max() > 200 and np.median(text) < 40  # white letters on a dark strip


def test_long_titles_wrap_on_narrow_pictures():
    """Widths far from any wrap boundary, so font metrics cannot decide the outcome: this
    title measures about 300 px at the font of a 600-px picture (590 px of room), and its
    first part alone is wider than the 54 px of room of a 60-px picture."""
    title = ["285 Egyptian cat", "p=0.82", "[x]"]
    assert banner_height(600, title) == banner_height(600, ["x"])  # one line
    narrow = add_title(np.zeros((40, 60, 3), np.uint8), title)
    assert narrow.shape[1] == 60  # wraps (and cuts) instead of running off the edge
    assert banner_height(60, title) > banner_height(60, ["x"])  # more than one line
    # Both at the smallest font: the narrower picture never gets the shorter banner.
    assert banner_height(60, title) >= banner_height(330, title)


def test_title_text_names_class_probability_and_top1(tmp_path):
    photos = [gray_photo(tmp_path / f"p{i}.png", 20, 20) for i in range(3)]
    run = make_run(tmp_path / "run", photos, {"gradcam/l": np.ones((3, 3, 3), np.float32)})
    with h5py.File(run / "results.h5", "r+") as f:
        f["targets/class"][...] = [0, 7, 9]  # top-1, in the top k, not in the top k
        f["targets/score"][...] = [3.5, 1.25, -0.5]
        labels = _Labels(f)
        assert labels.parts(0) == ["0 class 0", "p=0.60"]
        assert labels.parts(1) == ["7 class 7", "p=0.30", "(top-1: 1 class 1 0.60)"]
        assert labels.parts(2) == ["9 class 9", "logit=-0.50", "(top-1: 2 class 2 0.60)"]
        f.attrs["categories"] = "[]"  # a model without class names
        assert _Labels(f).parts(0)[0] == "0"


def test_saliency_picture_places_map_beside_the_photo(tmp_path):
    sal = np.zeros((1, 32, 32), np.float32)
    sal[0, 4:8, 24:28] = 1.0  # top right of what the model saw
    photo = gray_photo(tmp_path / "p.png", 60, 120)
    run = make_run(tmp_path / "run", [photo], {"saliency/input": sal}, method="saliency",
                   boxes=[(0.0, 30.0, 60.0, 90.0)])
    (path,) = render(run, title=False)
    assert path.name == "p-0__input__saliency.png"
    out = read_png(path).astype(int)
    assert out.shape == (60, 60 * 2 + 2, 3)  # two 60 x 60 panels: the box, then the map
    assert (out[:, :60] == 128).all()
    heat = out[:, 62:].sum(-1)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert y < 60 * 9 / 32 and x > 60 * 22 / 32
    assert heat[50:, :20].max() == 0  # no signal, black
    alone = saliency_picture(sal[0], None, box_hw=(60, 60))
    assert alone.shape == (60, 60, 3)
    big = saliency_picture(sal[0], np.zeros((3000, 4000, 3), np.uint8))
    assert big.shape == (768, 1024 * 2 + 2, 3)  # huge photos are shown at 1024 px


def test_activation_grid_tiles():
    act = np.random.default_rng(0).normal(size=(100, 7, 7)).astype(np.float32)
    act[5] = 3.0  # a constant channel: dark tile, no NaN
    grid = activation_grid(act, 64)
    assert grid_shape(64) == (8, 8) and grid_shape(10) == (3, 4) and grid_shape(1) == (1, 1)
    assert grid.shape == (8 * 49 + 9 * 2, 8 * 49 + 9 * 2, 3)  # 7 px maps -> 49 px tiles
    tile = grid[2:51, 2:51]
    assert (tile.reshape(7, 7, 7, 7, 3) == tile[::7, ::7][:, None, :, None]).all()  # nearest
    # Each channel spans the full colormap on its own: darkest and brightest viridis.
    viridis = cv2.cvtColor(cv2.applyColorMap(np.uint8([[0, 255]]), cv2.COLORMAP_VIRIDIS),
                           cv2.COLOR_BGR2RGB)[0]
    tiles = grid[2:, 2:].reshape(8, 51, 8, 51, 3)[:, :49, :, :49].transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(64, 49 * 49, 3)
    for i in (0, 63):
        assert (tiles[i] == viridis[0]).all(-1).any() and (tiles[i] == viridis[1]).all(-1).any()
    assert (tiles[5] == viridis[0]).all()
    few = activation_grid(np.random.default_rng(1).random((10, 30, 30)), 64)
    assert few.shape == (3 * 60 + 4 * 2, 4 * 60 + 5 * 2, 3)  # 30 px maps -> 60 px tiles


def test_activation_runs_grid_and_pooled(tmp_path, caplog):
    photos = [gray_photo(tmp_path / f"p{i}.png", 30, 30) for i in range(2)]
    pooled = np.random.default_rng(2).random((2, 16, 1, 1)).astype(np.float32)
    maps = {"activations/layer3": np.random.default_rng(0).random((2, 80, 4, 4)).astype(np.float16),
            "activations/fc": np.random.default_rng(1).random((2, 12)).astype(np.float32),
            "activations/avgpool": pooled}
    run = make_run(tmp_path / "run", photos, maps, method="activations")
    written = render(run, grid_channels=16, title=False)
    assert len(written) == 6
    grids = [read_png(p) for p in written if "__layer3__" in p.name]
    assert [g.shape for g in grids] == [(4 * 48 + 5 * 2, 4 * 48 + 5 * 2, 3)] * 2
    # A (C, 1, 1) layer (avgpool) is a bar code of its channels, not a grid of flat tiles.
    strips = [read_png(p) for p in written if "__avgpool__" in p.name]
    np.testing.assert_array_equal(strips[0], activation_strip(pooled[0].reshape(-1)))


# -- with the real extraction --------------------------------------------------------------

@pytest.mark.parametrize("method", ["gradcam", "saliency", "activations"])
def test_render_a_real_run(tmp_path, method):
    folder = tmp_path / "photos"
    write_images(folder, 3)
    write_images(folder / "sub", 1)  # img000.jpg twice, in two folders
    cfg = compose_cfg(*TINY, "data=glob", f"data.pattern={folder}/**/*.jpg", f"method={method}",
                      "model.target_layers=[layer3,layer4]")
    run = tmp_path / "run"
    extract(cfg, run)
    (folder / "img001.jpg").unlink()  # moved away after extraction
    written = render_run(run, cfg.render)
    layers = 1 if method == "saliency" else 2
    assert len(written) == 4 * layers == len(list((run / "pictures").iterdir()))
    for p in written:
        pic = read_png(p)
        assert pic.ndim == 3 and pic.shape[0] > 40
    if method == "gradcam":  # photos are 80 x 96: overlay at full size under the title
        assert all(read_png(p).shape[1] == 96 for p in written)


# -- memory --------------------------------------------------------------------------------

# Runs the command after it as its only child and prints the child's output and peak RSS
# (kB): a fresh parent, so no earlier subprocess of the test session counts.
PEAK_OF_CHILD = """
import resource, subprocess, sys
child = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(child.stderr)
print(child.stdout.strip(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(child.returncode)
"""
RENDER_UNTITLED = """
import sys, types
from pipeline.render import render_run
written = render_run(sys.argv[1], types.SimpleNamespace(title=False))
print(len(written), "torch" in sys.modules)
"""


@pytest.mark.slow
def test_render_memory_does_not_grow_with_the_photo(tmp_path):
    """An 8000 x 8000 JPEG: one float32 RGB copy of it at full size is 768 MB (the old
    full-resolution overlay peaked near 4 GB). Decoded reduced and drawn at MAX_SIDE, the
    whole render process stays under 350 MB (about 240 MB here), and the overlay's hot
    spot is where the map puts it."""
    side = 8000
    huge = tmp_path / "huge.jpg"
    Image.fromarray(photo(5, 250, 250)).resize((side, side), Image.Resampling.BILINEAR).save(
        huge, quality=90)
    sal = np.zeros((1, 32, 32), np.float32)
    sal[0, 4:8, 24:28] = 1.0
    run = make_run(tmp_path / "run", [str(huge)], {"gradcam/layer4": peak_cam(7, 7, 1, 5)[None],
                                                   "saliency/input": sal},
                   sizes=[(side, side)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, sys.executable, "-c",
                           RENDER_UNTITLED, str(run)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, torch_loaded, peak_kb = proc.stdout.split()
    assert (count, torch_loaded) == ("2", "False")
    assert int(peak_kb) / 1024 < 350, f"render peaked at {int(peak_kb) / 1024:.0f} MB"
    overlay = read_png(run / "pictures" / "huge-0__layer4__gradcam.png").astype(int)
    assert overlay.shape == (MAX_SIDE, MAX_SIDE, 3) and MAX_SIDE == 2048
    red = overlay[..., 0] - overlay[..., 2]
    y, x = np.unravel_index(np.argmax(red), red.shape)
    cell = MAX_SIDE / 7
    assert cell <= y < 2 * cell and 5 * cell <= x < 6 * cell  # cell (1, 5) of the 7 x 7 map
    panels = read_png(run / "pictures" / "huge-0__input__saliency.png")
    assert panels.shape == (1024, 2 * 1024 + 2, 3)


# -- every reading stage checks what it reads ----------------------------------------------

def _delete(key: str):
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            del f[key]
    return damage


def _status_7(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        f["images/status"][1] = 7


DAMAGES = {  # name -> (what is done to results.h5, the one line every stage gives)
    "map deleted": (_delete("gradcam/layer4"),
                    r"results.h5 is damaged: /gradcam/layer4 missing \(target_layers: "
                    r"\['layer3', 'layer4'\]\); rerun the extraction with overwrite=true"),
    "box deleted": (_delete("images/box"), r"results.h5 is damaged: /images/box is missing"),
    "score deleted": (_delete("targets/score"),
                      r"results.h5 is damaged: missing targets/score"),
    # store.validate prints the byte as np.uint8(7) today (reported to the format's owner).
    "status byte 7": (_status_7, r"results.h5 is damaged: /images/status holds "
                                 r"(7|np\.uint8\(7\)) at row 1 \(valid: 0 pending, 1 done, "
                                 r"2 failed\)"),
    "shard deleted": (lambda path: (path.parent / "results.shard-1-of-2.h5").unlink(),
                      r"results.h5 is a merge of shards, but results.shard-1-of-2.h5 is "
                      r"missing; restore it, or rerun the shards and stage=merge"),
}


@pytest.fixture(scope="module")
def sound_runs(tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    """A Grad-CAM run at two layers, and the same run made of two merged shards."""
    from pipeline.cli import run

    root = tmp_path_factory.mktemp("damaged")
    write_images(root / "images", 3)
    base = (*TINY, "data=glob", f"data.pattern={root}/images/*.jpg",
            "model.target_layers=[layer3,layer4]")
    run(compose_cfg(*base, "stage=extract"), root / "plain")
    for shard in (0, 1):
        run(compose_cfg(*base, "stage=extract", "data.num_shards=2", f"data.shard={shard}"),
            root / "merged")
    assert (root / "merged" / "results.h5").is_file()
    return root, base


def _damaged(sound_runs, damage: str, to: Path) -> Path:
    import shutil

    root, _ = sound_runs
    shutil.copytree(root / ("merged" if damage == "shard deleted" else "plain"), to)
    DAMAGES[damage][0](to / "results.h5")
    return to


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_reading_stage_refuses_a_damaged_file(sound_runs, damage, tmp_path):
    """render, evaluate and report each stop with the one line of the damage, before they
    draw, score or write anything."""
    from pipeline.cli import run
    from pipeline.errors import StoreError

    _, base = sound_runs
    run_dir = _damaged(sound_runs, damage, tmp_path / "run")
    for stage in ("render", "evaluate", "report"):
        with pytest.raises(StoreError, match=DAMAGES[damage][1]) as caught:
            run(compose_cfg(*base, f"stage={stage}", f"run_dir={run_dir}"), run_dir)
        assert "\n" not in str(caught.value), stage
    assert not (run_dir / "pictures").exists() and not (run_dir / "report").exists()
    assert not (run_dir / "metrics.h5").exists() and not (run_dir / ".metrics-partial.h5").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["render", "evaluate", "report"])
def test_a_damaged_file_is_one_line_and_exit_2_on_the_command_line(sound_runs, stage,
                                                                   tmp_path):
    run_dir = _damaged(sound_runs, "status byte 7", tmp_path / "run")
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), f"stage={stage}",
                           f"run_dir={run_dir}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert re.search(DAMAGES["status byte 7"][1], lines[0])
    assert "Traceback" not in proc.stderr + proc.stdout


class Terminal(io.StringIO):
    """What a terminal's stderr looks like to the progress bar."""

    def isatty(self) -> bool:
        return True


def test_render_shows_progress_on_a_terminal(tmp_path, monkeypatch):
    photos = [gray_photo(tmp_path / f"p{i}.png", 20, 20) for i in range(3)]
    run = make_run(tmp_path / "run", photos, {"gradcam/l": np.ones((3, 3, 3), np.float32)})
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert len(render(run)) == 3
    assert re.search(r"render: 100%.*3/3", terminal.getvalue()), terminal.getvalue()
