"""``stalling_resnet18``: a random-init resnet18 that, while a gate file of its job exists,
blocks in its forward pass after the first images, as a job longer than its time limit
would. Tests use it to interrupt a run (Ctrl-C, SLURM signals) at a known point: they wait
for the first batch in the results file, interrupt, and remove the gate to let it finish."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torchvision

STALL_AFTER = 5  # images through gradient passes before the gate is honoured


class _StallingResNet(torchvision.models.ResNet):
    """resnet18 (same init as ``torchvision.models.resnet18()``) with a gate, see module doc."""

    def __init__(self, gate_dir: str | None = None) -> None:
        super().__init__(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
        self.gate: Path | None = None
        if gate_dir:
            from hydra.core.hydra_config import HydraConfig
            from omegaconf import OmegaConf

            num = (OmegaConf.select(HydraConfig.get(), "job.num")
                   if HydraConfig.initialized() else None)
            self.gate = Path(gate_dir) / str(num if num is not None else 0)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None and torch.is_grad_enabled():  # explain passes, not probes
            self.seen += len(x)
            while self.seen > STALL_AFTER and self.gate.exists():
                time.sleep(0.1)  # the simulated long job: signals still get through
        return super().forward(x)


def stalling_resnet18(gate_dir: str | None = None) -> torch.nn.Module:
    """``model._target_`` for jobs that stall while ``<gate_dir>/<job number>`` exists."""
    return _StallingResNet(gate_dir)


def stalling(gate_dir: Path) -> tuple[str, ...]:
    """The overrides that make a run's model stall at its gate."""
    return ("model=custom", "model._target_=stalling.stalling_resnet18",
            f"+model.kwargs.gate_dir={gate_dir}")
