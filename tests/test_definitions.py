"""The definitions camsweep computes by default, pinned with hand-derived numbers: what is
explained (``target.score``), Grad-CAM++'s eq. 19, Score-CAM's upsampling, ROAD's pixel
count; and the peers' conventions where they differ, as explicit options.

Each score function is checked by hand on logits, through the methods' gradients on a
linear model, against models that apply the function themselves (every method), against
pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget``, in the results file, in the run's
fingerprint and in the evaluate stage.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY, compose_cfg, write_images
from peers import require
from torch import nn

from pipeline.cli import run
from pipeline.config import validate
from pipeline.errors import ConfigError, RunRefused
from pipeline.methods import (
    METHODS,
    GradCAM,
    GradCAMPlusPlus,
    Saliency,
    ScoreCAM,
    SmoothGrad,
    target_fn,
    target_score,
)
from pipeline.methods.scorecam import channel_masks
from pipeline.metrics import road
from pipeline.metrics.common import Scorer

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the score functions -----------------------------------------------------------------------

def test_each_score_function_by_hand():
    """z = (2, 0, -1), class 0: e^2 + 1 + e^-1 = 8.756935; softmax 7.389056 / 8.756935."""
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([0])
    expected = {"logit": 2.0, "prob": 0.8437947345, "logprob": -0.1698460196,
                "sigmoid": 0.8807970780}
    for kind, value in expected.items():
        assert target_score(logits, t, kind).item() == pytest.approx(value, abs=1e-7), kind
        assert Scorer(nn.Identity(), kind).from_logits(logits, t).item() == pytest.approx(
            value, abs=1e-7)
    # log_softmax, not log(softmax): finite where the probability underflows to 0.
    far = torch.tensor([[0.0, 200.0]])
    assert target_score(far, t, "logprob").item() == pytest.approx(-200.0)
    with pytest.raises(ConfigError, match="target.score.*'logprob'"):
        target_score(logits, t, "logprobs")


class Linear2(nn.Module):
    """z = W x for a 1 x 1 x 2 input x; W = [[1, 2], [3, -1]]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


# x = (1, 0): z = (1, 3), p = softmax(z) = (0.119203, 0.880797); class 0 is explained.
# dz_0/dx = W_0 = (1, 2); d log p_0/dx = W_0 - p_0 W_0 - p_1 W_1 = p_1 (W_0 - W_1) =
# 0.880797 (-2, 3); d p_0/dx = p_0 d log p_0/dx; d sigmoid(z_0)/dx = s (1 - s) W_0, s = 0.731059.
LINEAR_GRADIENTS = {
    "logit": (1.0, 2.0),
    "logprob": (-1.7615941560, 2.6423912339),
    "prob": (-0.2099871708, 0.3149807562),
    "sigmoid": (0.1966119332, 0.3932238665),
}


@pytest.mark.parametrize("kind", list(LINEAR_GRADIENTS))
def test_gradient_of_each_score_on_a_linear_model_by_hand(kind):
    model = Linear2()
    x = torch.tensor([[[[1.0, 0.0]]]])
    expected = torch.tensor([[[LINEAR_GRADIENTS[kind]]]])  # (N, C, H, W) = (1, 1, 1, 2)
    with Saliency(model, {}, score=kind) as method:
        out = method(x, target_fn(0))
    torch.testing.assert_close(out["saliency/input"], expected[:, 0].abs(), rtol=1e-6, atol=1e-7)
    # SmoothGrad without noise: the signed gradient, through the batched-points path.
    with SmoothGrad(model, {}, score=kind, samples=1, sigma=0.0,
                    save_attribution=True) as method:
        out = method(x, target_fn(0))
    torch.testing.assert_close(out["smoothgrad_attribution/input"], expected,
                               rtol=1e-6, atol=1e-7)
    z0 = {"logit": 1.0, "prob": 0.1192029220, "logprob": -2.1269280110,
          "sigmoid": 0.7310585786}[kind]
    assert out["targets/score"].item() == pytest.approx(z0, abs=1e-7)


