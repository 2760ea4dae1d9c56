#!/usr/bin/env python
"""Throughput and peak memory of camsweep's methods beside pytorch-grad-cam and Captum.

One run measures every (model, batch, method) cell on the same synthetic input and the same
target classes, so the ratios in the summary come from one run on one machine:

    python benchmarks/bench_methods.py                 # CPU: resnet34/50, batch 1, 8, 32
    python benchmarks/bench_methods.py --quick         # resnet34, batch 1 and 8, short
    python benchmarks/bench_methods.py --device cuda --precision bf16   # GPU defaults
    python benchmarks/bench_methods.py --family        # + the other methods and their peers
                                                       # (resnet18, 112x112, batch 4)

Each cell runs in a fresh child process (forked from a server that has imported torch once),
so no cell inherits another's allocator state, retained graphs or caches, and its peak memory
can be read cleanly: on CPU the peak resident set size above the resident size just before
the first call (Linux VmHWM after resetting it through /proc/self/clear_refs); on CUDA
``torch.cuda.max_memory_allocated`` above the memory allocated before the first call.
Results: a Markdown table on stdout and ``benchmarks/results/methods-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import itertools
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from _common import (
    ROOT,
    TIMM_LAYERS,
    argument_parser,
    busy_warning,
    fmt,
    fmt_ratio,
    machine_info,
    machine_lines,
    markdown_table,
    resolve_device,
    synchronize,
    time_calls,
    write_results,
)

# Method names as they appear in the tables; "ours" are camsweep's classes.
FORWARD = "forward"
OURS_GRADCAM, OURS_SALIENCY, OURS_ACTIVATIONS = "gradcam", "saliency", "activations-fp16"
PGC_GRADCAM = "pgc-gradcam"
CAPTUM_GRADCAM, CAPTUM_SALIENCY = "captum-layergradcam", "captum-saliency"
METHODS = (FORWARD, OURS_GRADCAM, OURS_SALIENCY, OURS_ACTIVATIONS, PGC_GRADCAM, CAPTUM_GRADCAM,
           CAPTUM_SALIENCY)
# The family (off by default; --family or --methods): each of our other methods, built as
# pipeline.methods builds it (METHODS[name](model, layers, **options)), beside its peer.
# Options are small so that a CPU run stays short, and each peer gets the same work.
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "gradcampp": {}, "xgradcam": {}, "layercam": {}, "hirescam": {},
    "scorecam": {"batch_masks": 64},  # pgc ScoreCAM: batch_size = 64
    "eigencam": {},
    # Captum NoiseTunnel(Saliency): nt_samples=8, stdevs = 0.15 x the image's value range
    "smoothgrad": {"samples": 8, "sigma": 0.15, "batch_samples": 32},
    # Captum IntegratedGradients: n_steps=16, gausslegendre, zero baseline,
    # internal_batch_size = 32 (the same inputs per forward pass)
    "integrated_gradients": {"steps": 16, "batch_steps": 32},
    "guided_backprop": {}, "guided_gradcam": {},
}
# Our method -> its peer (pytorch-grad-cam for the CAMs, Captum for the rest).
FAMILY_PEERS = {
    "gradcampp": "pgc-gradcampp", "xgradcam": "pgc-xgradcam", "layercam": "pgc-layercam",
    "hirescam": "pgc-hirescam", "scorecam": "pgc-scorecam", "eigencam": "pgc-eigencam",
    "smoothgrad": "captum-smoothgrad", "integrated_gradients": "captum-integrated-gradients",
    "guided_backprop": "captum-guided-backprop", "guided_gradcam": "captum-guided-gradcam",
}
FAMILY = tuple(m for pair in FAMILY_PEERS.items() for m in pair)
ALL_METHODS = METHODS + FAMILY
# Family defaults (Score-CAM alone is 512 forward passes per image at resnet's layer4).
FAMILY_MODELS, FAMILY_IMAGE_SIZE, FAMILY_BATCHES, FAMILY_QUICK_BATCHES = (
    ["resnet18"], 112, [4], [2])
# Which of our maps each peer's map is compared with. SmoothGrad only at batch 1 (see
# `agreement`): Captum takes one noise level per input tensor, ours one per image.
# Timed round-robin in one process as well (--interleave): the design targets' ratios.
INTERLEAVED = (FORWARD, OURS_GRADCAM, PGC_GRADCAM)
COMPARED_WITH = {PGC_GRADCAM: OURS_GRADCAM, CAPTUM_GRADCAM: OURS_GRADCAM,
                 CAPTUM_SALIENCY: OURS_SALIENCY, **{p: o for o, p in FAMILY_PEERS.items()}}

# Target layer and token reshape per model (as the shipped conf/model/*.yaml).
MODELS: dict[str, tuple[str, str | None]] = {
    "resnet18": ("layer4", None),
    "resnet34": ("layer4", None),
    "resnet50": ("layer4", None),
    "vgg16": ("features", None),
    "mobilenet_v3_large": ("features", None),
    "efficientnet_b0": ("features", None),
    "vit_b_16": ("encoder.layers.encoder_layer_11.ln_1", "vit"),
    # The embedded pretrained model, on the bundled photos (see model_inputs).
    "efficientnet_lite0": ("features", None),
    # timm (random init): ours detects the layout; the peers get the explicit reshape.
    "timm/convnext_atto": (TIMM_LAYERS["convnext_atto"], None),
    "timm/vit_tiny_patch16_224": (TIMM_LAYERS["vit_tiny_patch16_224"], "vit"),
}
PRETRAINED = ("efficientnet_lite0",)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("nchw", "nhwc")  # nhwc: channels_last model and input, for every method alike
IMAGE_SIZE = 224
SEED = 0
MIB = 2**20


@dataclass(frozen=True)
class CellSpec:
    model: str
    batch: int
    method: str
    device: str
    precision: str
    classes: tuple[int, ...]  # the target class of each image, from one plain forward
    warmup: int
    min_repeats: int
    min_time: float
    max_time: float
    agree_images: int  # how many images' maps to send back for the agreement check
    threads: int | None
    image_size: int = IMAGE_SIZE
    channels_last: bool = False  # model and input in NHWC (every method of the cell alike)
    micro_batch: int | None = None  # ours: images per pass, as extract runs them


def layout_of(channels_last: bool) -> str:
    return "nhwc" if channels_last else "nchw"


def cell_key(cell: dict[str, Any]) -> tuple[str, int, str]:
    """(model, batch, layout): the cells whose methods are compared with each other."""
    return cell["model"], cell["batch"], cell.get("layout", "nchw")


# --------------------------------------------------------------------------- inputs, models


def synthetic_images(n: int, seed: int = SEED, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(n, 3, size, size) standard-normal "normalized images"; image i is the same for every
    n."""
    return torch.stack([
        torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed + i))
        for i in range(n)
    ])


