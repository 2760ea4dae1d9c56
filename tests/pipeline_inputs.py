"""The model and input batch that ``extract`` builds for a config, rebuilt by hand, so that
tests can call a method class directly on exactly what the pipeline fed it."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.data import ImageDataset, build_records, collate
from pipeline.models import build_model
from pipeline.runtime import Normalize


def model_and_inputs(cfg: DictConfig, n: int) -> tuple[nn.Module, torch.Tensor]:
    """``cfg``'s model (seeded as extract seeds it) and its first ``n`` images, decoded,
    resized and normalized as extract does on the CPU: (N, 3, S, S) float32, NCHW."""
    torch.manual_seed(cfg.seed)
    model, info = build_model(cfg.model)
    records = build_records(cfg.data)[:n]
    dataset = ImageDataset(records, np.arange(n), cfg.data.image_size, cfg.data.resize)
    pixels = collate([dataset[i] for i in range(n)])["pixels"]
    return model, Normalize(info.mean, info.std)(pixels)
