"""Hook hygiene: nothing left behind, captured tensors are copies, token-model reshapes."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
import torchvision
from peers import require
from torch import nn

from pipeline.errors import ConfigError
from pipeline.hooks import LayerRecorder
from pipeline.layouts import Layout, LayoutReshape, detect_layouts
from pipeline.methods import Activations, GradCAM, Saliency, target_fn
from pipeline.models import resolve_layers


def assert_clean(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks, name
        assert not m._forward_pre_hooks, name
        assert not m._backward_hooks, name
    for name, p in model.named_parameters():
        assert p.grad is None, name


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)


def test_no_hooks_or_grads_after_runs(resnet18):
    x = torch.randn(2, 3, 64, 64)
    layers = resolve_layers(resnet18, ["layer3", "layer4.0.bn2", "type:Conv2d"])
    with GradCAM(resnet18, layers) as m:
        assert all(len(mod._forward_hooks) == 1 for mod in layers.values())
        out = m(x, target_fn("pred"))
        assert m.recorder is not None and m.recorder.outputs == {}  # nothing kept per batch
    assert out["gradcam/layer4.0.bn2"].shape == (2, 2, 2)
    assert len([k for k in out if k.startswith("gradcam/")]) == len(layers) == 22
    assert_clean(resnet18)
    with Activations(resnet18, layers) as m:
        out = m(x, target_fn(3))
    assert out["activations/layer3"].dtype == torch.float16
    assert out["activations/layer3"].shape == (2, 256, 4, 4)
    assert_clean(resnet18)
    with Saliency(resnet18, {}) as m:
        m(x, target_fn(3))
    assert_clean(resnet18)


def test_trainable_model_gets_no_parameter_grads():
    # autograd.grad to the captured activations never fills .grad, frozen or not.
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with GradCAM(model, resolve_layers(model, ["layer3", "layer4"])) as m:
        out = m(torch.randn(2, 3, 64, 64), target_fn("pred"))
    assert out["gradcam/layer4"].max() > 0
    assert_clean(model)


@pytest.mark.parametrize("method", ["gradcam", "activations", "saliency"])
def test_hooks_removed_when_forward_raises(resnet18, method):
    layers = resolve_layers(resnet18, ["layer2", "layer4"])
    make = {"gradcam": lambda: GradCAM(resnet18, layers),
            "activations": lambda: Activations(resnet18, layers),
            "saliency": lambda: Saliency(resnet18, {})}[method]
    bad = torch.randn(2, 1, 64, 64)  # one channel into a 3-channel stem
    with pytest.raises(RuntimeError, match="channels"), make() as m:
        m(bad, target_fn("pred"))
    assert_clean(resnet18)
    # Raising inside the block after a successful batch: same.
    with pytest.raises(KeyError), make() as m:
        m(torch.randn(1, 3, 64, 64), target_fn("pred"))
        raise KeyError("boom")
    assert_clean(resnet18)
    # Failing after the whole forward ran (every layer hook fired, graph built): still clean.
    def choose(logits):
        raise ValueError("no target")

    with pytest.raises(ValueError, match="no target"), make() as m:
        m(torch.randn(1, 3, 64, 64), choose)
    assert_clean(resnet18)


def test_layer_recorder_removes_hooks_on_error():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3))
    layers = {"0": net[0], "2": net[2]}
    with pytest.raises(ZeroDivisionError), LayerRecorder(layers, for_grad=False) as rec:
        net(torch.randn(1, 3, 8, 8))
        assert set(rec.outputs) == {"0", "2"}
        1 / 0  # noqa: B018
    assert rec.outputs == {}
    assert all(not m._forward_hooks for m in net.modules())


def test_recorded_activation_is_cloned_before_inplace_relu():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).eval().requires_grad_(False)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        pre = net[0](x)
    assert (pre < 0).sum() > 50
    with Activations(net, {"conv": net[0]}, dtype="float32") as m:
        got = m(x, target_fn("pred"))["activations/conv"]
    torch.testing.assert_close(got, pre)  # negatives kept, not rectified by the ReLU
    with Activations(net, {"conv": net[0]}, dtype="float32", max_channels=3) as m:
        got = m(x, target_fn("pred"))["activations/conv"]
    torch.testing.assert_close(got, pre[:, :3])
    with Activations(net, {"conv": net[0]}, dtype="float32", pool="avg") as m:
        got = m(x, target_fn("pred"))["activations/conv"]
    torch.testing.assert_close(got, pre.mean(dim=(2, 3)))
    # The recorder directly, no transform.
    with torch.inference_mode(), LayerRecorder({"conv": net[0]}, for_grad=False) as rec:
        net(x)
        torch.testing.assert_close(rec.outputs["conv"], pre)
    # Grad-CAM's kept tensor is the pre-ReLU output too: CAM = ReLU(sum_c alpha_c A_c).
    with GradCAM(net, {"conv": net[0]}) as m:
        out = m(x, target_fn(1))
    alpha = net[4].weight[1] / 64  # dY/dA_c = w_c / (8*8) after GAP over the 8x8 map
    grad_mask = (pre > 0).float()  # ... only where the ReLU passed
    expected_alpha = (grad_mask * alpha[None, :, None, None]).mean(dim=(2, 3))
    torch.testing.assert_close(out["gradcam_weights/conv"], expected_alpha)
    expected = torch.einsum("nc,nchw->nhw", expected_alpha, pre).clamp_min(0)
    torch.testing.assert_close(out["gradcam/conv"], expected)


def test_token_layouts_become_maps():
    """Tokens (N, 1 + h*w, C) and channels-last (N, h, w, C) outputs as (N, C, h, w) maps."""
    tokens = Layout("tokens", (197, 5), 5, (14, 14), prefix=1)
    t = torch.arange(2 * 197 * 5, dtype=torch.float32).reshape(2, 197, 5)
    m = tokens.to_map(t)
    assert m.shape == (2, 5, 14, 14)
    # [n, c, i, j] is token 1 + 14 i + j (the class token 0 dropped).
    n, c, i, j = np.meshgrid(range(2), range(5), range(14), range(14), indexing="ij")
    torch.testing.assert_close(m, t[n, 1 + 14 * i + j, c])
    nhwc = torch.randn(2, 4, 3, 6)
    assert torch.equal(Layout("nhwc", (4, 3, 6), 6, (4, 3)).to_map(nhwc),
                       nhwc.permute(0, 3, 1, 2))


def minmax(cam: np.ndarray) -> np.ndarray:
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


def token_model_vs_pgc(model: nn.Module, name: str, kind: str, x: torch.Tensor, classes):
    """Our Grad-CAM of a token model's layer, checked against pytorch-grad-cam's (the test
    is skipped without that peer, failed under CI)."""
    pgc = require("pytorch_grad_cam")
    targets = require("pytorch_grad_cam.utils.model_targets")
    peer = copy.deepcopy(model).requires_grad_(True)
    model.requires_grad_(False)
    layers, size = resolve_layers(model, [name]), tuple(x.shape[-2:])
    rt = LayoutReshape(detect_layouts(model, layers, size, kind), size)
    with GradCAM(model, layers, reshape=rt) as m:
        out = m(x, lambda logits: torch.tensor(classes))
    assert_clean(model)
    cam = out[f"gradcam/{name}"].numpy()
    with pgc.GradCAM(peer, [dict(peer.named_modules())[name]], reshape_transform=rt) as p:
        theirs = p(x, [targets.ClassifierOutputTarget(c) for c in classes])
    # Input 32x32 and a 4x4 map: integer scale 8 with bilinear half-pixel centres; after
    # pgc's resize the map is renormalized, so compare at pgc's resolution the pgc way.
    up = minmax(np.stack([cv2.resize(c, (32, 32)) for c in minmax(cam)]))
    np.testing.assert_allclose(up, theirs, rtol=0, atol=1e-5)
    return out


def test_vit_gradcam_matches_pgc():
    torch.manual_seed(3)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=16, mlp_dim=32,
                                               num_classes=10).eval()
    # torchvision zero-initializes the head: every gradient would be 0 and every CAM empty.
    nn.init.normal_(vit.heads.head.weight)
    x = torch.randn(3, 3, 32, 32)
    name = "encoder.layers.encoder_layer_1.ln_1"
    out = token_model_vs_pgc(vit, name, "vit", x, [1, 2, 3])
    assert out[f"gradcam/{name}"].shape == (3, 4, 4)
    assert out[f"gradcam_weights/{name}"].shape == (3, 16)
    assert (out[f"gradcam/{name}"].amax(dim=(1, 2)) > 0).all()


def test_swin_gradcam_matches_pgc():
    torch.manual_seed(4)
    swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                              num_heads=[1, 1], window_size=[2, 2],
                                              num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    out = token_model_vs_pgc(swin, "features", "nhwc", x, [0, 5, 9])
    # 32 / patch 4 = 8, one patch merging -> 4x4 with 2 * 16 channels (NHWC before reshape).
    assert out["gradcam/features"].shape == (3, 4, 4)
    assert out["gradcam_weights/features"].shape == (3, 32)
    assert (out["gradcam/features"].amax(dim=(1, 2)) > 0).all()


def test_misused_layers_fail_with_a_clear_message():
    class SideBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)
            self.side = nn.Conv2d(3, 4, 3)  # computed, never used by the output
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            self.side(x)
            return self.head(self.body(x).mean((2, 3)))

    model = SideBranch().eval().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ConfigError, match="does not depend on layer 'side'"), \
            GradCAM(model, resolve_layers(model, ["body", "side"])) as m:
        m(x, target_fn("pred"))
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1,
                                               num_heads=2, hidden_dim=16, mlp_dim=32)
    vit.eval().requires_grad_(False)
    layers = resolve_layers(vit, ["encoder.layers.encoder_layer_0.ln_1"])
    with (pytest.raises(ConfigError, match="force a layout with model.reshape=vit"),
          GradCAM(vit, layers) as m):
        m(torch.randn(1, 3, 32, 32), target_fn("pred"))
    assert not model.side._forward_hooks and not vit.encoder._forward_hooks