class Head(nn.Module):
    """A small CNN with ReLU modules (guided methods need them) and the hooked layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


OUTPUTS = {"prob": nn.Softmax(1), "logprob": nn.LogSoftmax(1), "sigmoid": nn.Sigmoid()}
# Every method whose numbers depend on the explained score (Eigen-CAM and the activations
# do not), with options that keep it quick.
SCORED = {"gradcam": {}, "gradcampp": {}, "xgradcam": {}, "layercam": {}, "hirescam": {},
          "scorecam": {"batch_masks": 5}, "saliency": {}, "smoothgrad": {"samples": 3},
          "integrated_gradients": {"steps": 3}, "guided_backprop": {},
          "guided_gradcam": {}}


@pytest.mark.parametrize("kind", list(OUTPUTS))
@pytest.mark.parametrize("name", list(SCORED))
def test_every_method_explains_the_chosen_score(name, kind):
    """``target.score=<f>`` on a model gives exactly the method's arrays for the model whose
    last module applies f and whose output is explained as is (``logit``): every pass of
    every method (forward, backward, masked inputs, noisy inputs, path points) scores by f."""
    base = Head()
    wrapped = nn.Sequential(base, OUTPUTS[kind]).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    layers = {"conv2": base.net[3]}
    cls = METHODS[name]
    with cls(base, layers, score=kind, **SCORED[name]) as method:
        ours = method(x, target_fn(1))
    with cls(wrapped, layers, **SCORED[name]) as method:
        ref = method(x, target_fn(1))
    with cls(base, layers, **SCORED[name]) as method:
        logit = method(x, target_fn(1))
    maps = [k for k in ours if not k.startswith(("predictions/", "targets/"))]
    assert maps
    for key in (*maps, "targets/score"):
        scale = float(ref[key].abs().max())
        assert scale > 0, key
        assert float((ours[key] - ref[key]).abs().max()) <= 1e-5 * scale, (name, kind, key)
    # ... and the score changes the map: a test that any score passed would prove nothing.
    differs = max(float((ours[k] - logit[k]).abs().max() / logit[k].abs().max()) for k in maps)
    assert differs > 1e-3, (name, kind)


def normalized(cams: torch.Tensor, size: int) -> np.ndarray:
    """pytorch-grad-cam's post-processing of one layer (ReLU, min-max, cv2 resize)."""
    scale_cam_image = require("pytorch_grad_cam.utils.image").scale_cam_image
    scaled = scale_cam_image(np.maximum(cams.numpy(), 0), (size, size))
    return scale_cam_image(np.maximum(scaled, 0))


def test_prob_equals_pytorch_grad_cams_softmax_target():
    """Grad-CAM and Grad-CAM++ (with its eps) of ``target.score=prob`` are pytorch-grad-cam's
    with ``ClassifierOutputSoftmaxTarget``; Score-CAM's too (with its align_corners)."""
    pgc = require("pytorch_grad_cam")
    targets_mod = require("pytorch_grad_cam.utils.model_targets")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref_model = copy.deepcopy(model).requires_grad_(True)
    for cls, ref_cls, options in ((GradCAM, pgc.GradCAM, {}),
                                  (GradCAMPlusPlus, pgc.GradCAMPlusPlus, {"eps": 1e-6})):
        with cls(model, {"layer4": model.layer4}, score="prob", **options) as method:
            out = method(x, target_fn("pred"))
        targets = [targets_mod.ClassifierOutputSoftmaxTarget(int(t))
                   for t in out["targets/class"]]
        with ref_cls(ref_model, [ref_model.layer4]) as cam:
            ref = cam(x, targets)
        ours = out[f"{cls.name}/layer4"]
        assert float(ours.max()) > 0
        assert np.abs(normalized(ours, 64) - ref).max() <= 1e-5, cls.name
    torch.testing.assert_close(out["targets/score"], out["predictions/prob"][:, 0])

    small = Head()
    ref_small = copy.deepcopy(small).requires_grad_(True)
    with ScoreCAM(small, {"1": small.net[1]}, score="prob", align_corners=True) as method:
        out = method(x[:, :, :8, :8], target_fn(2))
    with pgc.ScoreCAM(ref_small, [ref_small.net[1]]) as cam, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cam(x[:, :, :8, :8], [targets_mod.ClassifierOutputSoftmaxTarget(2)] * 2)
    assert np.abs(normalized(out["scorecam/1"], 8) - ref).max() <= 1e-5


# -- Grad-CAM++: eq. 19 ------------------------------------------------------------------------

