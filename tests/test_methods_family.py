"""The method family against its references: pytorch-grad-cam for the CAMs, Captum for the
input attributions; batched equals per-image; hooks gone after every run, also on error.

Random-init resnet18 and vgg11 (in-place ReLUs) at 64x64. The references run on deep copies
with ``requires_grad=True`` (they call ``backward`` or replace modules). Target layers are
ReLU / block outputs that nothing modifies in place afterwards: pytorch-grad-cam keeps
``output.cpu()``, which on the CPU is no copy, so a conv followed by ``ReLU(inplace=True)``
would corrupt its reference (a known issue of it, not of ours). Each test imports its
reference (``peers.require``): a missing one skips only its own tests, and fails them
under CI.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY, compose_cfg
from omegaconf import DictConfig
from peers import require
from pipeline_inputs import model_and_inputs
from torch import nn

from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.extract import extract
from pipeline.hooks import LayerRecorder
from pipeline.methods import (
    METHODS,
    EigenCAM,
    GradCAMPlusPlus,
    GuidedBackprop,
    GuidedGradCAM,
    HiResCAM,
    IntegratedGradients,
    LayerCAM,
    ScoreCAM,
    SmoothGrad,
    XGradCAM,
    target_fn,
)
from pipeline.methods.integrated_gradients import baseline_of
from pipeline.models import resolve_layers
from pipeline.store import is_scale

SIZE = 64
FAMILY = ("gradcampp", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam",
          "smoothgrad", "integrated_gradients", "guided_backprop", "guided_gradcam")
# Two target layers per model, so every run is also a multi-layer run.
LAYERS = {"resnet18": ("layer3", "layer4"), "vgg11": ("features.14", "features.19")}
# Score-CAM costs N * C forward passes per layer: layers with 64 channels keep it quick.
SCORE_LAYERS = {"resnet18": ("layer1",), "vgg11": ("features.2",)}
# pytorch-grad-cam's conventions where they differ from the papers' definitions (camsweep's
# defaults; without these options the maps differ by 2e-3 to 1.4e-2 of their range here),
# as the explicit options that reproduce them.
PEER = {"gradcampp": {"eps": 1e-6}, "scorecam": {"align_corners": True}}
GRAD_CAMS = {"gradcampp": (GradCAMPlusPlus, "GradCAMPlusPlus"),
             "xgradcam": (XGradCAM, "XGradCAM"), "layercam": (LayerCAM, "LayerCAM"),
             "hirescam": (HiResCAM, "HiResCAM"), "eigencam": (EigenCAM, "EigenCAM")}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: _model(name) for name in LAYERS}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def reference(model: nn.Module) -> nn.Module:
    """A copy the reference libraries may call backward on and change."""
    return copy.deepcopy(model).requires_grad_(True)


def layers_of(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Module]:
    return {n: model.get_submodule(n) for n in names}


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def run(cls: type, model: nn.Module, x: torch.Tensor, layers: tuple[str, ...] = (),
        **options) -> dict[str, torch.Tensor]:
    with cls(model, layers_of(model, layers), **options) as method:
        return method(x, target_fn("pred"))


def normalized(cams: torch.Tensor) -> np.ndarray:
    """pytorch-grad-cam's post-processing of one layer: ReLU, per-image min-max, cv2 resize
    to the input, then the multi-layer aggregation (ReLU, mean, min-max again)."""
    scale_cam_image = require("pytorch_grad_cam.utils.image").scale_cam_image
    scaled = scale_cam_image(np.maximum(cams.numpy(), 0), (SIZE, SIZE))
    return scale_cam_image(np.maximum(scaled, 0))


def pgc_targets(out: dict[str, torch.Tensor]) -> list:
    """pytorch-grad-cam's target objects for the classes our run explained."""
    targets = require("pytorch_grad_cam.utils.model_targets")
    return [targets.ClassifierOutputTarget(int(t)) for t in out["targets/class"]]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest value."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def assert_batched_equals_per_image(out: dict[str, torch.Tensor], per_image: list[dict],
                                    rtol: float = 1e-5) -> None:
    for key, value in out.items():
        for i, single in enumerate(per_image):
            scale = max(float(value.abs().max()), 1e-12)
            err = float((value[i] - single[key][0]).abs().max()) / scale
            assert err <= rtol, (key, i, err)


