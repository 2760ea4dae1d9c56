"""GPU settings decided without a GPU: batch_size=auto and fp16 loss scaling."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose_cfg

from pipeline import runtime
from pipeline.methods import METHODS, Saliency, base, target_fn
from pipeline.models import resolve_layers
from pipeline.runtime import batch_size_of, scaled_grad


@pytest.mark.parametrize(("free_gib", "expected"), [
    (139.0, 128), (21.4, 128), (21.3, 64), (12.0, 64), (10.6, 32), (5.4, 32), (5.3, 16),
    (2.0, 16), (0.1, 16)])
def test_batch_size_auto_on_cuda_follows_free_memory(monkeypatch, free_gib, expected):
    """The largest power of two <= 6 images per free GiB, within 16..128."""
    asked = []

    def mem_get_info(device):
        asked.append(device)
        return int(free_gib * 2**30), 141 * 2**30

    monkeypatch.setattr(runtime.torch.cuda, "mem_get_info", mem_get_info)
    assert batch_size_of("auto", torch.device("cuda", 1)) == expected
    assert asked == [torch.device("cuda", 1)]  # the run's GPU, not GPU 0


def test_batch_size_auto_on_cpu_and_integers(monkeypatch):
    def no_gpu(device):
        raise AssertionError("a CPU run asked about GPU memory")

    monkeypatch.setattr(runtime.torch.cuda, "mem_get_info", no_gpu)
    assert batch_size_of("auto", torch.device("cpu")) == 16
    assert batch_size_of(7, torch.device("cpu")) == 7
    assert batch_size_of(300, torch.device("cuda")) == 300  # an integer is taken as given


def test_batch_size_is_auto_by_default_and_not_the_run_identity():
    from pipeline.extract import fingerprint

    cfg = compose_cfg(*TINY[:3], "data=samples")
    assert cfg.batch_size == "auto"
    assert fingerprint(cfg) == fingerprint(compose_cfg(*TINY[:3], "data=samples",
                                                       "batch_size=64"))


def _tiny_resnet() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_scaled_gradients_equal_plain_ones_in_float32(monkeypatch, name):
    """Every registered method, its gradients through loss scaling (forced on here in
    float32) against plain ones: scaling by 2**10 and back is exact, so the arrays are the
    same to the last bit."""
    model = _tiny_resnet()
    layers = resolve_layers(model, ["layer3", "layer4"]) if METHODS[name].uses_layers else {}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(2)  # SmoothGrad's noise
        with METHODS[name](model, layers) as method:
            return method(x, target_fn("pred"))

    plain = run()
    calls = []

    def forced(dtype):
        calls.append(dtype)
        return runtime.LOSS_SCALE

    monkeypatch.setattr(base, "loss_scale_of", forced)
    scaled = run()
    assert bool(calls) == METHODS[name].needs_grad  # every gradient took the scaled path
    assert plain.keys() == scaled.keys()
    for key in plain:
        assert torch.equal(plain[key], scaled[key]), key


def _small_gradients() -> torch.nn.Module:
    """A 1x1 convolution and a linear layer whose weights make dY/dx = w1 * w2: 1.5e-8 for
    class 1, below fp16's smallest subnormal (2**-24 = 6e-8) by more than half of it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1, bias=False), torch.nn.Flatten(),
                                torch.nn.Linear(16, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e-4)
        model[2].weight[0].fill_(2e-4)
        model[2].weight[1].fill_(1.5e-4)
    return model


def test_fp16_saliency_keeps_gradients_that_underflow_unscaled(monkeypatch):
    """Saliency under fp16 autocast (on the CPU here): unscaled, the half-precision backward
    flushes the 1.5e-8 gradients to zero; with loss scaling (2**10: 1.5e-5 in fp16, a
    subnormal with 8 bits) they come back within 0.5 % of float32's."""
    model = _small_gradients()
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))

    def saliency(dtype):
        with Saliency(model, {}, autocast_dtype=dtype) as method:
            return method(x, target_fn(1))["saliency/input"]

    fp32, fp16 = saliency(None), saliency(torch.float16)
    w1, w2 = torch.tensor(1e-4).half().double(), torch.tensor(1.5e-4).half().double()
    torch.testing.assert_close(fp32.double(), torch.full((2, 4, 4), 1.5e-8, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(fp16.double(), (w1 * w2).expand(2, 4, 4), rtol=5e-3, atol=0)
    monkeypatch.setattr(base, "loss_scale_of", lambda dtype: None)
    assert not saliency(torch.float16).any()  # what fp16 gave before loss scaling


def test_an_overflowing_scale_is_lowered_and_the_pass_repeated(monkeypatch):
    """Half-precision gradients of 100: at 2**10 they overflow (102400 > 65504), at 2**5
    they fit; the result is the exact gradient, from a second pass."""
    passes = []
    grad = torch.autograd.grad

    def counted(total, inputs, **kw):
        passes.append(float(total.detach()))
        return grad(total, inputs, **kw)

    monkeypatch.setattr(runtime.torch.autograd, "grad", counted)
    x = torch.full((3,), 0.5, dtype=torch.float16, requires_grad=True)
    w = torch.tensor([100.0, -100.0, 3.0], dtype=torch.float16)
    (g,) = scaled_grad((x * w).float().sum(), [x], runtime.LOSS_SCALE)
    assert g.dtype == torch.float32 and g.tolist() == [100.0, -100.0, 3.0]
    assert passes == [1.5 * 1024, 1.5 * 32]  # sum(x * w) = 1.5, times each scale
    passes.clear()
    # Non-finite gradients at every scale (a NaN weight) end at scale 1, as unscaled ones.
    w[2] = float("nan")
    (g,) = scaled_grad((x * w).float().sum(), [x], runtime.LOSS_SCALE)
    assert len(passes) == 3 and g[:2].tolist() == [100.0, -100.0] and g[2].isnan()


def test_loss_scaling_only_under_fp16():
    assert runtime.loss_scale_of(torch.float16) == 2.0**10
    assert runtime.loss_scale_of(torch.bfloat16) is None
    assert runtime.loss_scale_of(None) is None
