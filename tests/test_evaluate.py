"""Evaluate: each metric on a case with a known answer, parity with pytorch-grad-cam's ROAD
imputation, and the stage end to end (metrics in their own file, results.h5 untouched,
stale partial and metrics files refused, stored code never run, one writer at a time)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY, compose_cfg, write_images
from omegaconf import OmegaConf
from peers import require
from torch import nn

from pipeline import evaluate as E
from pipeline.cli import run
from pipeline.errors import ConfigError, DataError, StoreError
from pipeline.evaluate_setup import model_config, read_setup
from pipeline.images import input_box
from pipeline.metrics import common, confidence, perturbation, pointing, road, sanity
from pipeline.metrics.registry import layout
from pipeline.store import CHECKSUMS, identity, open_results
from pipeline.store.checksums import checksummed, row_digests
from pipeline.store.metrics import METRICS_FILE, PARTIAL, Partial, summarize_run

pytestmark = pytest.mark.usefixtures("one_thread")


class RegionMean(nn.Module):
    """Two logits: the mean of channel 0 over a fixed region, and 0. Its score is a known
    linear function of the pixels, so deletion and insertion curves are known exactly."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        return torch.stack([s, torch.zeros_like(s)], 1)


def bottom_half(side: int = 16) -> torch.Tensor:
    region = torch.zeros(side, side)
    region[side // 2:] = 1
    return region


def curves(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, mode: str, steps: int,
           score: str = "logit", baseline: str = "zero") -> torch.Tensor:
    scorer = common.Scorer(model, score, chunk=32)
    target = torch.zeros(len(x), dtype=torch.long)
    base = perturbation.make_baseline(x, baseline)
    return perturbation.perturbation_curves(scorer, x, maps, target, base, steps, mode)


# -- deletion and insertion --------------------------------------------------------------------

def test_constant_map_removes_rows_from_the_top_and_has_the_documented_auc():
    """Ties break in raster order: a constant map deletes row by row from the top. With a
    score reading the bottom half of a 16x16 image of ones, deletion keeps the score for
    the first half of the curve and then falls linearly: AUC 3/4; insertion mirrors: 1/4."""
    model = RegionMean(bottom_half())
    x = torch.ones(2, 3, 16, 16)
    flat = torch.full((2, 16, 16), 0.7)
    deletion = curves(model, x, flat, "deletion", steps=16)
    expected = torch.tensor([1.0] * 9 + [(16 - k) / 8 for k in range(9, 17)])
    torch.testing.assert_close(deletion[0], expected)
    torch.testing.assert_close(perturbation.curve_auc(deletion), torch.full((2,), 0.75))
    insertion = curves(model, x, flat, "insertion", steps=16)
    torch.testing.assert_close(perturbation.curve_auc(insertion), torch.full((2,), 0.25))
    # Softmax probability of logits (s, 0) is sigmoid(s): the same curve through sigmoid.
    prob = curves(model, x, flat, "deletion", steps=16, score="prob")
    torch.testing.assert_close(prob[0], torch.sigmoid(expected))


def test_a_map_of_the_region_deletes_it_first():
    """The region (half of the pixels) as the map: deletion falls to 0 at half the pixels
    (AUC = 1/4, half the region's share), insertion rises there (AUC = 3/4)."""
    region = bottom_half()
    model = RegionMean(region)
    x = torch.ones(1, 3, 16, 16)
    best = region[None].clone()
    auc = perturbation.curve_auc
    assert auc(curves(model, x, best, "deletion", 16)).item() == pytest.approx(0.25)
    assert auc(curves(model, x, best, "insertion", 16)).item() == pytest.approx(0.75)
    # The known first/last point is taken as given, not recomputed.
    scorer = common.Scorer(model, "logit")
    c = perturbation.perturbation_curves(scorer, x, best, torch.zeros(1, dtype=torch.long),
                              torch.zeros_like(x), 4, "deletion", original=torch.tensor([9.0]))
    assert c[0, 0].item() == 9.0 and c[0, -1].item() == 0.0


def test_random_maps_score_chance_level():
    """Random maps remove a random set of pixels: the expected score after removing a
    fraction f is 1 - f for a linear score, so both AUCs average 1/2."""
    gen = torch.Generator().manual_seed(0)
    region = (torch.rand(16, 16, generator=gen) < 0.3).float()
    model = RegionMean(region)
    x = torch.ones(64, 3, 16, 16)
    maps = torch.rand(64, 16, 16, generator=gen)
    for mode in ("deletion", "insertion"):
        auc = perturbation.curve_auc(curves(model, x, maps, mode, steps=16))
        assert auc.mean().item() == pytest.approx(0.5, abs=0.02), mode


def test_saliency_ranks_break_ties_in_raster_order_and_put_nan_last():
    maps = torch.tensor([[[1.0, 2.0], [2.0, math.nan]]])
    assert perturbation.saliency_ranks(maps).tolist() == [[2, 0, 1, 3]]


def test_baselines():
    x = torch.randn(2, 3, 24, 24)
    assert torch.equal(perturbation.make_baseline(x, "zero"), torch.zeros_like(x))
    torch.testing.assert_close(perturbation.make_baseline(x, "mean")[:, :, 5, 7], x.mean((2, 3)))
    flat = torch.full((1, 3, 24, 24), 2.0)
    blurred = perturbation.make_baseline(flat, "blur")
    # A constant stays constant away from the borders (RISE pads with zeros).
    torch.testing.assert_close(blurred[..., 5:19, 5:19], flat[..., 5:19, 5:19])
    assert blurred[0, 0, 0, 0] < 2.0
    with pytest.raises(ConfigError, match="unknown baseline 'gray'"):
        perturbation.make_baseline(x, "gray")


def test_blur_kernel_is_rises_gkern():
    ndimage = require("scipy.ndimage")
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    k1 = perturbation.rise_kernel(11, 5.0).numpy()
    np.testing.assert_allclose(np.outer(k1, k1), ndimage.gaussian_filter(delta, 5), atol=1e-7)


# -- Average Drop / Increase in Confidence -----------------------------------------------------

def test_confidence_terms_on_known_cases():
    model = RegionMean(torch.ones(8, 8))
    scorer = common.Scorer(model, "prob")
    target = torch.zeros(2, dtype=torch.long)
    # Image 0: ones with a constant map -> normalized to zeros -> input x 0 -> logit 0.
    # Image 1: +1 on top, -1 below (logit 0); a map of the top keeps only the +1 half.
    x = torch.ones(2, 3, 8, 8)
    x[1, :, 4:] = -1
    maps = torch.zeros(2, 8, 8)
    maps[0] = 3.0
    maps[1, :4] = 5.0
    original = scorer(x, target)
    out = confidence.explanation_confidence(scorer, x, maps, target, original)
    p0 = torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(out["explanation_score"], torch.sigmoid(torch.tensor([0.0, 0.5])))
    torch.testing.assert_close(out["drop"][0], (p0 - 0.5) / (p0 + 1e-7))
    assert out["drop"][1].item() == 0.0
    assert out["increase"].tolist() == [0.0, 1.0]


# -- ROAD --------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
def test_linear_imputation_equals_pytorch_grad_cams_sparse_solve():
    theirs = require("pytorch_grad_cam.metrics.road")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 20, 18, generator=gen).cumsum(-1)
    keep = (torch.rand(2, 20, 18, generator=gen) > 0.6).float()
    keep[1] = 1
    keep[1, 3:15, 2:12] = 0  # one large hole
    ours = road.linear_impute(x, keep)
    for i in range(2):
        ref = theirs.NoisyLinearImputer(noise=0)(x[i], keep[i])
        torch.testing.assert_close(ours[i], ref, atol=1e-6, rtol=0)
    assert torch.equal(ours[keep[:, None].expand_as(x) > 0], x[keep[:, None].expand_as(x) > 0])


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
def test_road_equals_pytorch_grad_cam_without_noise():
    """Our batched ROAD (noise off) against pytorch-grad-cam's per-image MoRF/LeRF metrics
    with the same percentiles (theirs: 100 - removed) on a small random network."""
    theirs = require("pytorch_grad_cam.metrics.road")
    pc = require("pytorch_grad_cam.metrics.perturbation_confidence")
    targets_mod = require("pytorch_grad_cam.utils.model_targets")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(24, 5)).eval()
    x = torch.randn(3, 3, 14, 14)
    maps = common.normalize_maps(torch.rand(3, 14, 14))
    target = torch.tensor([0, 3, 4])
    removed = [20.0, 70.0]
    morf, lerf = road.road_scores(common.Scorer(model, "prob"), x, maps, target, removed, noise=0.0,
                                  rule="percentile")
    targets = [targets_mod.ClassifierOutputSoftmaxTarget(int(t)) for t in target]
    for j, q in enumerate(removed):
        for ours, remover in ((morf, pc.RemoveMostRelevantFirst),
                              (lerf, pc.RemoveLeastRelevantFirst)):
            metric = pc.PerturbationConfidenceMetric(
                remover(100 - q, theirs.NoisyLinearImputer(noise=0)))
            ref = metric(x, maps.numpy(), targets, model, return_diff=False)
            np.testing.assert_allclose(ours[:, j].numpy(), ref, atol=1e-6)


