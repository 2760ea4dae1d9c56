"""The CUDA path. These run only where a GPU is present; elsewhere they are skipped with
the reason shown in pytest's summary (-ra)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY, compose_cfg

from pipeline.extract import extract
from pipeline.results import load_run

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="CUDA TESTS NOT RUN: no CUDA GPU on this machine"),
]


@pytest.fixture
def base(image_dir):
    return (*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg",
            "model.target_layers=[layer3,layer4]")


def _cams(run_dir, layer="layer4") -> np.ndarray:
    with load_run(run_dir) as run:
        assert run.done.all()
        return run.cams(layer)


def test_cuda_run_equals_cpu_run(tmp_path, base):
    extract(compose_cfg(*base, "device=cpu"), tmp_path / "cpu")
    extract(compose_cfg(*base, "device=cuda"), tmp_path / "gpu")
    for layer in ("layer3", "layer4"):
        np.testing.assert_allclose(_cams(tmp_path / "gpu", layer), _cams(tmp_path / "cpu", layer),
                                   rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_agrees_with_fp32(tmp_path, base, precision):
    extract(compose_cfg(*base, "device=cuda"), tmp_path / "fp32")
    extract(compose_cfg(*base, "device=cuda", f"precision={precision}"), tmp_path / precision)
    full, low = _cams(tmp_path / "fp32"), _cams(tmp_path / precision)
    assert np.abs(full - low).max() > 0  # autocast really ran: the low precision shows
    for a, b in zip(full, low, strict=True):
        na = (a - a.min()) / (a.max() - a.min() + 1e-7)
        nb = (b - b.min()) / (b.max() - b.min() + 1e-7)
        assert np.abs(na - nb).max() < 0.1


def test_gpu_jpeg_decoding_matches_cpu_decoding(tmp_path, base):
    extract(compose_cfg(*base, "device=cuda"), tmp_path / "pil")
    extract(compose_cfg(*base, "device=cuda", "data.decode=device"), tmp_path / "nvjpeg")
    a, b = _cams(tmp_path / "pil"), _cams(tmp_path / "nvjpeg")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_channels_last_and_saliency_on_cuda(tmp_path, base):
    extract(compose_cfg(*base, "device=cuda", "channels_last=true"), tmp_path / "cl")
    extract(compose_cfg(*base, "device=cuda"), tmp_path / "plain")
    np.testing.assert_allclose(_cams(tmp_path / "cl"), _cams(tmp_path / "plain"),
                               rtol=1e-3, atol=1e-5)
    extract(compose_cfg(*base, "device=cuda", "method=saliency"), tmp_path / "sal")
    with load_run(tmp_path / "sal") as run:
        assert run.saliency().shape == (6, 64, 64)