# -- CAMs against pytorch-grad-cam -------------------------------------------------------------

@pytest.mark.parametrize("arch", list(LAYERS))
@pytest.mark.parametrize("name", list(GRAD_CAMS))
def test_cam_matches_pytorch_grad_cam(models, x, arch, name):
    pgc = require("pytorch_grad_cam")
    model, names = models[arch], LAYERS[arch]
    cls, ref_name = GRAD_CAMS[name]
    peer = PEER.get(name, {})
    out = run(cls, model, x, names, **peer)
    targets = pgc_targets(out)
    ref_model = reference(model)
    for layer in names:
        with getattr(pgc, ref_name)(ref_model, [ref_model.get_submodule(layer)]) as cam:
            ref = cam(x, targets)
        ours = out[f"{name}/{layer}"]
        assert ours.shape[0] == 2 and ours.dtype == torch.float32
        assert float(ours.max()) > 0, "a map that is all zero would prove nothing"
        assert np.abs(normalized(ours) - ref).max() <= 1e-5, (arch, name, layer)
    assert_batched_equals_per_image(out, [run(cls, model, x[i:i + 1], names, **peer)
                                          for i in range(2)])
    has_weights = name in ("gradcampp", "xgradcam", "eigencam")
    assert (f"{name}_weights/{names[0]}" in out) == has_weights
    assert hook_count(model) == 0


@pytest.mark.parametrize("svd", ["host", "device"])
def test_eigencam_batched_svd_equals_per_image(models, svd):
    """One SVD call for the batch gives each image's own maps and directions; ``host``
    keeps the signs of numpy's per-image SVD (pytorch-grad-cam's), ``device`` orients
    each direction along the image's mean activation."""
    model = models["resnet18"]
    x4 = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    out = run(EigenCAM, model, x4, ("layer3", "layer4"), svd=svd)
    singles = [run(EigenCAM, model, x4[i:i + 1], ("layer3", "layer4"), svd=svd)
               for i in range(4)]
    # 1e-5 of each array's peak (maps reach ~10 here): the batched forward alone differs
    # from the single ones by ~1e-6 relative.
    assert_batched_equals_per_image(out, singles)
    with LayerRecorder(layers_of(model, ("layer3",)), for_grad=False) as rec, \
            torch.inference_mode():
        model(x4)
        acts = rec.outputs["layer3"].numpy()
    v = out["eigencam_weights/layer3"].numpy()
    for i, a in enumerate(acts):  # the previous per-image numpy code, and its signs
        flat = a.reshape(a.shape[0], -1).T
        flat = flat - flat.mean(axis=0)
        ref = np.linalg.svd(flat, full_matrices=False)[2][0]
        mean_dir = float(v[i] @ a.reshape(a.shape[0], -1).mean(axis=1))
        if svd == "host":
            np.testing.assert_allclose(v[i], ref, atol=1e-5)
            np.testing.assert_allclose(out["eigencam/layer3"][i].numpy(),
                                       np.maximum(flat @ ref, 0).reshape(a.shape[1:]),
                                       atol=1e-5)
        else:
            np.testing.assert_allclose(np.abs(v[i]), np.abs(ref), atol=1e-4)
            assert mean_dir >= 0


def test_scorecam_shares_one_pass_among_all_zero_channels(x):
    """Channels that a ReLU zeroes everywhere mask the input to zeros: one pass of a zero
    image serves them all, and the maps still equal pytorch-grad-cam's (which runs each)."""
    pgc = require("pytorch_grad_cam")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, 10)).eval().requires_grad_(False)
    with torch.no_grad():
        model[0].bias[:6] = -1e3  # channels 0-5 are zero after the ReLU, for any input
    images = []
    counter = model[0].register_forward_pre_hook(lambda _m, args: images.append(len(args[0])))
    try:
        out = run(ScoreCAM, model, x[:2], ("1",), batch_masks=7, **PEER["scorecam"])
    finally:
        counter.remove()
    # The prediction pass, one zero image, then the 10 live channels of each image.
    assert images[:2] == [2, 1] and sum(images[2:]) == 2 * 10
    targets = pgc_targets(out)
    ref_model = reference(model)
    with pgc.ScoreCAM(ref_model, [ref_model[1]]) as cam, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cam(x[:2], targets)
    assert np.abs(normalized(out["scorecam/1"]) - ref).max() <= 1e-4
    assert_batched_equals_per_image(
        out, [run(ScoreCAM, model, x[i:i + 1], ("1",), batch_masks=7, **PEER["scorecam"])
              for i in range(2)],
        rtol=1e-4)


