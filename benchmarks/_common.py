"""Shared by the benchmark scripts: machine description, timing, tables, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the repository: `pipeline` imports from here
RESULTS_DIR = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the path fix-up, like every import of `pipeline`)


def argument_parser(doc: str | None, stem: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--device``, ``--out`` and ``--name`` (the
    result files' stem, ``stem`` by default); the script adds its own."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for JSON + Markdown")
    p.add_argument("--name", help=f"file stem (default {stem})")
    return p


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {spec}: no CUDA GPU is available here")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def _version(module: str, dist: str) -> str | None:
    try:
        version = getattr(__import__(module), "__version__", None)
    except ImportError:
        return None
    if isinstance(version, str):
        return version  # torch's says which build (+cpu, +cu130)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# Import name -> distribution name, for the versions recorded with every result.
# timm models of the benchmarks (``timm/<name>``) and their target layers: ConvNeXt's last
# stage, and the last ViT block's first LayerNorm (as vit_b_16's shipped config).
TIMM_LAYERS = {"convnext_atto": "stages.3", "vit_tiny_patch16_224": "blocks.11.norm1"}
PACKAGES = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "h5py": "h5py",
            "pytorch_grad_cam": "grad-cam", "captum": "captum", "PIL": "pillow",
            "cv2": "opencv-python-headless", "timm": "timm"}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to compare two result files: hardware, software, load."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_model()),
        "git_commit": _git_commit(),
        "versions": {m: _version(m, d) for m, d in PACKAGES.items()},
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["device_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes on this machine have used (all cores), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()  # children: those already waited for (e.g. finished DataLoader workers)
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """How many cores this process (own) and everything else (others) kept busy in a span.

    Own is about the thread count on a quiet machine. Others above ~0.2 cores means the
    figures of that span are not trustworthy: on a small CPU, oversubscribed OpenMP threads
    can make torch many times slower, not just proportionally so."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.own0 = _own_cpu_seconds()
        self.sys0 = _system_busy_seconds()

    def stop(self) -> dict[str, float | None]:
        wall = time.perf_counter() - self.t0
        own = _own_cpu_seconds() - self.own0
        sys1 = _system_busy_seconds()
        others = None if sys1 is None or self.sys0 is None else max(0.0, sys1 - self.sys0 - own)
        return {"wall_s": wall, "own_cores": own / wall if wall else None,
                "other_cores": others / wall if others is not None and wall else None}


@dataclass
class Timing:
    """Seconds per call of the timed repeats (warm-up calls excluded)."""

    seconds: list[float]
    warmup: int
    load: dict[str, float | None]  # LoadMeter over the timed calls

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        s = self.seconds
        return {"median_s": self.median, "min_s": min(s), "max_s": max(s), "repeats": len(s),
                "warmup": self.warmup, "total_s": sum(s), "own_cores": self.load["own_cores"],
                "other_cores": self.load["other_cores"]}


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, min_repeats: int,
               min_time: float, max_time: float) -> Timing:
    """Warm up, then repeat ``fn`` until it ran ``min_repeats`` times and ``min_time`` seconds
    in all, but stop early (after at least one timed call) once ``max_time`` is spent."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds: list[float] = []
    meter = LoadMeter()
    while True:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
        spent = sum(seconds)
        if spent >= max_time or (len(seconds) >= min_repeats and spent >= min_time):
            return Timing(seconds, warmup, meter.stop())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one of 'l'/'r' per column (default: l, then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def fmt_ratio(value: float | None, target: float | None = None) -> str:
    """``1.23×``, marked ✓/✗ against a design target where one applies."""
    if value is None:
        return "—"
    text = f"{value:.2f}×"
    if target is not None:
        text += " ✓" if value >= target else " ✗"
    return text


BUSY_CORES = 0.2  # other processes' load above which a figure is flagged


def busy_warning(other_cores: list[float | None]) -> list[str]:
    """A warning line when other processes took CPU during the measurements."""
    seen = [c for c in other_cores if c is not None]
    if not seen or max(seen) <= BUSY_CORES:
        return []
    n = sum(c > BUSY_CORES for c in seen)
    return [f"- **warning**: other processes kept up to {max(seen):.1f} cores busy during "
            f"{n} of {len(seen)} measurements (column 'others'): those figures are not "
            f"reliable; rerun on a quiet machine"]


def machine_lines(info: dict[str, Any]) -> list[str]:
    v = info["versions"]
    return [
        f"- date: {info['date']}, commit {info.get('git_commit') or '?'}",
        f"- device: {info['device']} ({info['device_name']}); CPU: {info['cpu_model']}, "
        f"{info['cpus_usable']} usable of {info['cpu_count']} cores, "
        f"torch threads {info['torch_threads']}",
        f"- load average at start {info['load_average_start'][0]:.2f}, at end "
        f"{info.get('load_average_end', [float('nan')])[0]:.2f} (1 min)",
        f"- torch {v['torch']}, torchvision {v['torchvision']}, "
        f"pytorch-grad-cam {v['pytorch_grad_cam']}, captum {v['captum']}, h5py {v['h5py']}",
    ]


def write_results(stem: str, payload: dict[str, Any], markdown: str,
                  out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path
