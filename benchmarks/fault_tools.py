"""The pieces of the fault campaign (benchmarks/fault_campaign.py) that are not faults:
tiny inputs, running camsweep with a kill or a limit, and the invariant checks."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from _images import blob_photo
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 12
DONE, FAILED = 1, 2



def photo(seed: int, h: int = 48, w: int = 56) -> np.ndarray:
    """A smooth random picture (blobs), different for every seed."""
    return blob_photo(seed, h, w)


def write_images(folder: Path, n: int = N_IMAGES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(photo(i, 48 - 8 * (i % 2), 56)).save(folder / f"img{i:03d}.jpg")


@dataclass
class Outcome:
    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    signalled: bool = False  # we sent the signal
    hang: bool = False


@dataclass
class Fault:
    index: int
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    skipped: str = ""
    seconds: float = 0.0


def done_rows(results: Path) -> int:
    """Rows marked done, as any reader sees them while a run writes."""
    try:
        with h5py.File(results, "r", locking=False) as f:
            return int((f["images/status"][:] == DONE).sum())
    except (OSError, KeyError):
        return 0


def count_files(folder: Path, pattern: str = "*") -> int:
    try:
        return sum(1 for _ in folder.rglob(pattern))
    except OSError:
        return 0



def run_camsweep(*args: str, timeout: float, cwd: Path, stop_when: Callable[[], bool] | None = None,
        sig: int = signal.SIGKILL, fsize: int | None = None) -> Outcome:
    """``python run.py args``; with ``stop_when``, send ``sig`` once it holds (polled
    on the files the run writes; a run that ends first is left alone)."""
    cmd = [sys.executable, str(ROOT / "run.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err,
                                preexec_fn=limit if fsize is not None else None)
        outcome = Outcome(cmd, None, "", "")
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    proc.wait(timeout=0.02)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() > deadline:  # a guard: the run should have ended
                    outcome.hang = True
                    proc.kill()
                    proc.wait()
                    break
                if stop_when is not None and stop_when():
                    proc.send_signal(sig)
                    outcome.signalled = True
                    try:
                        proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        outcome.hang = True
                        proc.kill()
                        proc.wait()
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        outcome.returncode = proc.returncode
        outcome.stdout, outcome.stderr = out.read(), err.read()
    return outcome


def _last(text: str) -> str:
    """The end of an output, on one line."""
    return " | ".join(text.strip().splitlines()[-3:])[-300:]


def clean(o: Outcome, what: str, ok: tuple[int, ...] = (0,)) -> list[str]:
    """Violations of the invariants every command keeps."""
    v = []
    if o.hang:
        v.append(f"{what}: hang (no end within the guard timeout)")
    text = o.stderr + o.stdout
    if "Traceback" in text:  # the exception's own line, not Hydra's footer
        lines = [x for x in text.splitlines() if x.strip() and not x.startswith(("Set the", " "))]
        v.append(f"{what}: traceback: {(lines or ['?'])[-1][:200]}")
    if "Logging error" in text:
        v.append(f"{what}: '--- Logging error ---' in the output")
    rc = o.returncode
    if not o.signalled and not o.hang and rc is not None:
        if rc < 0 or rc in (134, 135, 136, 137, 139):
            v.append(f"{what}: died by a signal (returncode {rc})")
        elif rc not in ok:
            v.append(f"{what}: returncode {rc}, expected {ok}: {_last(o.stderr)}")
        elif rc == 2 and len([x for x in o.stderr.strip().splitlines()
                              if not x.startswith("warning:")]) != 1:
            v.append(f"{what}: a refusal of more than one line: {_last(o.stderr)}")
    return v


def rows_of(f: h5py.File, key: str, sel: np.ndarray) -> list[np.ndarray]:
    """The selected rows of ``key``; a ragged map's (native resolution) from its index."""
    index = f"ragged/{key}"
    if f"{index}/offset" in f:
        values, offsets, shapes = f[key][:], f[f"{index}/offset"][:], f[f"{index}/shape"][:]
        return [values[offsets[r]:offsets[r] + int(np.prod(shapes[r]))].reshape(shapes[r])
                for r in sel]
    data = f[key][:]
    return [data[r] for r in sel]


def same_rows(a: h5py.File, b: h5py.File, key: str, sel: np.ndarray) -> bool:
    for x, y in zip(rows_of(a, key, sel), rows_of(b, key, sel), strict=True):
        if x.shape != y.shape:
            return False
        if x.dtype.kind == "f":
            if not np.allclose(x, y, rtol=1e-5, atol=1e-6):
                return False
        elif not np.array_equal(x, y):
            return False
    return True


def status_of(results: Path) -> np.ndarray:
    try:
        with h5py.File(results, "r", locking=False) as f:
            return f["images/status"][:]
    except (OSError, KeyError):
        return np.zeros(0, np.uint8)