class GapLinear(nn.Module):
    """The input is the layer's activation A (2 channels, 2 x 2); S = v . GAP(A), so
    dS/dA_c = v_c / 4 at every position: g = (1e-3, 5e-4) for v = (4e-3, 2e-3)."""

    def __init__(self, v: tuple[float, float]) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([v, (0.0, 0.0)]))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer(x).mean(dim=(2, 3)))


A = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # sums 10 and 2


def test_gradcampp_is_eq_19_at_small_gradients():
    """g = 1e-3 (sum A = 10), g = 5e-4 (sum A = 2), constant over the 2 x 2 map:
    a = g^2 / (2 g^2 + sum(A) g^3) = 1 / (2 + sum(A) g) = 1/2.01, 1/2.001, and
    w = 4 g a = 4e-3 / 2.01 = 1.990050e-3, 2e-3 / 2.001 = 9.995002e-4 (ratio 0.502).
    pytorch-grad-cam's eps = 1e-6 in the denominator is as large as 2 g^2 here:
    a = 1e-6 / 3.01e-6 and 2.5e-7 / 1.50025e-6, w = 1.328904e-3, 3.332778e-4 (ratio 0.251)."""
    model = GapLinear((4e-3, 2e-3))
    with GradCAMPlusPlus(model, {"layer": model.layer}) as method:
        out = method(A, target_fn(0))
    paper = torch.tensor([[1.9900497512e-3, 9.9950024988e-4]])
    torch.testing.assert_close(out["gradcampp_weights/layer"], paper, rtol=2e-6, atol=0)
    torch.testing.assert_close(out["gradcampp/layer"],
                               (paper[0, 0] * A[:, 0] + paper[0, 1] * A[:, 1]).clamp_min(0))
    with GradCAMPlusPlus(model, {"layer": model.layer}, eps=1e-6) as method:
        peer = method(A, target_fn(0))
    torch.testing.assert_close(peer["gradcampp_weights/layer"],
                               torch.tensor([[1.3289036545e-3, 3.3327778704e-4]]),
                               rtol=2e-6, atol=0)

    # The paper's derivation: Y = exp(S), its diagonal 2nd and 3rd derivatives by autograd;
    # w = sum relu(dY/dA) a with a = Y'' / (2 Y'' + sum(A) Y''') equals exp(S) times ours.
    leaf = A.clone().requires_grad_()
    y = torch.exp(model(leaf)[0, 0])
    (d1,) = torch.autograd.grad(y, leaf, create_graph=True)
    d2 = torch.stack([torch.autograd.grad(d1.flatten()[i], leaf, create_graph=True)[0]
                      .flatten()[i] for i in range(8)]).view_as(A)
    d3 = torch.stack([torch.autograd.grad(d2.flatten()[i], leaf, retain_graph=True)[0]
                      .flatten()[i] for i in range(8)]).view_as(A)
    alpha = d2 / (2 * d2 + A.sum(dim=(2, 3), keepdim=True) * d3)
    w = (d1.clamp_min(0) * alpha).sum(dim=(2, 3)).detach()
    torch.testing.assert_close(w / y.detach(), paper, rtol=2e-6, atol=0)


def test_gradcampp_guards_zero_denominators_without_eps():
    """Channel 1 with v = -4: g = -1 and sum(A) g = -2, so 2 g^2 + sum(A) g^3 = 0 with
    g^2 = 1 != 0 (the paper's alpha is infinite, and 0 * inf is NaN): a = 0 there. A channel
    with v = 0 has g = 0 and 0/0: a = 0. Channel 0 keeps eq. 19: w = 4e-3 / 2.01."""
    for v1 in (-4.0, 0.0):
        model = GapLinear((4e-3, v1))
        with GradCAMPlusPlus(model, {"layer": model.layer}) as method:
            out = method(A, target_fn(0))
        torch.testing.assert_close(out["gradcampp_weights/layer"],
                                   torch.tensor([[1.9900497512e-3, 0.0]]), rtol=2e-6, atol=0)
    with pytest.raises(ConfigError, match="method.eps must be >= 0"):
        validate(compose_cfg("method=gradcampp", "method.eps=-1"))


# -- Score-CAM: upsampling as the official code ------------------------------------------------

# Channel 0 = [[0, 1], [2, 3]], channel 1 = 3 - channel 0. Upsampled 2 -> 4 with half-pixel
# centres (align_corners=False), the source coordinates are (0, 0.25, 0.75, 1) (clamped at the
# edges); with align_corners=True (0, 1/3, 2/3, 1). Value = x + 2 y, min 0, max 3.
UP_FALSE = torch.tensor([[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5],
                         [1.5, 1.75, 2.25, 2.5], [2.0, 2.25, 2.75, 3.0]]) / 3
