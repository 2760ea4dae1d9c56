"""The run as it was, for the evaluate stage: its stored config (plain data, checked), the
model rebuilt from it, the rows, maps, targets and scores to evaluate, and which score the
metrics take. ``results.h5`` is opened read-only, through :func:`pipeline.store.open_results`.

Files are data, never code: a ``model._target_`` stored in the results file is imported
and called only when this invocation's own config names the same ``model._target_``
(:func:`model_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from .errors import ConfigError, StoreError, unknown
from .store import (
    DONE,
    INPUT_MAP,
    INPUT_SIZE,
    LAYER_MAP,
    identity,
    open_results,
    read_column,
    stored_config,
    stored_maps,
)


@dataclass
class Setup:
    """The run as it was: its config, model, normalization, data and what to evaluate."""

    stored: DictConfig
    model: nn.Module
    layers: dict[str, nn.Module]
    normalize: nn.Module
    image_size: int
    resize: str
    decode: str
    paths: list[str]
    labels: np.ndarray
    rows: np.ndarray  # rows to evaluate (done rows, after evaluate.limit)
    maps: list[str]
    targets: np.ndarray  # (N,), or (N, k) for target=topk
    scores: np.ndarray
    sizes: np.ndarray
    seen: np.ndarray
    n: int
    autocast: torch.dtype | None
    results: dict[str, str]  # identity of the results file (store.identity)
    input_sizes: np.ndarray | None = None  # native resolution (resize "none"): (N, 2)
    content: np.ndarray | None = None  # (N,) content hashes at extraction (0: not read)


def _literal(value: Any) -> Any:
    """A stored config as plain data: ``${...}`` would be an OmegaConf interpolation that
    runs a resolver when read, so it is escaped (the stored config was resolved when
    written and holds none)."""
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    if isinstance(value, str):
        return value.replace("${", "\\${")
    return value


def _stored_config(f: Any, path: Path) -> DictConfig:
    data = stored_config(f, path)
    if not all(isinstance(data.get(k), dict) for k in ("model", "method", "data")):
        raise StoreError(f"{path} is damaged: its stored config lacks model/method/data")
    return OmegaConf.create(_literal(data))


def model_config(stored: DictConfig, cfg: DictConfig, path: Path) -> DictConfig:
    """The stored model config, once it is known to name only code the user allowed.

    A stored ``model._target_`` (any importable callable) is honoured only when this
    invocation's ``model._target_`` is the same; shipped model names are checked by
    :func:`pipeline.models.build_model`.
    """
    from .config import ModelConfig

    target = stored.model.get("_target_")
    if target is not None:
        given = cfg.model.get("_target_") if "model" in cfg else None
        if given != target:
            raise ConfigError(
                f"{path} asks to import and call model._target_={target!r}; a results file "
                f"does not choose code to run: pass model._target_={target} on the evaluate "
                "command line to allow it")
    try:
        return OmegaConf.merge(OmegaConf.structured(ModelConfig), stored.model)
    except OmegaConfBaseException as e:
        raise StoreError(f"{path}: its stored model config does not fit ("
                         f"{str(e).splitlines()[0]})") from e


def _attr(f: Any, name: str, path: Path) -> Any:
    if name not in f.attrs:
        raise StoreError(f"{path} is damaged: root attribute {name!r} is missing")
    return f.attrs[name]


def read_setup(cfg: DictConfig, path: Path, device: torch.device) -> Setup:
    """Read what evaluation needs from the results file (read-only, checked), then rebuild
    the model."""
    from .methods import METHODS
    from .models import build_model, resolve_layers, use_channels_last
    from .runtime import AUTOCAST, Normalize
    from .store import attr_list

    with open_results(path) as f:
        stored = _stored_config(f, path)
        model_cfg = model_config(stored, cfg, path)  # before anything is imported
        maps = [m.key for m in stored_maps(f, kinds=(LAYER_MAP, INPUT_MAP))]
        if not maps:
            raise StoreError(f"{path} holds no attribution maps to evaluate (method="
                             f"{f.attrs.get('method')}); evaluate needs a CAM or saliency run")
        wanted = list(cfg.evaluate.maps) if cfg.evaluate.maps else maps
        for key in wanted:
            if key not in maps:
                raise ConfigError(unknown("evaluate.maps entry", key, maps))
        status = read_column(f, "images/status")
        rows = np.flatnonzero(status == DONE)
        if cfg.evaluate.limit is not None:
            rows = rows[: max(0, int(cfg.evaluate.limit))]
        try:
            mean, std = attr_list(_attr(f, "mean", path)), attr_list(_attr(f, "std", path))
            image_size = int(_attr(f, "image_size", path))
        except (TypeError, ValueError) as e:
            raise StoreError(f"{path} is damaged: mean/std/image_size do not parse") from e
        setup_kw = dict(
            paths=list(read_column(f, "images/path")), labels=read_column(f, "images/label"),
            targets=read_column(f, "targets/class"), scores=read_column(f, "targets/score"),
            sizes=read_column(f, "images/size"), seen=read_column(f, "images/box"),
            n=len(status), image_size=image_size, resize=str(f.attrs.get("resize", "square")),
            results=identity(f),
            input_sizes=read_column(f, INPUT_SIZE) if INPUT_SIZE in f else None,
            # files of before content hashes have none: nothing to compare
            content=(read_column(f, "images/content_hash")
                     if "images/content_hash" in f else None))
    if setup_kw["resize"] == "none" and setup_kw["input_sizes"] is None:
        raise StoreError(f"{path} is damaged: a native-resolution run without /{INPUT_SIZE}")
    method_name = stored.method.get("name")
    if method_name not in METHODS:
        raise StoreError(f"{path}: {unknown('stored method', method_name, METHODS)}")
    torch.manual_seed(int(stored.get("seed", 0)))  # random-init models: the same weights
    model, _ = build_model(model_cfg)
    model.to(device)
    size = setup_kw["image_size"]
    # Speed only (the numbers agree up to float rounding): NHWC where channels_last says.
    use_channels_last(model, cfg.channels_last, torch.zeros(1, 3, size, size, device=device))
    layers = (resolve_layers(model, list(stored.model.target_layers))
              if METHODS[method_name].uses_layers else {})
    return Setup(
        stored=stored, model=model, layers=layers,
        normalize=Normalize(tuple(mean), tuple(std)).to(device),
        decode=str(stored.data.get("decode", "cpu")), rows=rows, maps=wanted,
        autocast=AUTOCAST.get(stored.get("precision", "fp32")), **setup_kw)


def explained_score(stored: DictConfig) -> str:
    """The run's ``target.score``: what its maps explain and ``/targets/score`` holds (runs
    from before the key existed explained the logit)."""
    target = stored.get("target")
    return str(target.get("score", "logit")) if isinstance(target, DictConfig) else "logit"


def metric_score(ev: Any, stored: DictConfig) -> str:
    """The score the metrics take: ``evaluate.score``, or (null) the run's own."""
    return str(ev.score) if ev.score is not None else explained_score(stored)


def confidence_score(score: str) -> str:
    """The score of Average Drop / Increase in Confidence: a confidence in [0, 1] as in
    Grad-CAM++ (softmax probability; sigmoid where the metrics score sigmoid). A drop
    relative to a logit or a log-probability, which may be negative or zero, means nothing."""
    return score if score in ("prob", "sigmoid") else "prob"