@functools.cache
def _lite0() -> tuple[torch.nn.Module, Any]:
    """The embedded pretrained Lite0 and its ModelInfo, loaded once per process (callers
    copy the module)."""
    from omegaconf import OmegaConf

    from pipeline.config import ModelConfig
    from pipeline.models import build_model

    yaml = OmegaConf.load(ROOT / "conf" / "model" / "efficientnet_lite0.yaml")
    yaml.pop("defaults", None)
    return build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml))


def model_inputs(name: str, n: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Synthetic images for random-init models; for a pretrained one the bundled photos
    (chelsea, coffee, astronaut, rocket, in turn), squashed to ``size`` and normalized as
    the model wants: real images give real activations (a trained net on noise does not)."""
    if name not in PRETRAINED:
        return synthetic_images(n, size=size)
    from PIL import Image

    from pipeline.data import SAMPLES_DIR

    _, info = _lite0()
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    photos = []
    for stem in ("chelsea", "coffee", "astronaut", "rocket"):
        img = Image.open(SAMPLES_DIR / f"{stem}.jpg").convert("RGB").resize(
            (size, size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        photos.append((pixels - mean) / std)
    return torch.stack([photos[i % len(photos)] for i in range(n)])


def build(name: str, frozen: bool, channels_last: bool = False) -> torch.nn.Module:
    """Random-init weights, equal in every process (seeded). Ours: frozen parameters, as
    ``pipeline.models.build_model`` makes them; the peers need parameters that require grad
    (equal to ``copy.deepcopy(model).requires_grad_(True)``). ``channels_last``: NHWC
    weights, as ``channels_last=true`` makes them in a run (and as a peer's user would)."""
    torch.manual_seed(SEED)
    if name in PRETRAINED:
        model = copy.deepcopy(_lite0()[0])
    elif name.startswith("timm/"):
        import timm

        model = timm.create_model(name.removeprefix("timm/"), pretrained=False).eval()
    else:
        model = torchvision.models.get_model(name, weights=None).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    if not head.weight.any():
        # torchvision zero-initializes ViT's head: every gradient, and so every map, would
        # be zero, and the agreement check vacuous.
        with torch.no_grad():
            head.weight.normal_(0, 0.01)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.requires_grad_(not frozen)


def predicted_classes(name: str, n: int, device: torch.device, size: int = IMAGE_SIZE
                      ) -> tuple[int, ...]:
    """Top-1 classes of the first ``n`` synthetic images: the targets every method explains."""
    model = build(name, frozen=True).to(device)
    out = []
    with torch.inference_mode():
        for chunk in model_inputs(name, n, size).split(32):
            out += model(chunk.to(device)).argmax(1).tolist()
    return tuple(out)


def pgc_vit_reshape(t: torch.Tensor, height: int = 14, width: int = 14) -> torch.Tensor:
    """pytorch-grad-cam's ViT example: drop the class token, tokens to a (C, h, w) map."""
    return t[:, 1:, :].reshape(t.size(0), height, width, t.size(2)).permute(0, 3, 1, 2)


def pgc_reshape(kind: str | None, size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if kind != "vit":
        return None
    side = size // 16
    return lambda t: pgc_vit_reshape(t, side, side)


# --------------------------------------------------------------------------- peak memory


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory a block of calls needs above what was in use when it started."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.how = ""
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.how = "torch.cuda.max_memory_allocated above the allocation before the calls"
            return
        with contextlib.suppress(OSError, AttributeError):
            # Hand freed heap pages back, so the calls cannot reuse memory that the baseline
            # counts but nothing holds (it would hide part of their need).
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.how = "peak RSS (VmHWM, reset before the calls) above RSS before the calls"
        except OSError:
            self.how = "peak RSS of the process (ru_maxrss) above RSS before the calls"
        self.base = _proc_status_kib("VmRSS") * 1024

    def stop(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.how.startswith("peak RSS (VmHWM"):
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mib": max(0, peak - self.base) / MIB, "baseline_mib": self.base / MIB,
                "peak_total_mib": peak / MIB}


# --------------------------------------------------------------------------- one cell

MapFn = Callable[[Any], np.ndarray | None]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype)


def _first(out: torch.Tensor, k: int) -> np.ndarray:
    return out[:k].detach().float().cpu().numpy()


def prepare_call(spec: CellSpec, device: torch.device, x: torch.Tensor, classes: torch.Tensor,
                 stack: contextlib.ExitStack) -> tuple[Callable[[], Any], MapFn]:
    """The call to time, and how to get the first images' raw maps from its result."""
    from pipeline.layouts import layer_reshape
    from pipeline.methods import Activations, GradCAM, Saliency
    from pipeline.models import resolve_layers

    layer, reshape_kind = MODELS[spec.model]
    k = spec.agree_images
    dtype = PRECISIONS[spec.precision]

    # Imported here, not in the timed calls: its imports would count as the cell's memory.
    from pipeline.extract import explain

    def ours(m: Any) -> Any:
        """Ours as extract calls it: in passes of ``micro_batch`` images, each explaining
        its images' classes (the same for every method; they equal the top-1 here)."""
        return explain(m, x, "label", classes, 1, spec.micro_batch)

    if spec.method in FAMILY_OPTIONS:
        return prepare_family_ours(spec, device, ours, stack)
    if spec.method in FAMILY:
        return prepare_family_peer(spec, device, x, classes, stack)
    if spec.method in (FORWARD, OURS_GRADCAM, OURS_SALIENCY, OURS_ACTIVATIONS):
        model = build(spec.model, frozen=True, channels_last=spec.channels_last).to(device)
        layers = resolve_layers(model, [layer])
        # As extract: the layout detected in a probe pass (vit_b_16: tokens, 1 prefix).
        reshape = layer_reshape(model, layers, (spec.image_size, spec.image_size),
                                device=device)[0]
        if spec.method == FORWARD:
            def forward() -> torch.Tensor:
                with torch.inference_mode(), _autocast(device, spec.precision):
                    return model(x)
            return forward, lambda out: None
        if spec.method == OURS_GRADCAM:
            m = stack.enter_context(GradCAM(model, layers, reshape=reshape, autocast_dtype=dtype))
            return lambda: ours(m), lambda out: _first(out[f"gradcam/{layer}"], k)
        if spec.method == OURS_SALIENCY:
            m = stack.enter_context(Saliency(model, {}, autocast_dtype=dtype))
            return lambda: ours(m), lambda out: _first(out["saliency/input"], k)
        m = stack.enter_context(Activations(model, layers, dtype="float16", reshape=reshape,
                                            autocast_dtype=dtype))
        return lambda: ours(m), lambda out: None

    model = build(spec.model, frozen=False, channels_last=spec.channels_last).to(device)
    module = dict(model.named_modules())[layer]
    if spec.method == PGC_GRADCAM:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = PGCGradCAM(model=model, target_layers=[module],
                         reshape_transform=pgc_reshape(reshape_kind, spec.image_size))
        # Not `with cam:` -- its __exit__ swallows IndexError.
        stack.callback(cam.activations_and_grads.release)
        targets = [ClassifierOutputTarget(c) for c in spec.classes[: spec.batch]]

        def pgc() -> np.ndarray:
            with _autocast(device, spec.precision):
                return cam(input_tensor=x, targets=targets)
        return pgc, lambda out: np.asarray(out[:k], dtype=np.float32)

    from captum.attr import LayerGradCam
    from captum.attr import Saliency as CaptumSaliency

    if spec.method == CAPTUM_GRADCAM:
        if reshape_kind is not None:
            raise NotImplementedError("Captum's LayerGradCam has no reshape for token outputs")
        lgc = LayerGradCam(model, module)

        def captum_gradcam() -> torch.Tensor:
            with _autocast(device, spec.precision):
                # relu_attributions: Grad-CAM's ReLU (Captum leaves it off by default).
                return lgc.attribute(x, target=classes, relu_attributions=True)
        return captum_gradcam, lambda out: _first(out[:, 0], k)
    if spec.method == CAPTUM_SALIENCY:
        sal = CaptumSaliency(model)

        def captum_saliency() -> torch.Tensor:
            with _autocast(device, spec.precision):
                return sal.attribute(x, target=classes, abs=True)
        return captum_saliency, lambda out: _first(out.amax(dim=1), k)
    raise ValueError(f"unknown method {spec.method!r}; valid: {', '.join(METHODS)}")


def prepare_family_ours(spec: CellSpec, device: torch.device, ours: Callable[[Any], Any],
                        stack: contextlib.ExitStack) -> tuple[Callable[[], Any], MapFn]:
    """One of our other methods, as ``pipeline.methods.build_method`` makes it."""
    from pipeline.layouts import layer_reshape
    from pipeline.methods import METHODS as OUR_METHODS
    from pipeline.models import resolve_layers

    layer, _ = MODELS[spec.model]
    cls = OUR_METHODS[spec.method]
    model = build(spec.model, frozen=True, channels_last=spec.channels_last).to(device)
    layers = resolve_layers(model, [layer]) if cls.uses_layers else {}
    # As extract: the layout detected in a probe pass (vit_b_16: tokens, 1 prefix).
    reshape = layer_reshape(model, layers, (spec.image_size, spec.image_size),
                            device=device)[0]
    m = stack.enter_context(cls(model, layers, reshape=reshape,
                                autocast_dtype=PRECISIONS[spec.precision],
                                **FAMILY_OPTIONS[spec.method]))
    key = f"{spec.method}/{layer if cls.uses_layers else 'input'}"
    return lambda: ours(m), lambda out: _first(out[key], spec.agree_images)


def prepare_family_peer(spec: CellSpec, device: torch.device, x: torch.Tensor,
                        classes: torch.Tensor, stack: contextlib.ExitStack
                        ) -> tuple[Callable[[], Any], MapFn]:
    """The peer of one of our other methods, with the same options."""
    layer, reshape_kind = MODELS[spec.model]
    k = spec.agree_images
    model = build(spec.model, frozen=False, channels_last=spec.channels_last).to(device)
    module = dict(model.named_modules())[layer]
    ours = next(o for o, p in FAMILY_PEERS.items() if p == spec.method)
    options = FAMILY_OPTIONS[ours]

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return _autocast(device, spec.precision)

    if spec.method.startswith("pgc-"):
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = {"gradcampp": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
               "layercam": pgc.LayerCAM, "hirescam": pgc.HiResCAM, "scorecam": pgc.ScoreCAM,
               "eigencam": pgc.EigenCAM}[ours]
        cam = cls(model=model, target_layers=[module],
                  reshape_transform=pgc_reshape(reshape_kind, spec.image_size))
        if ours == "scorecam":
            cam.batch_size = options["batch_masks"]
        stack.callback(cam.activations_and_grads.release)
        targets = [ClassifierOutputTarget(c) for c in spec.classes[: spec.batch]]

        def pgc_call() -> np.ndarray:
            with autocast():
                return cam(input_tensor=x, targets=targets)
        return pgc_call, lambda out: np.asarray(out[:k], dtype=np.float32)

    import captum.attr as ca

    def channel_max(out: torch.Tensor) -> np.ndarray:  # our reduction: max_c |attribution|
        return _first(out.abs().amax(dim=1), k)

    if ours == "smoothgrad":
        nt = ca.NoiseTunnel(ca.Saliency(model))
        flat = x.flatten(1)
        # One noise level per input tensor in Captum: the images' mean of ours (equal to
        # ours for a single image, where the noise itself is made identical too).
        stdev = float(options["sigma"] * (flat.amax(1) - flat.amin(1)).mean())
        per_pass = max(1, options["batch_samples"] // spec.batch)

        def captum_smoothgrad() -> torch.Tensor:
            torch.manual_seed(0)  # our noise bank's draws, for a single image (seed 0)
            with autocast():
                return nt.attribute(x, nt_type="smoothgrad", nt_samples=options["samples"],
                                    nt_samples_batch_size=per_pass, stdevs=stdev,
                                    target=classes, abs=False)
        return captum_smoothgrad, channel_max
    if ours == "integrated_gradients":
        ig = ca.IntegratedGradients(model)

        def captum_ig() -> torch.Tensor:
            with autocast():
                return ig.attribute(x, target=classes, n_steps=options["steps"],
                                    method="gausslegendre",
                                    internal_batch_size=options["batch_steps"])
        return captum_ig, channel_max
    if ours == "guided_backprop":
        gbp = ca.GuidedBackprop(model)

        def captum_gbp() -> torch.Tensor:
            with autocast():
                return gbp.attribute(x, target=classes)
        return captum_gbp, channel_max
    if reshape_kind is not None:
        raise NotImplementedError("Captum's GuidedGradCam has no reshape for token outputs")
    ggc = ca.GuidedGradCam(model, module)

    def captum_ggc() -> torch.Tensor:
        with autocast():
            return ggc.attribute(x, target=classes)
    return captum_ggc, channel_max


def run_cell(spec: CellSpec) -> dict[str, Any]:
    """Time one (model, batch, method) cell and measure its peak memory; plain data back."""
    result: dict[str, Any] = {"model": spec.model, "batch": spec.batch, "method": spec.method,
                              "layout": layout_of(spec.channels_last),
                              "precision": spec.precision, "error": None, "maps": None}
    # Captum's note that it made the input require grad, once per cell: not news here.
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    try:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        result["threads"] = torch.get_num_threads()
        device = torch.device(spec.device)
        x = model_inputs(spec.model, spec.batch, spec.image_size).to(device)
        if spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        classes = torch.tensor(spec.classes[: spec.batch], device=device)
        with contextlib.ExitStack() as stack:
            call, maps_of = prepare_call(spec, device, x, classes, stack)
            memory = PeakMemory(device)
            memory.start()
            # The first call's maps are kept (a few small arrays) for the agreement check.
            result["maps"] = maps_of(call())
            timing = time_calls(call, device, max(0, spec.warmup - 1), spec.min_repeats,
                                spec.min_time, spec.max_time)
            result["memory"] = memory.stop() | {"how": memory.how}
        result["timing"] = timing.as_dict() | {"warmup": spec.warmup}
        result["images_per_s"] = spec.batch / timing.median
    except Exception as e:  # reported in the table; the other cells go on
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        result["traceback"] = traceback.format_exc()
    return result


def run_interleaved(specs: list[CellSpec]) -> dict[str, Any]:
    """Time the calls of several cells round-robin in one process (no memory figures).

    Separate cells run minutes apart, each in its own process, so drift between them (clock
    frequency, other tenants, allocator state) lands on one method and not the other; here
    every round times each method once, so drift hits all of them alike and their ratios
    are steadier. At least ``min_repeats`` rounds and ``min_time`` seconds per method.
    """
    first = specs[0]
    result: dict[str, Any] = {"model": first.model, "batch": first.batch,
                              "layout": layout_of(first.channels_last), "error": None}
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    try:
        if first.threads:
            torch.set_num_threads(first.threads)
        device = torch.device(first.device)
        x = model_inputs(first.model, first.batch, first.image_size).to(device)
        if first.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        classes = torch.tensor(first.classes[: first.batch], device=device)
        seconds: dict[str, list[float]] = {s.method: [] for s in specs}
        with contextlib.ExitStack() as stack:
            calls = {s.method: prepare_call(s, device, x, classes, stack)[0] for s in specs}
            for call in calls.values():
                for _ in range(max(1, first.warmup)):
                    call()
            synchronize(device)
            t_start = time.perf_counter()
            while True:
                for method, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    synchronize(device)
                    seconds[method].append(time.perf_counter() - t0)
                spent = time.perf_counter() - t_start
                rounds = len(seconds[first.method])
                if spent >= first.max_time * len(calls) or (
                        rounds >= first.min_repeats and spent >= first.min_time * len(calls)):
                    break
        result["rounds"] = rounds
        result["median_s"] = {m: float(np.median(v)) for m, v in seconds.items()}
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return result


@contextlib.contextmanager
def _runner(in_process: bool) -> Iterator[Callable[[Callable[[Any], dict[str, Any]], Any],
                                                   dict[str, Any]]]:
    """``run(fn, arg)``: ``fn(arg)`` in a fresh process forked from a server that imported
    torch once (``run_cell`` for a cell, ``run_interleaved`` for a round-robin set)."""
    if in_process:
        yield lambda fn, arg: fn(arg)
        return
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch", "torchvision", "numpy"])

    def in_child(fn: Callable[[Any], dict[str, Any]], arg: Any) -> dict[str, Any]:
        try:
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                return pool.submit(fn, arg).result()
        except BrokenProcessPool as e:  # killed, e.g. out of memory
            what = asdict(arg) if isinstance(arg, CellSpec) else {}
            return {**what, "error": f"child process died: {e}", "maps": None}

    yield in_child


# --------------------------------------------------------------------------- agreement


def pgc_normalize(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What pytorch-grad-cam does to one layer's CAM before returning it: ReLU, per-image
    min-max (with its 1e-7), bilinear resize (cv2) to the input, then its layer aggregation
    (ReLU, mean over layers, min-max again)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    scaled = scale_cam_image(np.maximum(raw, 0), (size[1], size[0]))
    return scale_cam_image(np.maximum(scaled[:, None], 0).mean(axis=1))


def minmax(maps: np.ndarray) -> np.ndarray:
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return (maps - lo) / np.where(span > 0, span, 1)


def agreement(method: str, maps: np.ndarray, ours: np.ndarray, size: int = IMAGE_SIZE,
              batch: int = 1) -> float | None:
    """Max |difference| of a peer's map and ours after the same normalization; None where
    all our maps are flat (all zero, say), which would make any agreement vacuous, and for
    SmoothGrad on more than one image: Captum takes one noise level per input tensor (ours is
    per image) and draws the noise of all images at once, so only a single image's noise can
    be made the same (seed 0, our noise bank's draws)."""
    if not (ours.max(axis=(1, 2)) > ours.min(axis=(1, 2))).any():
        return None
    if method == FAMILY_PEERS["smoothgrad"] and batch != 1:
        return None
    size = (size, size)
    if method == PGC_GRADCAM or method.startswith("pgc-"):  # its output is normalized
        return float(np.abs(maps - pgc_normalize(ours, size)).max())
    if method == CAPTUM_GRADCAM:
        return float(np.abs(pgc_normalize(maps, size) - pgc_normalize(ours, size)).max())
    return float(np.abs(minmax(maps) - minmax(ours)).max())


# --------------------------------------------------------------------------- report


def _ratio(by: dict[str, dict[str, Any]], a: str, b: str, field: str) -> float | None:
    """``field`` of method ``a`` over that of method ``b``, where both were measured."""
    def get(m: str) -> float | None:
        value = by.get(m, {})
        for part in field.split("."):
            value = value.get(part, {}) if isinstance(value, dict) else {}
        return value if isinstance(value, (int, float)) else None

    va, vb = get(a), get(b)
    return va / vb if va is not None and vb else None


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, batch): the ratios the design's performance targets speak of."""
    out = []
    for key in dict.fromkeys(cell_key(c) for c in cells):
        by = {c["method"]: c for c in cells if cell_key(c) == key}
        # pytorch-grad-cam as its users run it: NCHW (its examples never convert layouts).
        pgc_nchw = next((c for c in cells if cell_key(c) == (*key[:2], "nchw")
                         and c["method"] == PGC_GRADCAM), {})
        speed, mem = "images_per_s", "memory.peak_mib"
        out.append({
            "model": key[0], "batch": key[1], "layout": key[2],
            "gradcam_vs_forward": _ratio(by, OURS_GRADCAM, FORWARD, speed),
            "gradcam_vs_pgc": _ratio(by, OURS_GRADCAM, PGC_GRADCAM, speed),
            "gradcam_vs_pgc_nchw": _ratio({**by, "pgc-nchw": pgc_nchw}, OURS_GRADCAM,
                                          "pgc-nchw", speed),
            "gradcam_vs_captum": _ratio(by, OURS_GRADCAM, CAPTUM_GRADCAM, speed),
            "saliency_vs_captum": _ratio(by, OURS_SALIENCY, CAPTUM_SALIENCY, speed),
            "gradcam_memory_vs_pgc": _ratio(by, OURS_GRADCAM, PGC_GRADCAM, mem),
            "gradcam_memory_vs_captum": _ratio(by, OURS_GRADCAM, CAPTUM_GRADCAM, mem),
            "saliency_memory_vs_captum": _ratio(by, OURS_SALIENCY, CAPTUM_SALIENCY, mem),
            **{f"max_abs_diff_{m}": by.get(m, {}).get("max_abs_diff") for m in COMPARED_WITH},
        })
    return out


def pair_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, batch) and family method: ours ÷ peer in images/s and peak memory."""
    out = []
    for key in dict.fromkeys(cell_key(c) for c in cells):
        by = {c["method"]: c for c in cells if cell_key(c) == key}
        for ours, peer in FAMILY_PEERS.items():
            if ours not in by and peer not in by:
                continue
            out.append({
                "model": key[0], "batch": key[1], "layout": key[2], "ours": ours, "peer": peer,
                "ours_images_per_s": by.get(ours, {}).get("images_per_s"),
                "peer_images_per_s": by.get(peer, {}).get("images_per_s"),
                "speed_ratio": _ratio(by, ours, peer, "images_per_s"),
                "memory_ratio": _ratio(by, ours, peer, "memory.peak_mib"),
                "max_abs_diff": by.get(peer, {}).get("max_abs_diff"),
            })
    return out


def interleaved_part(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    table = markdown_table(
        ["model", "batch", "layout", "rounds", "Grad-CAM ÷ forward (≥ 0.95)",
         "Grad-CAM ÷ pgc (≥ 3)"],
        [[r["model"], r["batch"], r["layout"],
          r["rounds"] if not r["error"] else f"error: {r['error']}",
          fmt_ratio(r["gradcam_vs_forward"], 0.95), fmt_ratio(r["gradcam_vs_pgc"], 3.0)]
         for r in rows], "lll" + "r" * 3)
    return ["## The same ratios timed round-robin", "", table, "",
            f"One process per row times {' / '.join(INTERLEAVED)} in turn, round after round "
            "(same model weights, input and targets as the cells), so drift between the "
            "separately run cells cannot favour one method; medians per method.", ""]


def fmt_memory_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}× " + ("✓" if value < 1 else "✗")


def fmt_diff(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1e} " + ("✓" if value <= 1e-5 else "✗")


def interleaved_rows(interleaved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The round-robin medians as the targets' ratios (images/s of ours over the other)."""
    out = []
    for r in interleaved:
        t = r.get("median_s") or {}
        ours = t.get(OURS_GRADCAM)
        out.append({
            "model": r["model"], "batch": r["batch"], "layout": r["layout"],
            "rounds": r.get("rounds"), "error": r.get("error"),
            "gradcam_vs_forward": t[FORWARD] / ours if ours and FORWARD in t else None,
            "gradcam_vs_pgc": t[PGC_GRADCAM] / ours if ours and PGC_GRADCAM in t else None,
        })
    return out


def report(info: dict[str, Any], settings: dict[str, Any], cells: list[dict[str, Any]],
           summary: list[dict[str, Any]], pairs: list[dict[str, Any]] | None = None,
           interleaved: list[dict[str, Any]] | None = None) -> str:
    forward = {cell_key(c): c.get("images_per_s") for c in cells if c["method"] == FORWARD}
    rows = []
    for c in cells:
        ips, ref = c.get("images_per_s"), forward.get(cell_key(c))
        mem = c.get("memory", {}).get("peak_mib")
        timing = c.get("timing", {})
        rows.append([
            c["model"], c["batch"], c.get("layout", "nchw"), c["method"],
            fmt(ips, 2) if not c.get("error") else f"error: {c['error']}",
            fmt_ratio(ips / ref if ips and ref else None),
            fmt(mem, 0), fmt(timing.get("median_s"), 3), timing.get("repeats", "—"),
            fmt(timing.get("own_cores"), 1), fmt(timing.get("other_cores"), 1),
            fmt_diff(c.get("max_abs_diff")) if c["method"] in COMPARED_WITH else "",
        ])
    cell_table = markdown_table(
        ["model", "batch", "layout", "method", "images/s", "÷ forward", "peak MiB",
         "s/call (median)", "repeats", "own cores", "others", "max abs Δ vs ours"], rows,
        "lllll" + "r" * 7)
    srows = [[
        s["model"], s["batch"], s.get("layout", "nchw"),
        fmt_ratio(s["gradcam_vs_forward"], 0.95), fmt_ratio(s["gradcam_vs_pgc"], 3.0),
        fmt_ratio(s.get("gradcam_vs_pgc_nchw"), 3.0),
        fmt_ratio(s["gradcam_vs_captum"]), fmt_ratio(s["saliency_vs_captum"], 1.0),
        fmt_memory_ratio(s["gradcam_memory_vs_pgc"]),
        fmt_memory_ratio(s["gradcam_memory_vs_captum"]),
        fmt_memory_ratio(s["saliency_memory_vs_captum"]),
    ] for s in summary]
    summary_table = markdown_table(
        ["model", "batch", "layout", "Grad-CAM ÷ forward (≥ 0.95)", "Grad-CAM ÷ pgc (≥ 3)",
         "Grad-CAM ÷ pgc NCHW (≥ 3)", "Grad-CAM ÷ Captum", "saliency ÷ Captum (≥ 1)",
         "Grad-CAM mem ÷ pgc (< 1)", "Grad-CAM mem ÷ Captum (< 1)",
         "saliency mem ÷ Captum (< 1)"], srows, "lll" + "r" * 8)
    size = settings.get("image_size", IMAGE_SIZE)
    pair_table = markdown_table(
        ["model", "batch", "layout", "ours", "peer", "ours images/s", "peer images/s",
         "ours ÷ peer images/s", "ours ÷ peer peak mem (< 1)", "max abs Δ vs ours"],
        [[p["model"], p["batch"], p.get("layout", "nchw"), p["ours"], p["peer"],
          fmt(p["ours_images_per_s"], 2),
          fmt(p["peer_images_per_s"], 2), fmt_ratio(p["speed_ratio"]),
          fmt_memory_ratio(p["memory_ratio"]),
          "" if p["max_abs_diff"] is None and p["ours"] == "smoothgrad" and p["batch"] != 1
          else fmt_diff(p["max_abs_diff"])] for p in pairs or []], "lllll" + "r" * 5)
    base = {OURS_GRADCAM, OURS_SALIENCY, PGC_GRADCAM, CAPTUM_GRADCAM, CAPTUM_SALIENCY}
    options = ", ".join(f"{m} {o}" for m, o in FAMILY_OPTIONS.items()
                        if o and any(c["method"] == m for c in cells))
    family_part = [
        "## Ours ÷ peer (the other methods)", "", pair_table, "",
        f"Options: {options or 'defaults'}; each peer gets the same (pytorch-grad-cam "
        "ScoreCAM batch_size = batch_masks; Captum NoiseTunnel nt_samples = samples, stdevs = "
        "sigma x the value range; IntegratedGradients n_steps = steps, gausslegendre, "
        "internal_batch_size = batch_steps). Δ: pytorch-grad-cam CAMs against ours after its "
        "normalization (as Grad-CAM); Captum's attributions and ours as max over channels "
        "of |attribution|, min-max per image. SmoothGrad's Δ only at batch 1: Captum takes one "
        "noise level per input tensor (ours: per image) and draws all images' noise at once, "
        "so only a single image's noise can be made identical (blank otherwise).", "",
    ] if pairs else []
    lines = [
        f"# Method throughput and memory ({info['device']}, {settings['precision']})", "",
        *machine_lines(info),
        f"- input: synthetic {size}x{size}, random-init weights (seed {SEED}; "
        f"{', '.join(PRETRAINED)}: its embedded pretrained weights on the bundled photos); "
        f"targets: the top-1 class of a plain forward, the same for every method",
        f"- ours run as `extract` runs them, in passes of "
        f"{settings.get('micro_batch') or 'the whole batch'} image(s) (`micro_batch`); plain "
        f"forward and the peers take the whole batch at once",
        f"- timing: {settings['warmup']} warm-up call(s) (batch 1: {settings['warmup_batch1']}),"
        f" then at least {settings['min_repeats']} calls and {settings['min_time']} s "
        f"(at most {settings['max_time']} s); images/s = batch / median seconds per call",
        f"- memory: {settings['memory_how']}",
        f"- total wall time {settings['wall_s']:.0f} s",
        *busy_warning([c.get("timing", {}).get("other_cores") for c in cells]), "",
        *(["## Ratios against the design targets", "", summary_table, "",
           "Each ratio compares cells of the same model, batch and layout (nhwc: the model "
           "and input of every method in channels_last, as `channels_last=true` runs), except "
           "`Grad-CAM ÷ pgc NCHW`: ours in the row's layout against pytorch-grad-cam in NCHW, "
           "the layout its users run it in.", ""]
          if any(c["method"] in base for c in cells) else []),
        *interleaved_part(interleaved or []),
        *family_part,
        "## All cells", "", cell_table, "",
        "`max abs Δ vs ours`: the peer's map against ours for the first "
        f"{settings['agree_images']} images after the same normalization (Grad-CAM: "
        "pytorch-grad-cam's ReLU, per-image min-max, bilinear resize to the input; saliency: "
        "per-image min-max of max over channels of |dY/dx|).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__, "methods-<device>[-<precision>][-quick]")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="autocast dtype for every method (bf16/fp16 meant for GPUs)")
    p.add_argument("--models", nargs="+", choices=list(MODELS),
                   help="default: resnet34 resnet50 (CPU); + vit_b_16 (CUDA)")
    p.add_argument("--batches", nargs="+", type=int,
                   help="default: 1 8 32 (CPU); 64 128 256 (CUDA)")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, metavar="METHOD",
                   help=f"of: {' '.join(ALL_METHODS)}; default: {' '.join(METHODS)}")
    p.add_argument("--family", action="store_true",
                   help="add our other methods and their peers (" + ", ".join(
                       f"{o} / {q}" for o, q in FAMILY_PEERS.items()) + "); with any of them "
                   f"selected the defaults are {' '.join(FAMILY_MODELS)}, "
                   f"{FAMILY_IMAGE_SIZE}x{FAMILY_IMAGE_SIZE}, batch "
                   f"{' '.join(map(str, FAMILY_BATCHES))} (quick: "
                   f"{' '.join(map(str, FAMILY_QUICK_BATCHES))})")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS,
                   help="memory formats, each a full set of cells (default: nchw nhwc; "
                   "family: nchw)")
    p.add_argument("--micro-batch", default="auto",
                   help="our methods' images per pass, as the micro_batch key of a run: auto "
                   "(8 on CPU, the whole batch on CUDA), null or N; the peers take the whole batch")
    p.add_argument("--no-interleave", action="store_true",
                   help="skip the round-robin timing of " + " / ".join(INTERLEAVED))
    p.add_argument("--image-size", type=int,
                   help=f"input side (default {IMAGE_SIZE}; family: {FAMILY_IMAGE_SIZE})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: resnet34, batch 1 and 8, short timings")
    p.add_argument("--warmup", type=int, help="warm-up calls per cell (default 1; batch 1: 3)")
    p.add_argument("--repeats", type=int, help="minimum timed calls per cell (default 3)")
    p.add_argument("--min-time", type=float, help="minimum timed seconds per cell (default 2)")
    p.add_argument("--max-time", type=float,
                   help="stop repeating a cell after this many seconds (default 30)")
    p.add_argument("--agree-images", type=int, default=8,
                   help="images whose maps are compared across libraries")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--in-process", action="store_true",
                   help="run cells in this process (no clean CPU memory figures); for debugging")
    return p.parse_args(argv)


