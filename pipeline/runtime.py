"""Where and how the model runs: device, precision (autocast), input normalization, loader
workers and pass size. Shared by the extract and evaluate stages."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError, unknown

# precision: fp32 is exact IEEE float32 everywhere (TF32 off); tf32 lets cuDNN convolutions
# and matmuls use TensorFloat-32 on Ampere and later GPUs (about 1e-3 relative); bf16 and
# fp16 run the model under autocast. Stored in the file with the run's config.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# fp16 gradients: the backpropagated score is multiplied by LOSS_SCALE, so that gradients
# below fp16's smallest subnormal (6e-8) survive the half-precision backward pass; they are
# divided by it again in float32. Where the scaled gradients overflow (inf/NaN), the pass is
# repeated with the scale divided by LOSS_BACKOFF, down to 1 (no scaling).
LOSS_SCALE = 2.0**10
LOSS_BACKOFF = 2.0**5


def loss_scale_of(autocast_dtype: torch.dtype | None) -> float | None:
    """The first loss scale for a model run under ``autocast_dtype``: :data:`LOSS_SCALE`
    for float16; None (no scaling) for bfloat16, whose range is float32's, and fp32."""
    return LOSS_SCALE if autocast_dtype == torch.float16 else None


def scaled_grad(
    total: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    scale: float | None,
    allow_unused: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(total, inputs)``, through loss scaling where ``scale`` is set.

    Scales are powers of two, so scaling and unscaling are exact in float32: without
    underflow or overflow the gradients equal the unscaled ones bit for bit.

    Args:
        total: A float32 scalar (the sum of the target scores).
        inputs: The tensors to differentiate against.
        scale: The first scale (:func:`loss_scale_of`), or None for one plain pass.
        allow_unused: As for ``torch.autograd.grad`` (None for an input not used).

    Returns:
        The gradients: float32 where scaled, else as autograd gives them.
    """
    if scale is None:
        return torch.autograd.grad(total, inputs, allow_unused=allow_unused)
    while True:
        last = scale <= 1
        # The graph is kept for a retry (fp16 only); the last try frees it.
        grads = torch.autograd.grad(total * scale, inputs, retain_graph=not last,
                                    allow_unused=allow_unused)
        present = [g for g in grads if g is not None]
        # One host sync per pass: an overflow must be known before the gradients are used.
        if last or not present or bool(torch.stack([g.isfinite().all() for g in present]).all()):
            return tuple(None if g is None else g.float() / scale for g in grads)
        scale = max(1.0, scale / LOSS_BACKOFF)


def apply_precision(precision: str) -> None:
    """Set the process-wide float32 policy for ``precision`` (see :data:`PRECISIONS`).

    PyTorch's own default lets cuDNN convolutions use TF32 while matmuls stay IEEE, which
    makes CUDA CNN maps differ from the CPU's by ~1e-3 and transformer blocks slower than
    need be. Here both follow one explicit choice.
    """
    mode = "tf32" if precision == "tf32" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when there is a GPU), ``cpu``, ``cuda`` or ``cuda:N``, checked.

    A CUDA device becomes the process's current device (``torch.cuda.set_device``), so the
    DataLoader's pin-memory thread and every implicit allocation use it, not GPU 0. Without
    an index, the tasks of an srun step on a node with several visible GPUs take one each
    (``SLURM_LOCALID``); where SLURM binds one GPU per task, that GPU is ``cuda:0``.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec != "cpu" and not spec.startswith("cuda"):
        raise ConfigError(unknown("device", spec, ("auto", "cpu", "cuda", "cuda:0")))
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {spec!r}: {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={spec} but no CUDA GPU is available; use device=cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device={spec} but only {count} GPU(s): cuda:0..cuda:{count - 1}"
            )
        if device.index is None:
            local = os.environ.get("SLURM_LOCALID") if "SLURM_STEP_ID" in os.environ else None
            device = torch.device("cuda", int(local) % count if local and count > 1 else 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # inputs have one fixed size per run
    return device


def to_host(out: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Any]:
    """Device tensors -> host numpy arrays, and an event to wait for before reading them.

    On CUDA the copies go non-blocking into pinned buffers, so the loop goes on with the
    next batch; the writer thread waits on the returned event. On the CPU the arrays are
    the tensors' own memory and there is nothing to wait for.
    """
    first = next(iter(out.values()))
    if first.device.type != "cuda":
        return {k: v.detach().numpy() for k, v in out.items()}, None
    host = {}
    for k, v in out.items():
        buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        buf.copy_(v.detach(), non_blocking=True)
        host[k] = buf
    event = torch.cuda.Event()
    event.record()
    return {k: v.numpy() for k, v in host.items()}, event


def auto_workers(n_images: int, batch_size: int) -> int:
    """DataLoader workers for ``num_workers=null``: none for a single batch, else the CPUs
    this process may use (a SLURM allocation, taskset) less one, at most 8."""
    if n_images <= batch_size:
        return 0  # starting workers costs more than decoding one batch
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
    return max(1, min(8, cpus - 1))


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT and every signal SLURM or
    submitit may send to stop a job for a requeue (SIGTERM, SIGUSR1, SIGUSR2 and the one
    ``SUBMITIT_PREEMPT_SIGNAL`` names: :func:`pipeline.cluster.preempt_signals`).

    SLURM delivers a job's signals to every process of the step: SIGTERM on ``scancel``,
    ``scontrol requeue`` and preemption, SIGUSR2 or SIGUSR1 before the time limit
    (``--signal``), SIGINT on Ctrl-C in a terminal. A worker killed by one makes the main
    process raise "DataLoader worker ... is killed by signal" and the job fails instead of
    being requeued. Ignoring them here leaves the decision to the main process (submitit's
    handler requeues and exits; a plain run stops on Ctrl-C); the main process stops its
    workers as it exits, and SIGKILL, which cannot be ignored, still ends them with the job.
    """
    from .cluster.job import preempt_signals

    del worker_id  # same for every worker
    for sig in (*preempt_signals(), signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


CPU_BATCH = 16  # batch_size=auto on a CPU: decode and model keep each other busy
# batch_size=auto on CUDA: the largest power of two up to GPU_BATCH_PER_GIB images per GiB
# free on the device when the run starts, between CPU_BATCH and GPU_BATCH_MAX. ResNet-50
# Grad-CAM at 224 px in fp32 holds about 0.1 GiB per image, ViT-B/16 somewhat more: 6 per
# GiB leaves room for the model, cuDNN's workspaces and the batch prepared ahead.
GPU_BATCH_PER_GIB = 6
GPU_BATCH_MAX = 128


def batch_size_of(setting: int | str, device: torch.device) -> int:
    """Images per batch for ``batch_size`` (not part of a run's identity: a run may resume
    with another).

    Args:
        setting: ``auto`` or an integer >= 1 (used as it is).
        device: The run's device (:func:`resolve_device`).

    Returns:
        An integer: for ``auto``, :data:`CPU_BATCH` on a CPU; on CUDA the largest power
        of two <= :data:`GPU_BATCH_PER_GIB` x the free GiB of ``device``, within
        [:data:`CPU_BATCH`, :data:`GPU_BATCH_MAX`] (128 from 21.4 GiB free; 64 with 12).
    """
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    fits = GPU_BATCH_PER_GIB * free / 2**30
    return min(GPU_BATCH_MAX, max(CPU_BATCH, 1 << int(math.log2(fits)) if fits >= 1 else 1))


def micro_batch_of(setting: int | str | None, device: torch.device) -> int | None:
    """``auto``: passes of 8 images on a CPU, where they keep the working set in cache
    (resnet50 saliency at batch 32: 1.4x faster and an eighth of the peak memory of one pass
    of 32), the whole batch on CUDA. An int sets it; null means the whole batch."""
    if setting == "auto":
        return 8 if device.type == "cpu" else None
    return setting


class Normalize(torch.nn.Module):
    """uint8 (N, 3, H, W) on the device -> normalized float, in one fused step."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("scale", 1 / (torch.tensor(std).view(1, -1, 1, 1) * 255))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.shift) * self.scale