@pytest.mark.parametrize("arch", list(LAYERS))
def test_scorecam_matches_pytorch_grad_cam(models, x, arch):
    pgc = require("pytorch_grad_cam")
    model, names = models[arch], SCORE_LAYERS[arch]
    n = 2 if arch == "resnet18" else 1  # vgg11 is ~4x the cost per masked input
    # 48 masks per pass: chunks that straddle two images.
    out = run(ScoreCAM, model, x[:n], names, batch_masks=48, **PEER["scorecam"])
    targets = pgc_targets(out)
    ref_model = reference(model)
    cam = pgc.ScoreCAM(ref_model, [ref_model.get_submodule(names[0])])
    cam.batch_size = 64
    with cam, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cam(x[:n], targets)
    ours = out[f"scorecam/{names[0]}"]
    assert float(ours.max()) > 0
    assert np.abs(normalized(ours) - ref).max() <= 1e-4
    weights = out[f"scorecam_weights/{names[0]}"]
    assert weights.shape == (n, 64)
    torch.testing.assert_close(weights.sum(1), torch.ones(n))
    if n == 2:
        assert_batched_equals_per_image(
            out, [run(ScoreCAM, model, x[i:i + 1], names, batch_masks=48, **PEER["scorecam"])
                  for i in range(2)],
            rtol=1e-4)
    assert hook_count(model) == 0


# -- input attributions against Captum ---------------------------------------------------------

