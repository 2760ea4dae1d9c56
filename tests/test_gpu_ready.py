"""GPU settings decided without a GPU: batch_size=auto and fp16 loss scaling."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose_cfg

from pipeline import runtime
from pipeline.runtime import batch_size_of


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