def test_linear_imputation_edge_cases():
    """Nothing removed: the image itself; everything removed (a constant map ties every
    pixel at the threshold): the normalization's mean colour, not a singular solve."""
    x = torch.randn(2, 3, 6, 5)
    keep = torch.stack([torch.ones(6, 5), torch.zeros(6, 5)])
    out = road.linear_impute(x, keep)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], torch.zeros_like(x[1]))
    flat = torch.ones(1, 6, 5)
    assert not road.road_masks(flat, 50.0, "percentile")[0].any()  # all tied: all removed


def test_road_of_a_constant_image_is_zero():
    """Linear imputation of a constant image is that constant: nothing changes, whatever the
    map, so MoRF = LeRF = the original score."""
    model = RegionMean(torch.ones(12, 12))
    x = torch.full((2, 3, 12, 12), 0.8)
    maps = common.normalize_maps(torch.rand(2, 12, 12))
    scorer = common.Scorer(model, "logit")
    morf, lerf = road.road_scores(scorer, x, maps, torch.zeros(2, dtype=torch.long), [10, 50, 90],
                               noise=0.0, seeds=torch.arange(2))
    torch.testing.assert_close(morf, torch.full_like(morf, 0.8))
    torch.testing.assert_close(lerf, morf)


def test_road_noise_does_not_depend_on_the_batch():
    model = RegionMean(torch.ones(10, 10))
    scorer = common.Scorer(model, "logit")
    x = torch.randn(3, 3, 10, 10)
    maps = common.normalize_maps(torch.rand(3, 10, 10))
    target = torch.zeros(3, dtype=torch.long)
    seeds = torch.tensor([7, 8, 9])
    whole = road.road_scores(scorer, x, maps, target, [50], 0.05, seeds)[0]
    alone = road.road_scores(scorer, x[2:], maps[2:], target[2:], [50], 0.05, seeds[2:])[0]
    torch.testing.assert_close(whole[2:], alone)


