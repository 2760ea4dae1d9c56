"""Agreement with the peers (pytorch-grad-cam, Captum), batching, in-place ops and bf16.

Peers need parameters that require grad, so each gets a deep copy of the model with
``requires_grad`` left on; our methods get the frozen original. Same weights either way.
Each test imports its peer (``peers.require``): a missing peer skips only its own tests,
and fails them under CI.
"""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
import torchvision
from peers import require
from torch import nn
from torchvision.models.vgg import make_layers

from pipeline.methods import Activations, GradCAM, Saliency, target_fn
from pipeline.models import resolve_layers

TOL = 1e-5  # docs/SEMANTICS.md: agreement with the peers after the same normalization


def minmax(cam: np.ndarray) -> np.ndarray:
    """Per-image min-max as pytorch-grad-cam's scale_cam_image: (c - min) / (1e-7 + max)."""
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


def pgc_scale(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing of one layer's ReLU'd CAM (N, h, w) for (H, W) input.

    Normalize, cv2 bilinear resize to the input size, then normalize again
    (``aggregate_multi_layers`` rescales the layer mean; the resized map need not reach 1).
    """
    h, w = size
    up = np.stack([cv2.resize(np.float32(c), (w, h)) for c in minmax(cam)])
    return minmax(up)


def peer_copy(model: nn.Module, inplace: bool = True) -> nn.Module:
    peer = copy.deepcopy(model).requires_grad_(True)
    if not inplace:
        for m in peer.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
    return peer


def ours(model, names, x, classes, **kwargs) -> dict[str, torch.Tensor]:
    with GradCAM(model, resolve_layers(model, names), **kwargs) as m:
        return m(x, lambda logits: torch.as_tensor(classes))


def pgc(peer, name, x, classes) -> np.ndarray:
    """pytorch-grad-cam's GradCAM of layer ``name`` (skips the test without the peer)."""
    pgc_lib = require("pytorch_grad_cam")
    targets = require("pytorch_grad_cam.utils.model_targets")
    layer = dict(peer.named_modules())[name]
    with pgc_lib.GradCAM(peer, [layer]) as cam:
        return cam(x, [targets.ClassifierOutputTarget(int(c)) for c in classes])


def captum_gradcam(peer, name, x, classes) -> torch.Tensor:
    """Captum's LayerGradCam of layer ``name`` (skips the test without the peer)."""
    attr_lib = require("captum.attr")
    layer = dict(peer.named_modules())[name]
    attr = attr_lib.LayerGradCam(peer, layer).attribute(x, target=torch.as_tensor(classes),
                                                        relu_attributions=True)
    return attr.detach()  # (N, 1, h, w)


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return frozen(torchvision.models.resnet18())


@pytest.fixture(scope="module")
def resnet34():
    torch.manual_seed(1)
    return frozen(torchvision.models.resnet34())


class SmallVGG(nn.Module):
    """torchvision's VGG11 layout (``make_layers`` of config "A": convs each followed by
    ``ReLU(inplace=True)``, same module indices) at 1/8 width with a small head, for speed.
    features.18 is the last conv, features.19 its in-place ReLU, features.20 the last pool."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]
        self.features = make_layers(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(64, 32), nn.ReLU(inplace=True),
                                        nn.Dropout(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.fixture(scope="module")
def vgg11():
    torch.manual_seed(2)
    model = frozen(SmallVGG())
    assert isinstance(model.features[18], nn.Conv2d)
    assert isinstance(model.features[19], nn.ReLU) and model.features[19].inplace
    return model


def check_against_peers(model, names, x, classes):
    """All `names` from one call of ours; pytorch-grad-cam and Captum one layer at a time."""
    interpolate = require("captum.attr").LayerAttribution.interpolate
    size = tuple(x.shape[-2:])
    out = ours(model, names, x, classes)
    peer = peer_copy(model)
    for name in names:
        cam = out[f"gradcam/{name}"].numpy()
        assert cam.max() > 0  # a real map, not an all-zero one that any method would match
        np.testing.assert_allclose(pgc_scale(cam, size), pgc(peer, name, x, classes),
                                   rtol=0, atol=TOL, err_msg=name)
        theirs = captum_gradcam(peer, name, x, classes)
        np.testing.assert_allclose(minmax(cam), minmax(theirs[:, 0].numpy()), rtol=0, atol=TOL,
                                   err_msg=name)
        up = interpolate(theirs, size, "bilinear")[:, 0].numpy()
        mine = interpolate(out[f"gradcam/{name}"][:, None], size, "bilinear")[:, 0].numpy()
        np.testing.assert_allclose(minmax(mine), minmax(up), rtol=0, atol=TOL, err_msg=name)


def test_resnet18_matches_pgc_and_captum(resnet18):
    torch.manual_seed(10)
    x = torch.randn(2, 3, 64, 64)
    check_against_peers(resnet18, ["layer3", "layer4", "layer4.1.conv2"], x, [500, 281])


def test_resnet34_matches_pgc_and_captum(resnet34):
    torch.manual_seed(11)
    x = torch.randn(2, 3, 64, 64)
    check_against_peers(resnet34, ["layer3", "layer4"], x, [7, 3])


def test_vgg11_matches_pgc_and_captum(vgg11):
    torch.manual_seed(12)
    x = torch.randn(2, 3, 64, 64)
    # `features` ends in a max-pool: nothing in place follows it.
    check_against_peers(vgg11, ["features"], x, [0, 7])


def test_layer_followed_by_inplace_relu(vgg11):
    # features.18 is vgg11's last conv; features.19 is ReLU(inplace=True).
    torch.manual_seed(13)
    x = torch.randn(2, 3, 64, 64)
    classes = [5, 6]
    out = ours(vgg11, ["features.18"], x, classes)
    cam, alpha = out["gradcam/features.18"].numpy(), out["gradcam_weights/features.18"]
    assert cam.shape == (2, 4, 4) and cam.max() > 0
    # Captum clones the layer output: agrees as is.
    theirs = captum_gradcam(peer_copy(vgg11), "features.18", x, classes)[:, 0].numpy()
    np.testing.assert_allclose(minmax(cam), minmax(theirs), rtol=0, atol=TOL)
    # pytorch-grad-cam keeps `output.cpu().detach()`, on CPU the same storage, which the
    # in-place ReLU then overwrites; with that ReLU made out-of-place it agrees with us.
    np.testing.assert_allclose(pgc_scale(cam, (64, 64)),
                               pgc(peer_copy(vgg11, inplace=False), "features.18", x, classes),
                               rtol=0, atol=TOL)
    # ... and with the in-place ReLU it computes ReLU(sum_c alpha_c ReLU(A_c)): our alpha
    # (the gradient is still dY/dA) applied to the rectified activation reproduces it.
    with torch.no_grad():
        a = vgg11.features[:19](x)
    corrupted = torch.einsum("nc,nchw->nhw", alpha, a.relu()).clamp_min(0).numpy()
    np.testing.assert_allclose(pgc_scale(corrupted, (64, 64)),
                               pgc(peer_copy(vgg11), "features.18", x, classes),
                               rtol=0, atol=TOL)
    assert np.abs(minmax(corrupted) - minmax(cam)).max() > 0.05  # the bug is visible


def hand_cam(a: torch.Tensor, head, classes) -> torch.Tensor:
    """CAM from dY/dA computed by running the rest of the model on a leaf A."""
    leaf = a.detach().requires_grad_()
    logits = head(leaf)
    score = logits.gather(1, torch.as_tensor(classes)[:, None]).sum()
    (grad,) = torch.autograd.grad(score, leaf)
    alpha = grad.mean(dim=(2, 3))
    return torch.einsum("nc,nchw->nhw", alpha, leaf.detach()).clamp_min(0), alpha


def test_inplace_relu_equals_splitting_vgg11_by_hand(vgg11):
    torch.manual_seed(14)
    x = torch.randn(3, 3, 64, 64)
    classes = [1, 2, 3]
    out = ours(vgg11, ["features.18"], x, classes)
    with torch.no_grad():
        a = vgg11.features[:19](x)  # pre-ReLU conv output, negatives included
    assert (a < 0).any()

    def head(t):
        t = vgg11.features[20:](torch.relu(t))  # the in-place ReLU, out of place on the leaf
        return vgg11.classifier(torch.flatten(vgg11.avgpool(t), 1))

    cam, alpha = hand_cam(a, head, classes)
    scale = cam.abs().max()
    torch.testing.assert_close(out["gradcam/features.18"], cam, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(out["gradcam_weights/features.18"], alpha, rtol=1e-5,
                               atol=1e-5 * alpha.abs().max())


def test_residual_add_equals_splitting_resnet_by_hand(resnet18):
    # layer4.0.bn2's output is the `out` of `out += identity`, then ReLU(inplace=True).
    m = resnet18
    torch.manual_seed(15)
    x = torch.randn(3, 3, 64, 64)
    classes = [10, 20, 30]
    out = ours(m, ["layer4.0.bn2", "layer4.0.conv1"], x, classes)
    block = m.layer4[0]
    with torch.no_grad():
        h = m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))
        identity = block.downsample(h)
        a = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))

    def head(t):
        t = m.layer4[1](torch.relu(t + identity))
        return m.fc(torch.flatten(m.avgpool(t), 1))

    cam, alpha = hand_cam(a, head, classes)
    torch.testing.assert_close(out["gradcam/layer4.0.bn2"], cam, rtol=0,
                               atol=1e-5 * cam.abs().max())
    torch.testing.assert_close(out["gradcam_weights/layer4.0.bn2"], alpha, rtol=0,
                               atol=1e-5 * alpha.abs().max())
    # Captum agrees too (pytorch-grad-cam cannot here: `+=` overwrites what it stored).
    theirs = captum_gradcam(peer_copy(m), "layer4.0.bn2", x, classes)[:, 0].numpy()
    np.testing.assert_allclose(minmax(cam.numpy()), minmax(theirs), rtol=0, atol=TOL)
    # The earlier layer of the same call got its gradient through the later one.
    theirs = captum_gradcam(peer_copy(m), "layer4.0.conv1", x, classes)[:, 0].numpy()
    np.testing.assert_allclose(minmax(out["gradcam/layer4.0.conv1"].numpy()), minmax(theirs),
                               rtol=0, atol=TOL)


def test_saliency_matches_captum(resnet18):
    captum_saliency = require("captum.attr").Saliency
    torch.manual_seed(16)
    x = torch.randn(2, 3, 64, 64)
    classes = torch.tensor([3, 1])
    with Saliency(resnet18, {}) as s:
        mine = s(x, lambda logits: classes)["saliency/input"]
    theirs = captum_saliency(peer_copy(resnet18)).attribute(x.clone().requires_grad_(),
                                                            target=classes, abs=True)
    theirs = theirs.amax(dim=1)
    assert mine.shape == (2, 64, 64) and theirs.max() > 0
    assert (mine - theirs).abs().max() <= 1e-6 * theirs.abs().max()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(17)
    return torch.randn(4, 3, 64, 64)


def assert_batched_equals_single(method_factory, x):
    with method_factory() as m:
        whole = m(x, target_fn("pred"))
        singles = [m(x[i:i + 1], target_fn("pred")) for i in range(len(x))]
    assert set(whole) == set(singles[0])
    for key, value in whole.items():
        stacked = torch.cat([s[key] for s in singles])
        assert value.shape == stacked.shape, key
        if value.dtype.is_floating_point:
            scale = max(value.abs().max().item(), 1e-12)
            assert (value - stacked).abs().max().item() <= 1e-5 * scale, key
        else:
            assert torch.equal(value, stacked), key
    return whole


def test_batched_equals_per_image_gradcam(resnet18, batch):
    layers = resolve_layers(resnet18, ["layer3", "layer4"])
    out = assert_batched_equals_single(lambda: GradCAM(resnet18, layers), batch)
    assert out["gradcam/layer3"].shape == (4, 4, 4) and out["gradcam/layer4"].max() > 0


def test_batched_equals_per_image_saliency(resnet18, batch):
    out = assert_batched_equals_single(lambda: Saliency(resnet18, {}), batch)
    assert out["saliency/input"].shape == (4, 64, 64) and out["saliency/input"].max() > 0


def test_batched_equals_per_image_activations(resnet18, batch):
    layers = resolve_layers(resnet18, ["layer2", "layer4"])
    out = assert_batched_equals_single(
        lambda: Activations(resnet18, layers, dtype="float32"), batch)
    assert out["activations/layer2"].shape == (4, 128, 8, 8)


def test_bf16_autocast_agrees_with_fp32(resnet18):
    # bf16 keeps 8 significant bits (relative step 2**-8 = 0.4 %). Through 17 convs of a
    # random-init resnet18 and a channel sum alpha.A that cancels heavily, per-pixel errors of
    # a few percent of the map's range remain at layer4 (observed up to 0.05 over seeds and
    # resnet18/34; layer3, with more cancellation, up to 0.35). So: max abs diff <= 0.1 on
    # min-max normalized layer4 maps, and the unnormalized maps correlate above 0.995.
    torch.manual_seed(18)
    x = torch.randn(4, 3, 64, 64)
    classes = [0, 1, 2, 3]
    fp32 = ours(resnet18, ["layer4"], x, classes)
    bf16 = ours(resnet18, ["layer4"], x, classes, autocast_dtype=torch.bfloat16)
    a, b = fp32["gradcam/layer4"].numpy(), bf16["gradcam/layer4"].numpy()
    assert b.dtype == np.float32 and b.shape == a.shape == (4, 2, 2)
    diff = np.abs(minmax(a) - minmax(b)).max()
    assert 1e-4 < diff <= 0.1  # lower bound: autocast really ran in bf16
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995
    wa, wb = fp32["gradcam_weights/layer4"], bf16["gradcam_weights/layer4"]
    assert (wa - wb).abs().max() <= 0.05 * wa.abs().max()
    assert bf16["targets/class"].tolist() == classes


def test_a_missing_peer_skips_its_test_and_fails_it_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("no_such_peer_library")
    monkeypatch.setenv("CI", "1")  # .ci/run installs the peers: missing there is a failure
    with pytest.raises(ImportError):
        require("no_such_peer_library")
