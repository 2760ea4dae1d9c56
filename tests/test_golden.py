"""The golden examples of docs/SEMANTICS.md, asserted with their exact numbers.

Each example comes from one of the reference articles. The article's own computation (bare
autograd) is kept as the statement of the number; beside it, the article's setting is
rebuilt as a model and the same numbers come out of camsweep's code: its methods (the
input gradient of Saliency, and signed through SmoothGrad with sigma=0, which is that
gradient without the max |.| reduction), its hook recorder and its guided ReLU hooks.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pipeline.hooks import LayerRecorder
from pipeline.methods import (
    Activations,
    GradCAM,
    GuidedBackprop,
    Saliency,
    SmoothGrad,
    cam_from_gradients,
    target_fn,
)
from pipeline.models import resolve_layers


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


class Formula(nn.Module):
    """An input batch -> logits model around a plain function, for the articles' formulas."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def input_gradient(model: nn.Module, x: torch.Tensor, cls: int) -> torch.Tensor:
    """dY_cls/dx, signed, from camsweep: SmoothGrad with sigma=0 averages the gradient at
    the input itself, and save_attribution keeps it before the max |.| reduction."""
    with SmoothGrad(model, {}, samples=1, sigma=0.0, save_attribution=True) as m:
        out = m(x, target_fn(cls))
    return out["smoothgrad_attribution/input"]


def saliency(model: nn.Module, x: torch.Tensor, cls: int) -> torch.Tensor:
    """camsweep's saliency map: max over channels of |dY_cls/dx|."""
    with Saliency(model, {}) as m:
        return m(x, target_fn(cls))["saliency/input"]


# --- autograd basics ----------------------------------------------------------------------------


def test_chain_rule_gradients_of_the_four_weights():
    a = tensor([5.0])
    w1, w2, w3, w4 = (tensor([v]).requires_grad_() for v in (12, 53, 91, 73))
    b = w1 * a
    c = w2 * a
    d = w3 * b + w4 * c
    loss = 10 - d
    loss.backward()
    # dL/dw1 = -w3*a, dL/dw2 = -w4*a, dL/dw3 = -b = -w1*a, dL/dw4 = -c = -w2*a.
    assert w1.grad.item() == -455.0 == -91 * 5
    assert w2.grad.item() == -365.0 == -73 * 5
    assert w3.grad.item() == -60.0 == -12 * 5
    assert w4.grad.item() == -265.0 == -53 * 5
    assert a.grad is None  # a does not require grad


def test_chain_rule_gradients_through_camsweep():
    # The four weights as the pixels of a 1x4 input; logit 0 is the loss, logit 1 is d.
    def graph(x: torch.Tensor) -> torch.Tensor:
        w1, w2, w3, w4 = x.flatten(1).unbind(1)
        d = w3 * (w1 * 5) + w4 * (w2 * 5)
        return torch.stack([10 - d, d], dim=1)

    x = tensor([12, 53, 91, 73]).reshape(1, 1, 1, 4)
    grads = [-455.0, -365.0, -60.0, -265.0]
    assert input_gradient(Formula(graph), x, 0).flatten().tolist() == grads
    assert saliency(Formula(graph), x, 0).flatten().tolist() == [-g for g in grads]
    assert input_gradient(Formula(graph), x, 1).flatten().tolist() == [-g for g in grads]


def test_sgd_loop_first_gradients():
    # The article's loop: y_pred = x * w, loss = (y_pred - y)^2 per sample, one step per sample,
    # w -= 0.01 * grad, grad zeroed after each step. dL/dw = 2 x (w x - y).
    w = tensor([1.0]).requires_grad_()
    grads, weights = [], []
    for x, y in zip((11.0, 22.0, 33.0), (21.0, 14.0, 64.0), strict=True):
        loss = (x * w - y) * (x * w - y)
        loss.backward()
        grads.append(w.grad.item())
        with torch.no_grad():
            w -= 0.01 * w.grad
        w.grad.zero_()
        weights.append(w.item())
    torch.testing.assert_close(tensor(grads), tensor([-220.0, 2481.6, -51303.65]),
                               rtol=1e-6, atol=0)
    # The weights that produce them: 1 -> 3.2 -> -21.616 -> 491.42048.
    torch.testing.assert_close(tensor(weights), tensor([3.2, -21.616, 491.42048]), rtol=1e-6,
                               atol=0)
    # Same numbers in closed form, in float64.
    w64, closed = 1.0, []
    for x, y in zip((11.0, 22.0, 33.0), (21.0, 14.0, 64.0), strict=True):
        g = 2 * x * (w64 * x - y)
        closed.append(g)
        w64 -= 0.01 * g
    assert closed == pytest.approx([-220.0, 2481.6, -51303.648], rel=1e-12)