UP_TRUE = torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0],
                        [4.0, 5.0, 6.0, 7.0], [6.0, 7.0, 8.0, 9.0]]) / 9
MAPS = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[3.0, 2.0], [1.0, 0.0]]])


def test_scorecam_masks_by_hand():
    for align, up in ((False, UP_FALSE), (True, UP_TRUE)):
        masks = channel_masks(MAPS, (4, 4), align)
        torch.testing.assert_close(masks[:, 0], torch.stack([up, 1 - up]), rtol=0, atol=1e-7)


class PixelProbe(nn.Module):
    """A layer whose activations are MAPS whatever the input; logits (sum of x, 0): for the
    one-hot image at (0, 1), a masked input's logit 0 is the mask at (0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.layer(MAPS.expand(len(x), -1, -1, -1) + 0 * x[:, :1, :2, :2])
        z0 = x.sum(dim=(1, 2, 3)) + 0 * acts.sum(dim=(1, 2, 3))
        return torch.stack([z0, torch.zeros_like(z0)], 1)


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_scorecam_by_hand(align, kind):
    """Masks at (0, 1): 1/12 and 11/12 (align_corners=False; True: 1/9 and 8/9); logit scores
    are those, prob scores sigmoid of those (softmax of (s, 0)); weights = softmax over the
    two channels; CAM = ReLU(w0 A0 + w1 A1) at the layer's 2 x 2."""
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 1] = 1.0
    s = [1 / 9, 8 / 9] if align else [1 / 12, 11 / 12]
    if kind == "prob":
        s = [1 / (1 + math.exp(-v)) for v in s]
    w0 = 1 / (1 + math.exp(s[1] - s[0]))
    model = PixelProbe()
    with ScoreCAM(model, {"layer": model.layer}, score=kind, align_corners=align) as method:
        out = method(x, target_fn(0))
    torch.testing.assert_close(out["scorecam_weights/layer"], torch.tensor([[w0, 1 - w0]]),
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(out["scorecam/layer"], (w0 * MAPS[0] + (1 - w0) * MAPS[1])[None],
                               rtol=0, atol=1e-6)


# -- ROAD: exactly p % of the pixels -----------------------------------------------------------

# Raster index:   0    1    2    3    4  |  5    6    7    8    9
TIED = torch.tensor([[[0.5, 1.0, 0.5, 0.0, 0.5], [1.0, 0.5, 0.0, 0.5, 0.2]]])


@pytest.mark.parametrize(("removed", "morf", "lerf"), [
    (30, (1, 5, 0), (3, 7, 9)),  # both 1.0s, then the first 0.5; both 0.0s, then the 0.2
    (50, (1, 5, 0, 2, 4), (3, 7, 9, 0, 2)),  # ties: the earlier raster index first
    (25, (1, 5, 0), (3, 7, 9)),  # 2.5 pixels rounds half up to 3
    (15, (1, 5), (3, 7)),  # 1.5 -> 2
])
def test_road_removes_exactly_p_percent_ties_in_raster_order(removed, morf, lerf):
    keep_m, keep_l = road.road_masks(TIED, float(removed))
    for keep, gone in ((keep_m, morf), (keep_l, lerf)):
        expected = torch.ones(10, dtype=torch.bool)
        expected[list(gone)] = False
        assert torch.equal(keep.flatten(), expected), (removed, gone)
    # pytorch-grad-cam's percentile rule removes every pixel tied at its threshold: "30 %"
    # (percentile 70 = 0.5) removes the seven values >= 0.5.
    assert int((~road.road_masks(TIED, 30.0, "percentile")[0]).sum()) == 7


def test_road_count_on_a_grad_cam_sized_map():
    assert road.removed_count(90, 224 * 224) == 45158  # 45158.4
    assert road.removed_count(10, 7) == 1 and road.removed_count(50, 7) == 4  # 0.7, 3.5
    flat = torch.zeros(2, 224, 224)  # all tied: still exactly 90 %
    keep_m, keep_l = road.road_masks(flat, 90.0)
    assert int((~keep_m).sum()) == int((~keep_l).sum()) == 2 * 45158
    assert not keep_m[0, 0, 0] and keep_m[0, -1, -1]  # raster order among ties
    with pytest.raises(ConfigError, match="evaluate.road_rule"):
        validate_evaluate("evaluate.road_rule=percentil")


def validate_evaluate(*overrides: str) -> None:
    from pipeline.evaluate import check_settings

    check_settings(compose_cfg(*overrides).evaluate)


# -- config, file, fingerprint, evaluate ---------------------------------------------------------

def test_score_config_is_checked():
    assert compose_cfg().target.score == "logit"
    for ok in (("target=pred", "target.score=logprob"), ("target=label", "target.score=sigmoid"),
               ("target=class", "target.index=281", "target.score=sigmoid"),
               ("target=topk", "target.score=prob")):
        validate(compose_cfg(*ok))
    with pytest.raises(ConfigError, match=r"unknown target.score 'softmax'.*prob"):
        validate(compose_cfg("target.score=softmax"))
    for mode in ("pred", "topk"):
        with pytest.raises(ConfigError, match=f"target={mode} ranks classes.*target=class"):
            validate(compose_cfg(f"target={mode}", "target.score=sigmoid"))
    with pytest.raises(ConfigError, match="evaluate.score"):
        validate_evaluate("evaluate.score=probs")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("defs")
    write_images(root / "images", 2, size=(64, 64))
    return root / "images"


def _base(images: Path) -> tuple[str, ...]:
    return (*TINY, "data=glob", f"data.pattern={images}/*.jpg", "model.target_layers=[layer4]")


def test_the_score_is_stored_fingerprinted_and_evaluated(images, tmp_path):
    """/targets/score holds the explained score (prob: the top-1 probability of
    /predictions/prob; logprob: its log); resuming with another score is refused; evaluate
    re-scores with the stored score function (a logit compared with a stored log-probability
    would differ by log sum exp(z), ~7 here)."""
    base = _base(images)
    run_dir = tmp_path / "run"
    run(compose_cfg(*base, "stage=extract", "target.score=prob"), run_dir)
    with h5py.File(run_dir / "results.h5", "r") as f:
        np.testing.assert_allclose(f["targets/score"][:], f["predictions/prob"][:, 0],
                                   rtol=1e-6)
        assert "target_score" in f.attrs["fingerprint"]
    with pytest.raises(RunRefused, match=r"target_score: 'prob' -> None"):
        run(compose_cfg(*base, "stage=extract"), run_dir)
    with pytest.raises(RunRefused, match=r"target_score: 'prob' -> 'logprob'"):
        run(compose_cfg(*base, "stage=extract", "target.score=logprob"), run_dir)

    other = tmp_path / "logprob"
    run(compose_cfg(*base, "stage=extract", "target.score=logprob"), other)
    with h5py.File(other / "results.h5", "r") as f:
        np.testing.assert_allclose(np.exp(f["targets/score"][:]), f["predictions/prob"][:, 0],
                                   rtol=1e-5)
    run(compose_cfg(*base, "stage=evaluate", f"run_dir={other}",
                    "evaluate.metrics=[confidence]"), other)
    with h5py.File(other / "metrics.h5", "r") as m, h5py.File(other / "results.h5") as f:
        assert m.attrs["score"] == "logprob"
        assert float(m.attrs["score_check_max_abs_diff"]) < 1e-4
        np.testing.assert_allclose(m["score"][:], f["targets/score"][:], atol=1e-4)
    run(compose_cfg(*base, "stage=evaluate", f"run_dir={other}", "evaluate.score=prob",
                    "evaluate.metrics=[confidence]", "evaluate.overwrite=true"), other)
    with h5py.File(other / "metrics.h5", "r") as m, h5py.File(other / "results.h5") as f:
        assert m.attrs["score"] == "prob"
        assert float(m.attrs["score_check_max_abs_diff"]) < 1e-4  # still the stored logprob
        np.testing.assert_allclose(m["score"][:], np.exp(f["targets/score"][:]), rtol=1e-4)


def test_a_logit_run_keeps_the_fingerprint_it_had(images):
    """Runs made before target.score existed explained the logit: their fingerprints, which
    hold no score, are those of target.score=logit, so they resume."""
    from pipeline.extract import fingerprint

    cfg = compose_cfg(*_base(images))
    assert "score" not in fingerprint(cfg)
    assert fingerprint(cfg) != fingerprint(compose_cfg(*_base(images), "target.score=prob"))