def test_smoothgrad_matches_captum_with_the_same_noise(models, x):
    captum_attr = require("captum.attr")
    model = models["resnet18"]
    samples, sigma, seed = 6, 0.2, 7
    # 4 noisy inputs per pass: chunks that straddle two images.
    out = run(SmoothGrad, model, x, samples=samples, sigma=sigma, seed=seed, batch_samples=4,
              save_attribution=True)
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(reference(model)))
    for i in range(2):
        xi = x[i:i + 1]
        stdev = float(sigma * (xi.max() - xi.min()))  # sigma is a fraction of the range
        torch.manual_seed(seed)  # Captum draws torch.normal from the global generator
        ref = nt.attribute(xi, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev,
                           target=int(out["targets/class"][i]), abs=False)
        assert rel(out["smoothgrad_attribution/input"][i], ref[0]) <= 1e-5
        torch.testing.assert_close(out["smoothgrad/input"][i], ref[0].abs().amax(0),
                                   rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert_batched_equals_per_image(out, [
        run(SmoothGrad, model, x[i:i + 1], samples=samples, sigma=sigma, seed=seed,
            save_attribution=True) for i in range(2)])


def test_smoothgrad_is_the_mean_gradient_over_its_noise(models, x):
    """The formula by hand: the same bank of draws, one noisy input at a time."""
    model = models["resnet18"]
    method = SmoothGrad(model, {}, samples=3, sigma=0.1, seed=3, save_attribution=True)
    with method:
        out = method(x[:1], target_fn(5))
    bank = torch.randn((3, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(3))
    stdev = 0.1 * (x[0].max() - x[0].min())
    grads = []
    for k in range(3):
        xk = (x[:1] + bank[k] * stdev).requires_grad_()
        (g,) = torch.autograd.grad(model(xk)[0, 5], xk)
        grads.append(g[0])
    assert rel(out["smoothgrad_attribution/input"][0], torch.stack(grads).mean(0)) <= 1e-5
    # sigma=0: every sample is the input itself, so SmoothGrad is the plain gradient.
    with SmoothGrad(model, {}, samples=2, sigma=0.0) as m0, METHODS["saliency"](model, {}) as s:
        torch.testing.assert_close(m0(x, target_fn("pred"))["smoothgrad/input"],
                                   s(x, target_fn("pred"))["saliency/input"])


@pytest.mark.parametrize(("baseline", "integration"), [
    ("zero", "gausslegendre"), ("mean", "riemann_trapezoid"), ("blur", "riemann_middle")])
def test_integrated_gradients_match_captum(models, x, baseline, integration):
    captum_attr = require("captum.attr")
    model, steps = models["resnet18"], 6
    out = run(IntegratedGradients, model, x, steps=steps, integration=integration,
              baseline=baseline, blur_sigma=2.0, batch_steps=5, save_attribution=True)
    start = baseline_of(x, baseline, 2.0)
    ig = captum_attr.IntegratedGradients(reference(model))
    ref = ig.attribute(x, baselines=start, target=out["targets/class"].long(), n_steps=steps,
                       method=integration)
    assert rel(out["integrated_gradients_attribution/input"], ref) <= 1e-5
    assert rel(out["integrated_gradients/input"], ref.abs().amax(1)) <= 1e-5
    assert_batched_equals_per_image(out, [
        run(IntegratedGradients, model, x[i:i + 1], steps=steps, integration=integration,
            baseline=baseline, blur_sigma=2.0, save_attribution=True) for i in range(2)])


def test_integrated_gradient_baselines():
    x = torch.randn(2, 3, 16, 20)
    assert torch.equal(baseline_of(x, "zero", 1.0), torch.zeros_like(x))
    mean = baseline_of(x, "mean", 1.0)
    torch.testing.assert_close(mean[:, :, 3, 4], x.mean(dim=(2, 3)))
    blur = baseline_of(x, "blur", 3.0)
    assert blur.shape == x.shape and blur.std() < 0.5 * x.std()  # smoothed, same size
    assert baseline_of(x, "blur", 50.0).isfinite().all()  # kernel cut to the image


@pytest.mark.parametrize("arch", list(LAYERS))
def test_guided_backprop_matches_captum(models, x, arch):
    captum_attr = require("captum.attr")
    model = models[arch]
    out = run(GuidedBackprop, model, x, save_attribution=True)
    target = out["targets/class"].long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that it sets hooks
        ref = captum_attr.GuidedBackprop(reference(model)).attribute(x.clone(), target=target)
    assert rel(out["guided_backprop_attribution/input"], ref) <= 1e-5
    assert rel(out["guided_backprop/input"], ref.abs().amax(1)) <= 1e-5
    assert_batched_equals_per_image(
        out, [run(GuidedBackprop, model, x[i:i + 1], save_attribution=True) for i in range(2)])
    if arch == "resnet18":  # and pytorch-grad-cam's (one image; it replaces the ReLUs)
        pgc = require("pytorch_grad_cam")
        gb = pgc.GuidedBackpropReLUModel(reference(model), device="cpu")
        ref0 = torch.from_numpy(gb(x[:1].clone(), int(target[0]))).permute(2, 0, 1)
        assert rel(out["guided_backprop_attribution/input"][0], ref0) <= 1e-5
    # The model is as it was: no hooks, in-place flags kept, plain gradients again.
    assert hook_count(model) == 0
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


@pytest.mark.parametrize("arch", list(LAYERS))
def test_guided_gradcam_matches_captum(models, x, arch):
    captum_attr = require("captum.attr")
    model, names = models[arch], LAYERS[arch]
    out = run(GuidedGradCAM, model, x, names, save_attribution=True)
    target = out["targets/class"].long()
    ref_model = reference(model)
    for layer in names:
        ggc = captum_attr.GuidedGradCam(ref_model, ref_model.get_submodule(layer))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ggc.attribute(x.clone(), target=target)
        assert float(ref.detach().abs().max()) > 0
        assert rel(out[f"guided_gradcam_attribution/{layer}"], ref) <= 1e-5, layer
        assert out[f"guided_gradcam/{layer}"].shape == (2, SIZE, SIZE)
    assert_batched_equals_per_image(
        out, [run(GuidedGradCAM, model, x[i:i + 1], names, save_attribution=True)
              for i in range(2)])
    assert hook_count(model) == 0


# -- hooks, errors, configs --------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY)
def test_hooks_are_gone_also_after_an_error(models, x, name):
    model = models["resnet18"]
    cls = METHODS[name]
    layers = layers_of(model, ("layer4",)) if cls.uses_layers else {}
    options = {"smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 2}}.get(name, {})
    with torch.no_grad():
        before = model(x)
    with pytest.raises(RuntimeError), cls(model, layers, **options) as method:
        assert hook_count(model) > 0 or not (cls.uses_layers or name == "guided_backprop")
        method(x, lambda logits: torch.full((len(logits),), 10**6))  # no such class
    assert hook_count(model) == 0
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    # No guided hook left on any tensor path: a plain gradient is plain again.
    xg = x[:1].clone().requires_grad_()
    (g,) = torch.autograd.grad(model(xg)[0, 3], xg)
    with METHODS["saliency"](model, {}) as saliency:
        plain = saliency(x[:1], target_fn(3))["saliency/input"]
    torch.testing.assert_close(g.abs().amax(1), plain)


def test_guided_methods_need_relu_modules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.LazyLinear(5))
    with pytest.raises(ConfigError, match="nn.ReLU.*SiLU"):
        GuidedBackprop(model, {})


@pytest.mark.parametrize(("override", "message"), [
    ("method.integration=simpson", "unknown method.integration 'simpson'"),
    ("method.baseline=black", "unknown method.baseline 'black'"),
    ("method.steps=1", "method.steps must be >= 2"),
])
def test_bad_integrated_gradients_options(override, message):
    cfg = compose_cfg("method=integrated_gradients", override,
                      *(("method.integration=riemann_left",) if "steps" in override else ()))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_bad_family_options():
    with pytest.raises(ConfigError, match="unknown method.interpolate_mode 'linear'"):
        validate(compose_cfg("method=guided_gradcam", "method.interpolate_mode=linear"))
    with pytest.raises(ConfigError, match="method.batch_masks must be >= 1"):
        validate(compose_cfg("method=scorecam", "method.batch_masks=0"))
    with pytest.raises(ConfigError, match="method.sigma must be >= 0"):
        validate(compose_cfg("method=smoothgrad", "method.sigma=-0.1"))


FAST = {"scorecam": ("model.target_layers=[layer1]", "method.batch_masks=128"),
        "smoothgrad": ("method.samples=2",), "integrated_gradients": ("method.steps=2",)}
BUILT_IN = tuple(sorted(METHODS))  # the 13 shipped methods (tests may register more)


def direct_call(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The method class of ``cfg`` called by hand, with the config's options, on the first
    two images of ``cfg.data`` prepared as extract prepares them (same model seed)."""
    model, x = model_and_inputs(cfg, 2)
    cls = METHODS[cfg.method.name]
    layers = resolve_layers(model, cfg.model.target_layers) if cls.uses_layers else {}
    options = {k: v for k, v in cfg.method.items() if k != "name"}
    with cls(model, layers, topk=cfg.topk, **options) as method:
        return method(x, target_fn("pred"))


@pytest.mark.parametrize("name", BUILT_IN)
def test_extract_stage_writes_what_the_method_computes(tmp_path: Path, name):
    """extract (loader, batches, writer, file layout) stores exactly what the method class
    returns when called directly with the same options; NCHW so that both run the same
    kernels (channels_last changes float rounding, tested in test_speed_options.py)."""
    cfg = compose_cfg(*TINY, f"method={name}", "stage=extract", "data.limit=2",
                      "channels_last=false", *FAST.get(name, ()))
    validate(cfg)
    summary = extract(cfg, tmp_path / "run")
    assert summary.done == 2 and summary.failed == 0
    expected = direct_call(cfg)
    with h5py.File(summary.path) as f:
        assert f.attrs["method"] == name
        group = f[name]
        keys = [k for k in group if not is_scale(group[k])]  # axis names are not maps
        assert keys == (["input"] if not METHODS[name].uses_layers
                        else list(cfg.model.target_layers))
        ds = group[keys[0]]
        assert ds.shape[0] == 2 and np.isfinite(ds[:]).all()
        assert ds.dtype == (np.float16 if name == "activations" else np.float32)
        dims = json.loads(ds.attrs["dims"])
        assert dims[0] == "image" and len(dims) == ds.ndim and not dims[-1].startswith("d")
        assert ds.attrs["kind"] == {"cam": "layer_map", "input": "input_map",
                                    "activations": "activations"}[METHODS[name].kind]
        assert float(np.abs(ds[:]).max()) > 0  # a real map: all-zero ones would agree
        maps = [k for k in expected if not k.startswith(("predictions/", "targets/"))]
        assert f"{name}/{keys[0]}" in maps
        for key in expected:
            np.testing.assert_allclose(f[key][:], expected[key].numpy(), rtol=0, atol=1e-5,
                                       err_msg=key)
