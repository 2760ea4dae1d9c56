#!/usr/bin/env python
"""Row checksums: how fast ``stage=verify`` re-reads a results file, and what checksumming
costs extraction (issue 18: target under 2 %).

1. verify speed: a results file of ``--rows`` rows of float16 activations (``--shape``)
   written through ``ResultsWriter`` (with checksums), then ``verify_results`` on it
   (page cache warm: this measures reading + hashing, not the disk). GB/s of stored values.
2. writer cost: the same batches written into a file with and without checksums, alternated
   (``--repeats`` times each, the fastest of each kept): the writer's own overhead.
3. extract overhead: ``pipeline.extract.extract`` of ``--images`` generated JPEGs (random-init
   ``--model``, ``--method``), with and without checksums, alternated, best of ``--repeats``.
   "Without" creates the file without its ``/checksums`` datasets (as files of before
   checksums), so the writer computes none.

    python benchmarks/bench_verify.py            # defaults below
    python benchmarks/bench_verify.py --quick    # small, for a smoke test

Results: a Markdown table on stdout and ``benchmarks/results/verify-<device>.{json,md}``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    LoadMeter,
    argument_parser,
    busy_warning,
    fmt,
    machine_info,
    machine_lines,
    markdown_table,
    resolve_device,
    write_results,
)
from bench_e2e import compose_config, make_jpegs

import pipeline.store.create as store_create
from pipeline.store import ResultsWriter, create_results
from pipeline.store.audit import verify_results

KEY = "activations/layer3"


@contextlib.contextmanager
def without_checksums():
    """Files created in here have no ``/checksums`` datasets: the writer computes none."""
    original = store_create.create_checksums
    store_create.create_checksums = lambda *a, **k: None
    try:
        yield
    finally:
        store_create.create_checksums = original


def make_file(path: Path, rows: int, shape: tuple[int, ...]) -> None:
    layout = {"targets/class": ((), np.int32), "targets/score": ((), np.float32),
              "predictions/class": ((5,), np.int32), "predictions/prob": ((5,), np.float32),
              KEY: (shape, np.float16)}
    attrs = {"method": "activations", "target_layers": ["layer3"]}
    create_results(path, [f"img{i}.jpg" for i in range(rows)], np.zeros(rows),
                   np.arange(rows), layout, attrs, method_kind="activations")


def batches(rows: int, shape: tuple[int, ...], batch: int) -> list[tuple[np.ndarray, dict]]:
    rng = np.random.default_rng(0)
    out = []
    for lo in range(0, rows, batch):
        n = min(batch, rows - lo)
        out.append((np.arange(lo, lo + n), {
            "targets/class": np.zeros(n, np.int32), "targets/score": np.ones(n, np.float32),
            "predictions/class": np.zeros((n, 5), np.int32),
            "predictions/prob": np.ones((n, 5), np.float32),
            "images/size": np.full((n, 2), 224, np.int32),
            "images/box": np.tile(np.float32([0, 0, 1, 1]), (n, 1)),
            "images/nonfinite": np.zeros(n, np.uint8),
            KEY: rng.standard_normal((n, *shape)).astype(np.float16)}))
    return out


def write_all(path: Path, rows: int, shape: tuple[int, ...], data: list) -> float:
    path.unlink(missing_ok=True)
    make_file(path, rows, shape)
    t0 = time.perf_counter()
    with ResultsWriter(path) as w:
        for rows_, arrays in data:
            w.write(rows_, arrays, {})
    return time.perf_counter() - t0


HASH_SECONDS = [0.0]  # time the writer spent computing row checksums


def timed_digests():
    """Wrap the writer's checksum function to add up its time (the extract's own cost of
    checksumming, free of the noise that other processes put on wall times)."""
    import pipeline.store.write as store_write

    original = store_write.row_digests

    def wrapper(rows: Any):
        t0 = time.perf_counter()
        try:
            return original(rows)
        finally:
            HASH_SECONDS[0] += time.perf_counter() - t0
    store_write.row_digests = wrapper


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def extract_once(folder: Path, run_dir: Path, args: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one extraction."""
    from pipeline.extract import extract

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = compose_config([
        "stage=extract", f"run_dir={run_dir}", f"model={args.model}", "model.weights=null",
        f"method={args.method}", "data=glob", f"data.pattern='{folder}/*.jpg'",
        f"data.image_size={args.image_size}", f"batch_size={args.batch_size}",
        "num_workers=0", "device=cpu", "seed=0"])
    t0, c0 = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stderr(io.StringIO()):
        extract(cfg, run_dir)
    return time.perf_counter() - t0, cpu_seconds() - c0