def test_sgd_loop_driven_by_camsweep_gradients():
    # Input channels (w, x, y) of one pixel; the only logit is the squared error. Channel 0
    # of the signed input gradient is dL/dw, the gradient the article's loop steps with.
    def squared_error(inputs: torch.Tensor) -> torch.Tensor:
        w, x, y = inputs[:, :, 0, 0].unbind(1)
        return ((x * w - y) ** 2)[:, None]

    w, grads, weights = 1.0, [], []
    for x, y in zip((11.0, 22.0, 33.0), (21.0, 14.0, 64.0), strict=True):
        grad = input_gradient(Formula(squared_error), tensor([w, x, y]).reshape(1, 3, 1, 1), 0)
        grads.append(grad[0, 0, 0, 0].item())
        w -= 0.01 * grads[-1]
        weights.append(w)
    torch.testing.assert_close(tensor(grads), tensor([-220.0, 2481.6, -51303.65]),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(tensor(weights), tensor([3.2, -21.616, 491.42048]), rtol=1e-6,
                               atol=0)


def test_backward_with_grad_tensors_accumulates():
    x = tensor([2.0]).requires_grad_()
    (3 * x**2 + 2 * x).backward()
    assert x.grad.tolist() == [14.0]  # 6x + 2 at x = 2

    x = tensor([2.0, 3.0, 4.0]).requires_grad_()
    y = 3 * x**2 + 2 * x
    assert y.tolist() == [16.0, 33.0, 56.0]
    torch.autograd.backward(y, grad_tensors=torch.ones(3), retain_graph=True)
    assert x.grad.tolist() == [14.0, 20.0, 26.0]
    torch.autograd.backward(y, grad_tensors=tensor([3.0, 2.0, 1.0]))
    # 3*14, 2*20, 1*26 = 42, 40, 26, added to what was there.
    assert x.grad.tolist() == [56.0, 60.0, 52.0]


def test_gradients_of_a_polynomial_through_camsweep():
    # One-pixel images x; the logit is 3x^2 + 2x. camsweep differentiates the sum of the
    # batch's scores (the article's grad_tensors of ones): each image gets its own 6x + 2.
    model = Formula(lambda x: (3 * x**2 + 2 * x).flatten(1))
    assert saliency(model, tensor([2.0]).reshape(1, 1, 1, 1), 0).flatten().tolist() == [14.0]
    batch = tensor([2.0, 3.0, 4.0]).reshape(3, 1, 1, 1)
    assert input_gradient(model, batch, 0).flatten().tolist() == [14.0, 20.0, 26.0]
    assert saliency(model, batch, 0).flatten().tolist() == [14.0, 20.0, 26.0]


# --- conv -> fc: gradients to the input and to the conv output -------------------------------

X = [[1, 2, 3], [1, 1, 2], [2, 1, 2]]
CONV_OUT = [[4, 7], [5, 6]]
DY1_DCONV = [[0, 1], [0, 1]]
DY2_DCONV = [[1, 0], [1, 1]]
DY1_DX = [[0, 1, 0], [0, 2, 2], [0, 1, 2]]
DY2_DX = [[1, 0, 0], [2, 3, 0], [1, 3, 2]]


class ConvFC(nn.Module):
    """The article's network: 2x2 conv [[1,0],[1,2]] without bias -> flatten -> fc (4 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=2, bias=False)
        self.fc = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(tensor([[1, 0], [1, 2]]).reshape(1, 1, 2, 2))
            self.fc.weight.copy_(tensor([[0, 1, 0, 1], [1, 0, 1, 1]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def test_conv_fc_forward_and_gradients_by_hand():
    net = ConvFC()
    x = tensor(X).reshape(1, 1, 3, 3).requires_grad_()
    conv_out = net.conv(x)
    assert conv_out[0, 0].tolist() == CONV_OUT
    y = net.fc(conv_out.reshape(1, -1))
    assert y.tolist() == [[13.0, 15.0]]
    dy1_dconv, dy1_dx = torch.autograd.grad(y[0, 0], (conv_out, x), retain_graph=True)
    assert dy1_dconv[0, 0].tolist() == DY1_DCONV
    assert dy1_dx[0, 0].tolist() == DY1_DX
    dy2_dconv, dy2_dx = torch.autograd.grad(y[0, 1], (conv_out, x))
    assert dy2_dconv[0, 0].tolist() == DY2_DCONV
    assert dy2_dx[0, 0].tolist() == DY2_DX


def test_conv_fc_layer_recorder_captures_output_and_gradient():
    """camsweep's LayerRecorder keeps the conv output as a leaf: its gradient is dy/dconv."""
    net = ConvFC().eval().requires_grad_(False)
    x = tensor(X).reshape(1, 1, 3, 3)
    for cls, dy_dconv in ((0, DY1_DCONV), (1, DY2_DCONV)):
        with LayerRecorder({"conv": net.conv}, for_grad=True) as rec:
            y = net(x)
            kept = rec.outputs["conv"]
            assert kept[0, 0].tolist() == CONV_OUT
            assert y.tolist() == [[13.0, 15.0]]
            (grad,) = torch.autograd.grad(y[0, cls], kept)
            assert grad[0, 0].tolist() == dy_dconv
        assert rec.outputs == {} and not net.conv._forward_hooks
    assert not any(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("cls, expected", [(0, DY1_DX), (1, DY2_DX)])
def test_conv_fc_signed_input_gradient_through_camsweep(cls, expected):
    net = ConvFC().eval().requires_grad_(False)
    assert input_gradient(net, tensor(X).reshape(1, 1, 3, 3), cls)[0, 0].tolist() == expected


@pytest.mark.parametrize("cls, expected", [(0, DY1_DX), (1, DY2_DX)])
def test_conv_fc_saliency_through_the_pipeline(cls, expected):
    net = ConvFC().eval().requires_grad_(False)
    x = tensor(X).reshape(1, 1, 3, 3)
    with Saliency(net, {}) as m:
        out = m(x, target_fn(cls))
    # One input channel: max over channels of |dy/dx| is |dy/dx| itself.
    assert out["saliency/input"].shape == (1, 3, 3)
    assert out["saliency/input"][0].tolist() == [[abs(v) for v in row] for row in expected]
    assert out["targets/class"].tolist() == [cls]
    assert out["targets/score"].tolist() == [[13.0, 15.0][cls]]
    # Two classes only: top-k is cut to 2; class 1 (15) ranks above class 0 (13).
    assert out["predictions/class"].tolist() == [[1, 0]]
    torch.testing.assert_close(out["predictions/prob"],
                               torch.softmax(tensor([[15.0, 13.0]]), 1))
    assert x.grad is None  # the caller's tensor is left alone


@pytest.mark.parametrize("cls, dy_dconv", [(0, DY1_DCONV), (1, DY2_DCONV)])
def test_conv_fc_gradcam_at_the_conv(cls, dy_dconv):
    net = ConvFC().eval().requires_grad_(False)
    x = tensor(X).reshape(1, 1, 3, 3)
    with GradCAM(net, resolve_layers(net, ["conv"])) as m:
        out = m(x, target_fn(cls))
    alpha = tensor(dy_dconv).mean().item()  # 0.5 for y1, 0.75 for y2
    assert alpha == [0.5, 0.75][cls]
    assert out["gradcam_weights/conv"].tolist() == [[alpha]]
    # CAM = ReLU(alpha * conv output); all positive here.
    assert out["gradcam/conv"][0].tolist() == [[alpha * v for v in row] for row in CONV_OUT]
    assert out["gradcam/conv"][0].tolist() == ([[2.0, 3.5], [2.5, 3.0]],
                                               [[3.0, 5.25], [3.75, 4.5]])[cls]


def test_conv_fc_pred_target_picks_the_larger_logit():
    net = ConvFC().eval().requires_grad_(False)
    with GradCAM(net, resolve_layers(net, ["conv"])) as m:
        out = m(tensor(X).reshape(1, 1, 3, 3), target_fn("pred"))
    assert out["targets/class"].tolist() == [1]
    assert out["targets/score"].tolist() == [15.0]
    assert out["gradcam_weights/conv"].tolist() == [[0.75]]


# --- Grad-CAM worked example ---------------------------------------------------------------------

A1 = [[1, 0, 2], [3, 5, 0], [1, 1, 1]]
A2 = [[0, 1, 0], [3, 1, 0], [1, 0, 1]]
CAM_CAT = [[1 / 3, 0, 2 / 3], [0, 1, 0], [0, 1 / 3, 0]]
# Class 1 has head weights (-3, 6): alpha = (-1/3, 2/3), the negated map before the ReLU.
CAM_OTHER = [[0, 2 / 3, 0], [1, 0, 0], [1 / 3, 0, 1 / 3]]


class GapHead(nn.Module):
    """Identity 1x1 conv (the target layer, outputs exactly its input) -> GAP -> Linear(2, 2).

    Fed the two feature maps A1, A2 as a 2-channel image, the conv outputs A; the head weights
    (3, -6) over a 3x3 map give dY/dA_k = w_k / 9, so alpha = (1/3, -2/3) as in the article.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 2, kernel_size=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
            self.fc.weight.copy_(tensor([[3, -6], [-3, 6]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_gradcam_worked_example_cam_from_gradients():
    act = tensor([A1, A2])[None]  # (1, 2, 3, 3)
    grad = torch.stack([torch.full((3, 3), 3 / 9), torch.full((3, 3), -6 / 9)])[None]
    cam, alpha = cam_from_gradients(act, grad)
    torch.testing.assert_close(alpha, tensor([[1 / 3, -2 / 3]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(cam, tensor([CAM_CAT]), rtol=0, atol=1e-6)
    # Before the ReLU: [[1/3, -2/3, 2/3], [-1, 1, 0], [-1/3, 1/3, -1/3]].
    pre = torch.einsum("nc,nchw->nhw", alpha, act)
    torch.testing.assert_close(pre, tensor([[[1 / 3, -2 / 3, 2 / 3], [-1, 1, 0],
                                             [-1 / 3, 1 / 3, -1 / 3]]]), rtol=0, atol=1e-6)


def test_gradcam_worked_example_through_the_pipeline():
    net = GapHead().eval().requires_grad_(False)
    x = tensor([A1, A2])[None].repeat(2, 1, 1, 1)  # the same image twice, two targets
    with GradCAM(net, resolve_layers(net, ["features"])) as m:
        out = m(x, lambda logits: torch.tensor([0, 1]))
    torch.testing.assert_close(out["gradcam_weights/features"],
                               tensor([[1 / 3, -2 / 3], [-1 / 3, 2 / 3]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["gradcam/features"], tensor([CAM_CAT, CAM_OTHER]),
                               rtol=0, atol=1e-6)
    # Y_cat = 3 mean(A1) - 6 mean(A2) = 3 * 14/9 - 6 * 7/9 = 0.
    torch.testing.assert_close(out["targets/score"], tensor([0.0, 0.0]), rtol=0, atol=1e-6)


# --- hooks ----------------------------------------------------------------------------------------


def test_tensor_hook_rewrites_the_gradient():
    # The article: x.register_hook(lambda grad: torch.clamp(grad, min=0)) on an intermediate.
    w = tensor([1.0, -2.0, 3.0]).requires_grad_()
    h = w * 2
    seen = []
    h.register_hook(lambda g: g.clamp(min=0))
    h.register_hook(lambda g: seen.append(g.clone()))  # hooks run in order: sees clamped grad
    (h * tensor([-1.0, 0.5, 2.0])).sum().backward()
    # dL/dh = (-1, 0.5, 2), clamped to (0, 0.5, 2); dL/dw = 2 * that.
    assert seen[0].tolist() == [0.0, 0.5, 2.0]
    assert w.grad.tolist() == [0.0, 1.0, 4.0]

    # On a leaf the hook changes what lands in .grad; a hook returning zeros zeroes it.
    b = tensor([0.5, 0.5]).requires_grad_()
    b.register_hook(torch.zeros_like)
    (b * 3).sum().backward()
    assert b.grad.tolist() == [0.0, 0.0]


class ClampedAtTheReLU(nn.Module):
    """The article's h = 2 w with a clamping hook on h, L = h . (-1, 0.5, 2), as a model
    camsweep's guided backprop can hook: h is the output of an nn.ReLU, and the +10 keeps
    every h positive so that the ReLU's own mask passes all of it (h = 2 w + 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        h = self.relu(2 * w + 10).flatten(1)
        return (h * tensor([-1.0, 0.5, 2.0])).sum(1, keepdim=True)


def test_guided_relu_hooks_rewrite_the_gradient_as_the_article():
    model = ClampedAtTheReLU().eval()
    w = tensor([1.0, -2.0, 3.0]).reshape(1, 1, 1, 3)
    with GuidedBackprop(model, {}, save_attribution=True) as m:
        out = m(w, target_fn(0))
    # dL/dh = (-1, 0.5, 2) clamped to (0, 0.5, 2) by the hook on the ReLU's output; x 2.
    assert out["guided_backprop_attribution/input"].flatten().tolist() == [0.0, 1.0, 4.0]
    assert not model.relu._forward_hooks
    # Unguided, the same model gives the plain gradient 2 (-1, 0.5, 2).
    assert input_gradient(model, w, 0).flatten().tolist() == [-2.0, 1.0, 4.0]


def resnet34_conv_shapes(n: int, size: int) -> dict[str, tuple[int, ...]]:
    """The output shape of every Conv2d in resnet34 for an (n, 3, size, size) input."""
    shapes = {"conv1": (n, 64, size // 2, size // 2)}
    for stage, (blocks, ch) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), 1):
        s = size // 4 // 2 ** (stage - 1)
        for b in range(blocks):
            shapes[f"layer{stage}.{b}.conv1"] = (n, ch, s, s)
            shapes[f"layer{stage}.{b}.conv2"] = (n, ch, s, s)
        if stage > 1:
            shapes[f"layer{stage}.0.downsample.0"] = (n, ch, s, s)
    return shapes


def test_forward_hooks_on_all_36_convs_of_resnet34():
    torch.manual_seed(0)
    model = torchvision.models.resnet34().eval().requires_grad_(False)
    layers = resolve_layers(model, ["type:Conv2d"])
    expected = resnet34_conv_shapes(2, 64)
    assert len(layers) == 36 == len(expected)
    assert set(layers) == set(expected)
    x = torch.randn(2, 3, 64, 64)

    with torch.inference_mode(), LayerRecorder(layers, for_grad=False) as rec:
        logits = model(x)
        assert {k: tuple(v.shape) for k, v in rec.outputs.items()} == expected
        # What was captured is the conv output: recompute the stem conv by hand.
        torch.testing.assert_close(rec.outputs["conv1"], model.conv1(x))
    assert all(not m._forward_hooks for m in model.modules())
    assert rec.outputs == {}

    with Activations(model, layers, dtype="float32") as m:
        out = m(x, target_fn("pred"))
    acts = {k.removeprefix("activations/"): v for k, v in out.items()
            if k.startswith("activations/")}
    assert len(acts) == 36
    assert {k: tuple(v.shape) for k, v in acts.items()} == expected
    assert all(v.dtype == torch.float32 for v in acts.values())
    assert out["predictions/class"][:, 0].tolist() == logits.argmax(1).tolist()
    assert all(not m._forward_hooks for m in model.modules())