def measure_cells(args: argparse.Namespace, settings: dict[str, Any], device: torch.device
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (model, batch, layout, method) cell, in that order, each printed when done; then
    per (model, batch, layout) the round-robin timing of forward / Grad-CAM / pgc."""
    cells: list[dict[str, Any]] = []
    interleaved: list[dict[str, Any]] = []
    with _runner(args.in_process) as run:
        for model in settings["models"]:
            classes = predicted_classes(model, max(settings["batches"]), device,
                                        settings["image_size"])
            for batch, layout in itertools.product(settings["batches"], settings["layouts"]):
                specs = {method: CellSpec(
                    model, batch, method, str(device), args.precision, classes,
                    settings["warmup_batch1"] if batch == 1 else settings["warmup"],
                    settings["min_repeats"], settings["min_time"], settings["max_time"],
                    min(args.agree_images, batch), args.threads, settings["image_size"],
                    layout == "nhwc", settings["micro_batch"]) for method in settings["methods"]}
                for method, spec in specs.items():
                    t0 = time.perf_counter()
                    cell = run(run_cell, spec)
                    cells.append(cell)
                    what = (f"error: {cell['error']}" if cell.get("error") else
                            f"{cell['images_per_s']:8.2f} images/s, peak "
                            f"{cell['memory']['peak_mib']:7.0f} MiB, "
                            f"{cell['timing']['repeats']} repeats")
                    print(f"{model:>10} batch {batch:>3} {layout} {method:<27} {what}  "
                          f"[{time.perf_counter() - t0:.1f} s]", flush=True)
                    if cell.get("traceback") and os.environ.get("BENCH_DEBUG"):
                        print(cell["traceback"], file=sys.stderr)
                if settings["interleave"] and all(m in specs for m in INTERLEAVED):
                    t0 = time.perf_counter()
                    row = run(run_interleaved, [specs[m] for m in INTERLEAVED])
                    interleaved.append(row)
                    what = (f"error: {row['error']}" if row.get("error") else
                            f"{row['rounds']} rounds")
                    print(f"{model:>10} batch {batch:>3} {layout} {'round-robin':<27} {what}  "
                          f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    return cells, interleaved


def main(argv: list[str] | None = None) -> None:
    from pipeline.extract import micro_batch_of

    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(args.methods or METHODS)
    if args.family:
        methods += [m for m in FAMILY if m not in methods]
    family = any(m in FAMILY for m in methods)
    if family:
        models = args.models or FAMILY_MODELS
        batches = args.batches or (FAMILY_QUICK_BATCHES if args.quick else FAMILY_BATCHES)
    else:
        models = args.models or (["resnet34"] if args.quick else
                                 ["resnet34", "resnet50"] + (["vit_b_16"] if cuda else []))
        batches = args.batches or ([1, 8] if args.quick else [64, 128, 256] if cuda
                                   else [1, 8, 32])
    quick = args.quick
    settings: dict[str, Any] = {
        "models": models, "batches": batches, "methods": methods,
        "layouts": args.layouts or (["nchw"] if family else list(LAYOUTS)),
        "interleave": not args.no_interleave,
        "micro_batch": micro_batch_of(
            None if args.micro_batch in ("null", "none") else
            args.micro_batch if args.micro_batch == "auto" else int(args.micro_batch), device),
        "image_size": args.image_size or (FAMILY_IMAGE_SIZE if family else IMAGE_SIZE),
        "family_options": {m: o for m, o in FAMILY_OPTIONS.items() if m in methods},
        "precision": args.precision, "quick": quick, "agree_images": args.agree_images,
        "warmup": args.warmup if args.warmup is not None else 1,
        "warmup_batch1": args.warmup if args.warmup is not None else (2 if quick else 3),
        "min_repeats": args.repeats or (2 if quick else 3),
        "min_time": args.min_time if args.min_time is not None else (0.3 if quick else 2.0),
        "max_time": args.max_time if args.max_time is not None else (10.0 if quick else 30.0),
        "isolation": "in-process" if args.in_process else "fresh process per cell",
    }
    info = machine_info(device)
    print("\n".join(machine_lines(info)), flush=True)
    t_start = time.perf_counter()
    cells, interleaved = measure_cells(args, settings, device)
    settings["wall_s"] = time.perf_counter() - t_start
    settings["memory_how"] = next((c["memory"]["how"] for c in cells if "memory" in c), "—")
    info["load_average_end"] = list(os.getloadavg())

    ours = {(*cell_key(c), c["method"]): c.get("maps") for c in cells}
    for c in cells:
        ref = ours.get((*cell_key(c), COMPARED_WITH.get(c["method"], "")))
        if c["method"] in COMPARED_WITH and c.get("maps") is not None and ref is not None:
            c["max_abs_diff"] = agreement(c["method"], c["maps"], ref,
                                          settings["image_size"], c["batch"])
    for c in cells:
        c.pop("maps", None)
    summary = summarize(cells)
    pairs = pair_rows(cells)
    rr = interleaved_rows(interleaved)
    markdown = report(info, settings, cells, summary, pairs, rr)
    print("\n" + markdown)
    stem = args.name or "-".join(
        [f"methods-{device.type}"] + (["family"] if family else [])
        + ([args.precision] if args.precision != "fp32" else [])
        + (["quick"] if quick else []))
    payload = {"benchmark": "methods", "machine": info, "settings": settings,
               "summary": summary, "pairs": pairs, "interleaved": rr, "cells": cells}
    paths = write_results(stem, payload, markdown, args.out)
    print(f"\nwrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