def main() -> None:
    p = argument_parser(__doc__, "verify")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--shape", type=int, nargs="+", default=[256, 14, 14])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--method", default="gradcam")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.rows, args.shape, args.images, args.repeats = 64, [16, 7, 7], 8, 1
    device = resolve_device(args.device)
    shape = tuple(args.shape)
    meter = LoadMeter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = batches(args.rows, shape, args.batch_size)
        with_sums, without = [], []
        for _ in range(args.repeats):  # alternated, so load drifts hit both alike
            with_sums.append(write_all(tmp_path / "with.h5", args.rows, shape, data))
            with without_checksums():
                without.append(write_all(tmp_path / "without.h5", args.rows, shape, data))
        verify_times, nbytes = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            check = verify_results(tmp_path / "with.h5")
            verify_times.append(time.perf_counter() - t0)
            assert check.clean, check.damaged[:3]
            nbytes = check.nbytes
        folder = tmp_path / "jpegs"
        folder.mkdir()
        make_jpegs(folder, args.images, size=(160, 120))
        ex_with, ex_without, hashing = [], [], []
        timed_digests()
        for _ in range(args.repeats):
            HASH_SECONDS[0] = 0.0
            ex_with.append(extract_once(folder, tmp_path / "run", args))
            hashing.append(HASH_SECONDS[0])
            with without_checksums():
                ex_without.append(extract_once(folder, tmp_path / "run", args))
    write_w, write_wo = min(with_sums), min(without)
    ex_w, ex_wo = min(w for w, _ in ex_with), min(w for w, _ in ex_without)
    cpu_w, cpu_wo = min(c for _, c in ex_with), min(c for _, c in ex_without)
    share = max(h / w for h, (w, _) in zip(hashing, ex_with, strict=True))
    gbs = nbytes / 1e9 / min(verify_times)
    payload = {
        "machine": machine_info(device), "args": {k: v for k, v in vars(args).items()
                                                  if k != "out"},
        "verify": {"bytes": nbytes, "seconds": verify_times, "gb_per_s": gbs},
        "writer": {"with_checksums_s": with_sums, "without_s": without,
                   "overhead": write_w / write_wo - 1},
        "extract": {"with_checksums_s": ex_with, "without_s": ex_without,
                    "overhead_wall": ex_w / ex_wo - 1, "overhead_cpu": cpu_w / cpu_wo - 1,
                    "hashing_s": hashing, "hashing_share": share},
        "load": meter.stop(),
    }
    payload["machine"]["load_average_end"] = list(os.getloadavg())
    rows = [
        ["verify (read + xxh3, page cache warm)", f"{nbytes / 1e6:.0f} MB",
         fmt(min(verify_times), 3), "", f"{gbs:.2f} GB/s"],
        ["ResultsWriter, all rows", f"{args.rows} rows", fmt(write_w, 3), fmt(write_wo, 3),
         f"{100 * (write_w / write_wo - 1):+.1f} %"],
        [f"extract ({args.model}, {args.method}, {args.image_size} px, cpu), wall",
         f"{args.images} images", fmt(ex_w, 2), fmt(ex_wo, 2),
         f"{100 * (ex_w / ex_wo - 1):+.1f} %"],
        ["extract, CPU seconds of the process", f"{args.images} images", fmt(cpu_w, 2),
         fmt(cpu_wo, 2), f"{100 * (cpu_w / cpu_wo - 1):+.1f} %"],
        ["extract, time in row checksums / extract wall", "", "", "",
         f"{100 * share:.2f} %"],
    ]
    table = markdown_table(["what", "size", "with checksums (s)", "without (s)", "result"],
                           rows)
    md = "\n".join(["# Row checksums: verify speed and write overhead", "",
                    *machine_lines(payload["machine"]), "", table, "",
                    f"best of {args.repeats} alternated runs each; target: extract overhead "
                    "under 2 %. The last row is the checksums' own cost (timed inside the "
                    "writer, largest of the runs): wall and CPU differences on a busy machine "
                    "are noise of the other processes.",
                    *busy_warning([payload["load"]["other_cores"]])])
    print(md)
    write_results(args.name or f"verify-{device.type}", payload, md, args.out)


if __name__ == "__main__":
    main()
