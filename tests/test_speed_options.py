"""Speed options change speed, not results: channels_last, compile, bf16 autocast."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import TINY, compose_cfg
from torch import nn

from pipeline.extract import extract
from pipeline.methods import GradCAM, target_fn
from pipeline.models import compile_model, resolve_layers, use_channels_last
from pipeline.results import load_run


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval().requires_grad_(False)


def test_channels_last_gives_the_same_maps(tmp_path, image_dir):
    base = (*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg",
            "model.target_layers=[layer3,layer4]")
    extract(compose_cfg(*base, "channels_last=false"), tmp_path / "a")
    extract(compose_cfg(*base, "channels_last=true"), tmp_path / "b")
    with load_run(tmp_path / "a") as a, load_run(tmp_path / "b") as b:
        for layer in ("layer3", "layer4"):
            np.testing.assert_allclose(a.cams(layer), b.cams(layer), rtol=1e-4, atol=1e-6)


class Flattens(nn.Module):
    """A model written for NCHW: ``.view`` of a convolution's output fails in NHWC."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def test_channels_last_auto(caplog):
    """auto: NHWC on the CPU; a model that cannot run in NHWC stays NCHW and says so."""
    x = torch.zeros(1, 3, 8, 8)
    net = small_net()
    assert use_channels_last(net, "auto", x)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not use_channels_last(small_net(), False, x)
    flat = Flattens().eval()
    with caplog.at_level(logging.INFO, logger="pipeline.models"):
        assert not use_channels_last(flat, "auto", x)
    assert "does not run in NHWC" in caplog.text
    assert flat.conv.weight.is_contiguous()
    flat(x)  # runs as before
    assert use_channels_last(Flattens(), True, x)  # asked for explicitly: no probe, no retreat


@pytest.mark.slow
def test_compiled_model_gives_the_same_maps():
    model = small_net()
    layers = resolve_layers(model, ["2"])
    x = torch.randn(3, 3, 16, 16)
    with GradCAM(model, layers) as m:
        ref = m(x, target_fn("pred"))
    compiled = compile_model(model, x[:1])
    assert compiled is not model  # really compiled here (gcc is available)
    with GradCAM(compiled, layers) as m:
        out = m(x, target_fn("pred"))
    torch.testing.assert_close(out["gradcam/2"], ref["gradcam/2"], rtol=1e-4, atol=1e-6)
    assert not model[2]._forward_hooks


@pytest.mark.slow
def test_compile_with_two_layers_equals_eager_and_compiles_before_the_loop(
        tmp_path, image_dir, monkeypatch):
    """Each hooked layer is a graph break: in one graph the kept layer4 would be a sibling
    of the score (its gradient None). The warm-up runs the loop's own call (grad mode,
    hooks, batch size), so no graph is compiled once the batches start."""
    from torch._dynamo.utils import counters

    import pipeline.extract as extract_mod

    graphs: dict[str, int] = {}
    real = extract_mod._warm_up

    def spy(*args: object) -> None:
        real(*args)
        graphs["warm"] = counters["stats"]["unique_graphs"]

    monkeypatch.setattr(extract_mod, "_warm_up", spy)
    base = (*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg", "batch_size=3",
            "model.target_layers=[layer3,layer4]")
    extract(compose_cfg(*base), tmp_path / "eager")
    torch._dynamo.reset()
    done = extract(compose_cfg(*base, "compile=true"), tmp_path / "compiled")
    assert done.done == 6
    assert graphs["warm"] > 0  # really compiled (gcc is available)
    assert counters["stats"]["unique_graphs"] == graphs["warm"]
    with load_run(tmp_path / "eager") as a, load_run(tmp_path / "compiled") as b:
        for layer in ("layer3", "layer4"):
            np.testing.assert_allclose(b.cams(layer), a.cams(layer), rtol=0, atol=1e-6)


def test_compile_failure_falls_back_to_eager_with_a_message(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    model = small_net()
    with caplog.at_level(logging.WARNING):
        assert compile_model(model, torch.zeros(1, 3, 8, 8)) is model
    assert "torch.compile failed (RuntimeError: no C++ compiler); running eagerly" in caplog.text


def test_bf16_autocast_maps_agree_with_fp32(tmp_path, image_dir):
    """bf16 keeps 8 bits of mantissa: normalized maps agree to a few percent, and differ
    (measured 0.008-0.06 per image, raw maps by ~0.3 % of their peak): were autocast off,
    the bf16 run would equal the fp32 one and prove nothing."""
    base = (*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg")
    extract(compose_cfg(*base), tmp_path / "fp32")
    extract(compose_cfg(*base, "precision=bf16"), tmp_path / "bf16")
    with load_run(tmp_path / "fp32") as a, load_run(tmp_path / "bf16") as b:
        assert (a.targets[0] == b.targets[0]).all()
        diffs = []
        for x, y in zip(a.cams("layer4"), b.cams("layer4"), strict=True):
            assert np.abs(x - y).max() > 0  # every map went through bf16
            nx = (x - x.min()) / (x.max() - x.min() + 1e-7)
            ny = (y - y.min()) / (y.max() - y.min() + 1e-7)
            assert np.abs(nx - ny).max() < 0.1
            diffs.append(np.abs(nx - ny).max())
        assert max(diffs) > 1e-3


def test_decode_on_device_matches_pil_decoding(tmp_path, bad_dir):
    """data.decode=device: torchvision's decoder (nvJPEG on a GPU, libjpeg-turbo here),
    crop and antialiased resize on the device; PNG, CMYK and broken files as before.
    The pixels themselves are compared in test_data.py."""
    base = (*TINY, "data=glob", f"data.pattern={bad_dir}/*", "method=activations",
            "method.dtype=float32", "model.target_layers=[conv1]", "data.resize=center_crop")
    cpu = extract(compose_cfg(*base), tmp_path / "cpu")
    dev = extract(compose_cfg(*base, "data.decode=device"), tmp_path / "dev")
    assert (cpu.done, cpu.failed) == (dev.done, dev.failed) == (7, 3)
    with load_run(tmp_path / "cpu") as a, load_run(tmp_path / "dev") as b:
        assert (a.status == b.status).all()
        np.testing.assert_array_equal(a.sizes, b.sizes)
        done = a.done
        # Same pixels up to the resampler's rounding of the crop box: conv1 outputs close.
        diff = np.abs(a.activations("conv1")[done] - b.activations("conv1")[done])
        assert diff.mean() < 0.05 * np.abs(a.activations("conv1")[done]).mean()