def test_road_masks_follow_pytorch_grad_cams_percentile_rule():
    maps = torch.arange(10.0).view(1, 2, 5) / 9
    morf, lerf = road.road_masks(maps, 30.0, "percentile")  # their percentile 70
    thr = np.percentile(maps.numpy(), 70)
    assert torch.equal(morf, maps < thr)
    assert morf.sum().item() == 7 and lerf.sum().item() == 7
    assert not lerf[0, 0, 0] and lerf[0, 1, 4]  # LeRF drops the least relevant pixels


# -- pointing game -----------------------------------------------------------------------------

def test_a_map_equal_to_the_box_hits_with_all_its_energy():
    """A 128 x 192 photo squashed to 64 x 64 (2 and 3 photo pixels per input pixel); the
    box x 30..120, y 20..80 covers input rows 10..39 and columns 10..39 exactly."""
    seen = torch.tensor([input_box((128, 192), 64, "square")], dtype=torch.float32)
    boxes = pointing.pad_boxes([[(30.0, 20.0, 120.0, 80.0)]])
    box_map = torch.zeros(1, 64, 64)
    box_map[0, 10:40, 10:40] = 1.0
    hit, energy = pointing.pointing_game(box_map, seen, boxes)
    assert hit.item() == 1.0 and energy.item() == pytest.approx(1.0)
    # A peak outside the box: 14 photo pixels from it is still a hit, 20 is not.
    peak = torch.zeros(1, 64, 64)
    peak[0, 25, 44] = 1.0  # column 44 -> x = 133.5: 13.5 px right of the box
    assert pointing.pointing_game(peak, seen, boxes)[0].item() == 1.0
    peak = torch.zeros(1, 64, 64)
    peak[0, 25, 46] = 1.0  # x = 139.5: 19.5 px away
    hit, energy = pointing.pointing_game(peak, seen, boxes)
    assert hit.item() == 0.0 and energy.item() == 0.0
    # No boxes: NaN, not a miss.
    hit, energy = pointing.pointing_game(box_map, seen, pointing.pad_boxes([[]]))
    assert math.isnan(hit.item()) and math.isnan(energy.item())


def test_pointing_game_follows_the_center_crop_box():
    """center_crop: the model saw a 175 x 175 square in the middle of a 300 x 200 photo."""
    seen_box = input_box((300, 200), 35, "center_crop")  # y0=62.5, x0=12.5, 5 px per pixel
    seen = torch.tensor([seen_box], dtype=torch.float32)
    box_map = torch.zeros(1, 35, 35)
    box_map[0, 4:10, 20:30] = 2.0  # rows 4..9, columns 20..29
    y0, x0 = seen_box[0], seen_box[1]
    boxes = pointing.pad_boxes([[(x0 + 100, y0 + 20, x0 + 150, y0 + 50), (0.0, 0.0, 1.0, 1.0)]])
    hit, energy = pointing.pointing_game(box_map, seen, boxes)
    assert hit.item() == 1.0 and energy.item() == pytest.approx(1.0)


def test_box_files(tmp_path):
    csv_file = tmp_path / "boxes.csv"
    csv_file.write_text("file,xmin,ymin,xmax,ymax\na.jpg,1,2,3,4\nsub/b.jpg,5,6,7,8\n"
                        "sub/b.jpg,0,0,1,1\n")
    table = pointing.read_boxes_csv(csv_file)
    got = pointing.match_boxes(["/data/x/a.jpg", "/data/sub/b.jpg", "/data/other/b.jpg"], table)
    assert got == [[(1, 2, 3, 4)], [(5, 6, 7, 8), (0, 0, 1, 1)], []]
    loc = tmp_path / "LOC_val_solution.csv"
    loc.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 111 108 "
                   "441 193 n01751748 10 20 30 40 \n")
    boxes = pointing.match_boxes(["/v/ILSVRC2012_val_00000001.JPEG"],
                                 pointing.read_imagenet_boxes(loc), by_stem=True)
    assert boxes == [[(111, 108, 441, 193), (10, 20, 30, 40)]]
    (tmp_path / "bad.csv").write_text("path,x0\n")
    with pytest.raises(DataError, match="header must name"):
        pointing.read_boxes_csv(tmp_path / "bad.csv")


# -- sanity check ------------------------------------------------------------------------------

def test_ranks_and_spearman_match_scipy():
    stats = require("scipy.stats")
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 4, (5, 40), generator=gen).float()  # many ties
    b = torch.randn(5, 40, generator=gen)
    np.testing.assert_array_equal(sanity.rankdata(a).numpy(),
                                  np.stack([stats.rankdata(r) for r in a.numpy()]))
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(5)]
    np.testing.assert_allclose(sanity.spearman(a, b).numpy(), ref, atol=1e-6)
    assert math.isnan(sanity.spearman(torch.ones(1, 9), b[:1, :9]).item())


class Scale(nn.Module):
    """Multiplies the logits by a parameter; its re-initialization sets it to 2."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(()))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.a.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.a


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        self.scale = Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.fc(self.pool(self.relu(self.conv(x))).flatten(1)))


def test_cascading_randomization_from_the_top_with_known_answers():
    """Units come top first (by call order, reversed). Randomizing the logit scale only
    multiplies the Grad-CAM map by 2: rank correlation exactly 1. Randomizing the classifier
    then changes the map; the original weights come back afterwards."""
    from pipeline.methods import GradCAM

    torch.manual_seed(0)
    model = TinyNet().eval().requires_grad_(False)
    x = torch.randn(4, 3, 8, 8)
    units = sanity.randomization_units(model, x[:1])
    assert list(units) == ["scale", "fc", "conv"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = torch.tensor([0, 1, 2, 3])
    randomizer = sanity.CascadingRandomization(units, seed=5)
    with GradCAM(model, {"conv": model.conv}) as cam:
        stored = cam(x, lambda _logits: target)["gradcam/conv"]
        rho = []
        for name in units:
            randomizer.randomize(name)
            rho.append(sanity.spearman(stored, cam(x, lambda _logits: target)["gradcam/conv"]))
        randomizer.restore()
        again = cam(x, lambda _logits: target)["gradcam/conv"]
    torch.testing.assert_close(rho[0], torch.ones(4))
    assert (rho[1] < 0.99).all()
    torch.testing.assert_close(again, stored)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # The same seed gives the same randomized weights (every batch sees the same networks).
    other = sanity.CascadingRandomization(units, seed=5)
    assert all(torch.equal(other.random["fc"][k], randomizer.random["fc"][k])
               for k in randomizer.random["fc"])


# -- the stage ---------------------------------------------------------------------------------

def _datasets(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset)
                     else None)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    """5 photos and a broken file, Grad-CAM of a random resnet18 at two layers."""
    root = tmp_path_factory.mktemp("evaluate")
    images = root / "images"
    write_images(images, 5, size=(96, 128))
    (images / "broken.jpg").write_text("not an image")
    (root / "boxes.csv").write_text("file,xmin,ymin,xmax,ymax\nimg001.jpg,10,10,60,50\n"
                                    "img003.jpg,0,0,128,96\n")
    base = (*TINY, "data=glob", f"data.pattern={images}/*.jpg",
            "model.target_layers=[layer3,layer4]")
    run(compose_cfg(*base, "stage=extract"), root / "run")
    return root, base


def _copy(tiny_run: tuple[Path, tuple[str, ...]], to: Path) -> Path:
    """The extracted run, without metrics of an earlier test."""
    shutil.copytree(tiny_run[0] / "run", to)
    (to / METRICS_FILE).unlink(missing_ok=True)
    return to


def test_evaluate_writes_metrics_to_their_own_file(tiny_run, tmp_path):
    _, base = tiny_run
    root = tiny_run[0]
    run_dir = _copy(tiny_run, tmp_path / "run")
    path = run_dir / "results.h5"
    before, digest = _datasets(path), _sha256(path)
    (run_dir / f".{METRICS_FILE}.tmp-4242").write_bytes(b"left by a killed evaluation")
    options = ("stage=evaluate", f"run_dir={run_dir}", "evaluate.steps=4",
               "evaluate.road_percentiles=[50]", "evaluate.sanity_max_steps=3",
               f"evaluate.boxes={root}/boxes.csv")
    result = run(compose_cfg(*base, *options), run_dir)
    assert result["evaluated"] == 5 and result["metrics"] == str(run_dir / METRICS_FILE)
    with open_results(path) as f:
        status = f["images/status"][:]
        results = identity(f)
    with h5py.File(run_dir / METRICS_FILE) as m:
        assert m.attrs["format"] == "camsweep-metrics" and m.attrs["format_version"] == 2
        assert (m.attrs["results_run_id"], m.attrs["results_created"]) == (
            results["run_id"], results["created"]) and len(results["run_id"]) == 32
        assert float(m.attrs["score_check_max_abs_diff"]) < 1e-3  # images and model reproduced
        assert m.attrs["sanity_layers"] == '["fc", "layer4.1", "layer4.0"]'
        for layer in ("layer3", "layer4"):
            g = m[f"gradcam/{layer}"]
            assert g.attrs["layer"] == layer
            shapes = {k: g[k].shape for k in g}
            assert shapes["deletion"] == shapes["insertion"] == (6, 5)
            assert shapes["road_morf"] == (6, 1) and shapes["sanity_spearman"] == (6, 3)
            done = status == 1
            for key in ("deletion_auc", "insertion_auc", "drop", "increase", "road"):
                values = g[key][:]
                assert np.isfinite(values[done]).all() and np.isnan(values[~done]).all(), key
            hits = g["pointing_hit"][:]
            assert np.isfinite(hits).sum() == 2  # two images have boxes
            assert np.nanmax(np.abs(g["sanity_spearman"][:])) <= 1 + 1e-6
            assert g["deletion"].attrs["dims"] == '["image", "step"]'
    assert not (run_dir / PARTIAL).exists()
    assert not list(run_dir.glob(f".{METRICS_FILE}.tmp-*"))
    # results.h5 is not written at all: the same bytes, the same arrays, no /metrics.
    assert _sha256(path) == digest
    after = _datasets(path)
    assert before.keys() == after.keys() and not any(k.startswith("metrics") for k in after)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)

    # An existing metrics file is never replaced silently.
    with pytest.raises(StoreError, match=r"metrics.h5 already holds metrics \(from .*\); pass "
                                         "evaluate.overwrite=true"):
        run(compose_cfg(*base, *options), run_dir)
    result = run(compose_cfg(*base, "stage=evaluate", f"run_dir={run_dir}", "evaluate.steps=2",
                             "evaluate.metrics=[deletion]", "evaluate.overwrite=true"), run_dir)
    with h5py.File(run_dir / METRICS_FILE) as m:
        # The outputs, beside the group's axes (dimension scales: image paths, steps).
        assert sorted(m["gradcam/layer4"]) == ["deletion", "deletion_auc", "image", "step"]
        assert m["gradcam/layer4/deletion"].shape == (6, 3)
    assert _sha256(path) == digest


def _partial_of(cfg, run_dir: Path, metrics: list[str], rows: np.ndarray, value: float) -> None:
    """A partial file as a killed evaluation leaves it: ``rows`` done, holding ``value``."""
    setup = read_setup(cfg, run_dir / "results.h5", torch.device("cpu"))
    settings = E._settings(cfg, setup, {})
    spec = layout(settings, setup.maps, metrics)
    side = Partial(run_dir / PARTIAL, setup.n, settings, setup.results, spec)
    side.write(rows, {"gradcam/layer3/deletion": np.full((len(rows), 4), value, np.float32)})
    side.close()


def test_evaluate_resumes_from_its_partial_file(tiny_run, tmp_path):
    """A killed evaluation leaves the side file; the rerun computes only what is missing and
    gives the same numbers."""
    _, base = tiny_run
    run_dir = _copy(tiny_run, tmp_path / "run")
    options = ("stage=evaluate", f"run_dir={run_dir}", "evaluate.steps=3",
               "evaluate.metrics=[deletion,confidence]", "batch_size=2")
    run(compose_cfg(*base, *options), run_dir)
    with h5py.File(run_dir / METRICS_FILE) as m:
        clean = m["gradcam/layer3/deletion"][:]
    (run_dir / METRICS_FILE).unlink()
    # Pretend the first run died after its first batch: keep that batch in the side file.
    cfg = compose_cfg(*base, *options)
    partial_rows = np.array([1, 2])
    _partial_of(cfg, run_dir, ["deletion", "confidence"], partial_rows, 42.0)
    result = run(cfg, run_dir)
    assert result["evaluated"] == 3  # rows 1 and 2 were done
    with h5py.File(run_dir / METRICS_FILE) as m:
        resumed = m["gradcam/layer3/deletion"][:]
    np.testing.assert_array_equal(resumed[3:], clean[3:])
    assert (resumed[partial_rows] == 42.0).all()  # taken from the side file, not recomputed


def test_a_re_extracted_run_gets_no_stale_rows_and_old_metrics_are_refused(tiny_run,
                                                                          tmp_path):
    """overwrite=true replaces results.h5 (same settings, same N, new identity): the partial
    file of the old one is discarded, not installed; its metrics.h5 is refused by readers
    until evaluate runs again, which then replaces it without asking."""
    from pipeline.report import report

    _, base = tiny_run
    run_dir = _copy(tiny_run, tmp_path / "run")
    options = ("stage=evaluate", f"run_dir={run_dir}", "evaluate.steps=3",
               "evaluate.metrics=[deletion,confidence]")
    cfg = compose_cfg(*base, *options)
    run(cfg, run_dir)
    with h5py.File(run_dir / METRICS_FILE) as m:
        clean = m["gradcam/layer3/deletion"][:]
    _partial_of(cfg, run_dir, ["deletion", "confidence"], np.array([0, 1, 2]), 42.0)
    with open_results(run_dir / "results.h5") as f:
        old = identity(f)
    run(compose_cfg(*base, "stage=extract", f"run_dir={run_dir}", "overwrite=true",
                    "resume=false"), run_dir)
    with open_results(run_dir / "results.h5") as f:
        new = identity(f)
    assert new["run_id"] != old["run_id"]
    stale = re.escape(f"{run_dir}/metrics.h5 is stale: computed from an earlier results.h5 "
                      f"(created {old['created']}; the current one was created "
                      f"{new['created']}); rerun stage=evaluate run_dir={run_dir}") + "$"
    with pytest.raises(StoreError, match=stale):
        summarize_run(run_dir)
    with pytest.raises(StoreError, match=stale):
        report(run_dir)
    assert not (run_dir / "report").exists()
    result = run(cfg, run_dir)  # no evaluate.overwrite needed: the old file describes nothing
    assert result["evaluated"] == 5
    with h5py.File(run_dir / METRICS_FILE) as m:
        fresh = m["gradcam/layer3/deletion"][:]
        assert m.attrs["results_run_id"] == new["run_id"]
    assert not (fresh == 42.0).any()  # nothing of the old partial file
    np.testing.assert_allclose(fresh, clean, rtol=1e-5, atol=1e-6)  # same model, same images
    assert summarize_run(run_dir)[0].n == 5


def test_evaluate_refuses_what_it_cannot_score(tiny_run, tmp_path):
    root, base = tiny_run
    with pytest.raises(ConfigError, match="unknown evaluate.maps entry 'gradcam/layer5'; "
                                          "did you mean 'gradcam/layer4' or 'gradcam/layer3'"):
        run(compose_cfg(*base, "stage=evaluate", f"run_dir={root}/run",
                        "evaluate.maps=[gradcam/layer5]", "evaluate.overwrite=true"),
            root / "run")
    with pytest.raises(ConfigError, match="unknown evaluate metric 'delition'"):
        run(compose_cfg(*base, "stage=evaluate", f"run_dir={root}/run",
                        "evaluate.metrics=[delition]"), root / "run")
    act = tmp_path / "act"
    run(compose_cfg(*base, "stage=extract", "method=activations", "data.limit=2"), act)
    with pytest.raises(StoreError, match="holds no attribution maps"):
        run(compose_cfg(*base, "stage=evaluate", f"run_dir={act}"), act)
    with pytest.raises(StoreError, match=f"no results file at {tmp_path}/nowhere/results.h5"):
        run(compose_cfg(*base, "stage=evaluate", f"run_dir={tmp_path}/nowhere"),
            tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_evaluate_waits_for_no_writer(tiny_run, tmp_path):
    """Another process holding the run's writer lock (an extract, a merge, a second
    evaluate) makes evaluate fail at once with one line; nothing is written."""
    _, base = tiny_run
    run_dir = _copy(tiny_run, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pipeline.locks import writer_lock\n"
         "with writer_lock(sys.argv[1], 'extracting'):\n"
         "    print('held', flush=True)\n    sys.stdin.read()\n", str(run_dir / "results.h5")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match=r"another camsweep process \(pid \d+ on .*, "
                                             r"extracting\)"):
            run(compose_cfg(*base, "stage=evaluate", f"run_dir={run_dir}",
                            "evaluate.metrics=[deletion]", "evaluate.steps=2"), run_dir)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (run_dir / METRICS_FILE).exists() and not (run_dir / PARTIAL).exists()


def _forge(run_dir: Path, **model: object) -> None:
    """Rewrite the model part of the config stored in a results file, as an attacker could."""
    with h5py.File(run_dir / "results.h5", "r+") as f:
        stored = yaml.safe_load(f.attrs["config"])
        stored["model"].update(model)
        f.attrs["config"] = yaml.safe_dump(stored)


def test_a_stored_target_is_never_imported_unless_the_command_line_names_it(tiny_run,
                                                                             tmp_path):
    _, base = tiny_run
    run_dir = _copy(tiny_run, tmp_path / "run")
    marker = tmp_path / "MARKER"
    _forge(run_dir, _target_="os.system", kwargs={"command": f"touch {marker}"})
    refusal = (r"asks to import and call model._target_='os.system'; a results file does not "
               r"choose code to run: pass model._target_=os.system on the evaluate command line")
    with pytest.raises(ConfigError, match=refusal):
        run(compose_cfg(*base, "stage=evaluate", f"run_dir={run_dir}"), run_dir)
    assert not marker.exists()
    # Through the real command line: exit 2, one line, no traceback, nothing ran.
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "stage=evaluate",
                           f"run_dir={run_dir}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "os.system" in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not marker.exists() and not (run_dir / METRICS_FILE).exists()


def test_a_stored_target_is_allowed_by_the_same_one_on_the_command_line(tmp_path):
    stored = OmegaConf.create({"model": {"name": "custom", "weights": None,
                                         "_target_": "torchvision.models.resnet18",
                                         "kwargs": {"num_classes": 3}}})
    path = tmp_path / "results.h5"
    allowed = model_config(stored, compose_cfg("model=custom"), path)
    assert allowed._target_ == "torchvision.models.resnet18" and allowed.kwargs.num_classes == 3
    for other in (compose_cfg(*TINY), compose_cfg("model=custom",
                                                  "model._target_=torchvision.models.vgg16")):
        with pytest.raises(ConfigError, match="model._target_='torchvision.models.resnet18'"):
            model_config(stored, other, path)
    plain = OmegaConf.create({"model": {"name": "resnet18", "weights": None}})
    assert model_config(plain, compose_cfg(*TINY), path).name == "resnet18"


def test_stored_interpolations_are_text_not_resolvers(tiny_run, tmp_path):
    """``${oc.env:...}`` in a stored config would run a resolver when read; it stays text."""
    _, base = tiny_run
    run_dir = _copy(tiny_run, tmp_path / "run")
    _forge(run_dir, weights="${oc.env:HOME}")
    with pytest.raises(ConfigError, match=r"model.weights='\$\{oc.env:HOME\}' is neither"):
        run(compose_cfg(*base, "stage=evaluate", f"run_dir={run_dir}"), run_dir)


def test_topk_runs_are_scored_per_class(tmp_path, image_dir):
    """target=topk stores k maps per image; each (image, class) is scored as the run that
    explains that class alone would be."""
    common_args = (*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg", "data.limit=2")
    # prob, as before evaluate.score followed the run's target.score: the two runs' maps
    # differ by float rounding (~5e-7), which can swap near-tied pixels in the deletion order;
    # on logits (~2) that moves a curve point by ~5e-3, on this random net's probabilities
    # (~1e-3) by less than the tolerance.
    metrics = ("evaluate.metrics=[deletion,confidence,road,sanity]", "evaluate.steps=4",
               "evaluate.road_percentiles=[50]", "evaluate.sanity_max_steps=2",
               "evaluate.score=prob")
    top = tmp_path / "top"
    run(compose_cfg(*common_args, "stage=extract", "target=topk", "target.k=2"), top)
    run(compose_cfg(*common_args, "stage=evaluate", f"run_dir={top}", *metrics), top)
    with h5py.File(top / "results.h5") as f:
        cls = f["targets/class"][:]
    with h5py.File(top / METRICS_FILE) as m:
        g = m["gradcam/layer4"]
        assert g["deletion"].shape == (2, 2, 5) and g["sanity_spearman"].shape == (2, 2, 2)
        assert g["deletion"].attrs["dims"] == '["image", "class", "step"]'
        assert m["score"].shape == (2, 2)
        by_class = {k: g[k][0, 1] for k in ("deletion_auc", "drop", "road", "sanity_spearman")}
    one = tmp_path / "one"
    run(compose_cfg(*common_args, "stage=extract", "target=class",
                    f"target.index={int(cls[0, 1])}", "data.limit=1"), one)
    run(compose_cfg(*common_args, "stage=evaluate", f"run_dir={one}", *metrics), one)
    with h5py.File(one / METRICS_FILE) as m:
        g = m["gradcam/layer4"]
        for key, value in by_class.items():
            np.testing.assert_allclose(g[key][0], value, rtol=1e-4, atol=1e-5, err_msg=key)
    summary = summarize_run(top)
    assert summary[0].n == 2 and np.isfinite(summary[0].figures["deletion_auc"])


def test_score_check_tolerance_follows_the_stored_precision(tmp_path):
    """bf16 logits come in steps of ~2^-7 of their size: a bf16 run whose stored scores are
    two such steps off (as a GPU's may be) is evaluated without the note, an fp32 run
    with the same offset gets it, and so does a bf16 run whose weights changed."""
    import torchvision

    write_images(tmp_path / "images", 4)
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, weights)
    base = (*TINY, "data=glob", f"data.pattern={tmp_path}/images/*.jpg",
            f"model.weights={weights}")
    evaluate = ("stage=evaluate", "evaluate.metrics=[deletion]", "evaluate.steps=2",
                "evaluate.overwrite=true", "batch_size=3")
    note = "do not reproduce the stored target scores"

    def notes(run_dir: Path, *precision: str) -> str:
        cfg = compose_cfg(*base, *precision, *evaluate, f"run_dir={run_dir}")
        return " ".join(E.evaluate(cfg, run_dir).notes)

    def shift(run_dir: Path) -> float:
        with h5py.File(run_dir / "results.h5", "r+") as f:
            score = f["targets/score"][:]
            step = float(2.0 ** (np.floor(np.log2(np.abs(score).max())) - 7))
            f["targets/score"][:] = score + 2 * step
            # As another device's run stores them: checksums of the scores it wrote.
            sums = f[CHECKSUMS][:]
            sums[:, checksummed(f)["targets/score"]] = row_digests(f["targets/score"][:])
            f[CHECKSUMS][:] = sums
        return step

    for precision in ("bf16", "fp32"):
        run(compose_cfg(*base, f"precision={precision}", "stage=extract"), tmp_path / precision)
    bf16 = tmp_path / "bf16"
    assert note not in notes(bf16, "precision=bf16")
    assert shift(bf16) >= 2**-7  # at least 0.016 off, beyond the old 1e-2 absolute limit
    assert note not in notes(bf16, "precision=bf16")
    shift(tmp_path / "fp32")
    assert note in notes(tmp_path / "fp32", "precision=fp32")
    state["fc.weight"] *= 1.5
    torch.save(state, weights)
    assert note in notes(bf16, "precision=bf16")


def test_road_noise_is_drawn_on_the_cpu_per_image():
    """An image's noise is its CPU generator's draw, whatever its batch and the device
    asked for (CUDA's generator would give other numbers for the same seed)."""
    seeds = torch.tensor([7, 8, 9])
    whole = road.road_noise((3, 3, 5, 5), seeds, 1, torch.device("cpu"))
    alone = road.road_noise((1, 3, 5, 5), seeds[2:], 1, "cpu")
    torch.testing.assert_close(whole[2:], alone, rtol=0, atol=0)
    expect = torch.randn((3, 5, 5), generator=torch.Generator().manual_seed(9 * 1009 + 1))
    torch.testing.assert_close(whole[2], expect, rtol=0, atol=0)
    meta = road.road_noise((3, 3, 5, 5), seeds, 1, "meta")  # moved, not drawn, there
    assert meta.device.type == "meta" and meta.shape == whole.shape
    like = torch.zeros(3, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(road._noise(like, seeds, 1), whole.double(), rtol=0, atol=0)


def test_average_drop_takes_a_confidence_whatever_score_the_other_metrics_take(tiny_run,
                                                                                tmp_path):
    """Average Drop / Increase in Confidence are defined on a probability (Grad-CAM++): a
    logit run, scored by logits or log-probabilities elsewhere, gets the same drop and
    increase as scoring by probabilities, and drops lie in [0, 1]; deletion differs."""
    _, base = tiny_run
    run_dir = _copy(tiny_run, tmp_path / "run")
    found = {}
    for score in ("logit", "logprob", "prob"):
        run(compose_cfg(*base, "stage=evaluate", f"run_dir={run_dir}", "evaluate.steps=4",
                        "evaluate.metrics=[deletion,confidence]", f"evaluate.score={score}",
                        "evaluate.overwrite=true"), run_dir)
        with h5py.File(run_dir / METRICS_FILE) as m:
            assert json.loads(m.attrs["settings"])["confidence_score"] == "prob"
            found[score] = {k: m[f"gradcam/layer4/{k}"][:] for k in ("drop", "increase",
                                                                    "deletion_auc")}
    done = np.isfinite(found["prob"]["drop"])
    assert done.sum() == 5 and (found["prob"]["drop"][done] >= 0).all()
    assert (found["prob"]["drop"][done] <= 1).all()
    for score in ("logit", "logprob"):
        for key in ("drop", "increase"):
            np.testing.assert_array_equal(found[score][key], found["prob"][key], err_msg=key)
        assert not np.allclose(found[score]["deletion_auc"][done],
                               found["prob"]["deletion_auc"][done])
