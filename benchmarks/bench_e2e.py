#!/usr/bin/env python
"""End-to-end throughput of ``extract()`` against its parts, on generated JPEGs.

For N generated 640x480 photo-like JPEGs (fixed seed) and one model, per method:

- loader only: the DataLoader the pipeline uses (decode, resize, collate), no model;
- model + method only: normalize + method + copy to host on pre-decoded uint8 batches
  (no decoding, no HDF5);
- extract: the whole pipeline in this process (``pipeline.extract.extract`` on a config
  composed like ``python run.py stage=extract ...``), a fresh run_dir each time, so decode +
  model + method + HDF5 writes, without interpreter and import start-up.

    python benchmarks/bench_e2e.py             # 256 images, resnet34, batch 32, 3 methods
    python benchmarks/bench_e2e.py --quick     # 48 images, batch 16, gradcam only

Results: a Markdown table on stdout and ``benchmarks/results/e2e-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    ROOT,
    TIMM_LAYERS,
    LoadMeter,
    argument_parser,
    busy_warning,
    fmt,
    fmt_ratio,
    machine_info,
    machine_lines,
    markdown_table,
    resolve_device,
    synchronize,
    write_results,
)
from PIL import Image, ImageDraw

from pipeline.runtime import PRECISIONS

IMAGE_SIZE = 224
SEED = 0


def make_jpegs(folder: Path, n: int, seed: int = SEED, size: tuple[int, int] = (640, 480),
               quality: int = 90) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1),
                                                                      fill=colour)
        noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 10, (h, w, 3))
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=quality)
        paths.append(path)
    return paths


def compose_config(overrides: list[str]) -> Any:
    """The config ``python run.py <overrides>`` would run with."""
    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401  (registers the schemas the YAML files start from)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def overrides_for(args: argparse.Namespace, device: torch.device, folder: Path, method: str,
                  workers: int, run_dir: Path) -> list[str]:
    model = [f"model={args.model}"]
    if args.model.startswith("timm/"):  # model=timm model.name=... and its target layer
        name = args.model.removeprefix("timm/")
        model = ["model=timm", f"model.name={name}", f"model.target_layers=[{TIMM_LAYERS[name]}]"]
    return [
        "stage=extract", f"run_dir={run_dir}", *model, "model.weights=null",
        f"method={method}", "data=glob", f"data.pattern='{folder}/*.jpg'",
        f"data.image_size={IMAGE_SIZE}", f"batch_size={args.batch_size}",
        f"num_workers={workers}", f"device={device}", f"precision={args.precision}",
        f"data.decode={args.decode}",
    ]


def loader(folder: Path, batch_size: int, workers: int, device: torch.device
           ) -> torch.utils.data.DataLoader:
    """The DataLoader ``extract`` builds, over all images."""
    from omegaconf import OmegaConf

    from pipeline.data import ImageDataset, build_records, collate

    records = build_records(OmegaConf.create(
        {"name": "glob", "pattern": f"{folder}/*.jpg", "limit": None}))
    dataset = ImageDataset(records, np.arange(len(records)), IMAGE_SIZE, "square")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       collate_fn=collate, pin_memory=device.type == "cuda")


Measured = tuple[float, float | None]  # images/s, cores other processes used meanwhile


def measure(fn: Callable[[], None], n: int, repeats: int) -> Measured:
    """Images/s from the median of ``repeats`` runs of ``fn`` over ``n`` images."""
    seconds = []
    meter = LoadMeter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return n / statistics.median(seconds), meter.stop()["other_cores"]


def time_loader(folder: Path, n: int, batch_size: int, workers: int, device: torch.device,
                repeats: int) -> Measured:
    """Images/s of iterating the pipeline's DataLoader, worker start-up included."""
    def run() -> None:
        seen = sum(len(batch["index"]) for batch in loader(folder, batch_size, workers, device))
        assert seen == n, (seen, n)
    return measure(run, n, repeats)


def time_model_only(cfg: Any, folder: Path, n: int, scratch: Path, repeats: int
                    ) -> tuple[Measured, float]:
    """(images/s of normalize + method + host copy on pre-decoded batches, setup seconds).

    The model, method and normalization come from ``pipeline.extract.prepare`` -- exactly
    what ``extract`` uses; its run time is the setup cost of an extract run."""
    from pipeline.config import target_spec
    from pipeline.extract import explain, micro_batch_of, prepare
    from pipeline.locks import writer_lock
    from pipeline.runtime import to_host

    t0 = time.perf_counter()
    with writer_lock(scratch / "results.h5"):
        job = prepare(cfg, scratch / "results.h5")
    setup = time.perf_counter() - t0
    batches = [b["pixels"] for b in loader(folder, cfg.batch_size, 0, job.device)]
    target = target_spec(cfg.target)
    micro_batch = micro_batch_of(cfg.micro_batch, job.device)

    def explained(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method on one batch exactly as extract runs it (layout, passes)."""
        x = job.normalize(pixels.to(job.device, non_blocking=True))
        if job.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return explain(job.method, x, target, None, cfg.target.k, micro_batch)

    def run() -> None:
        for pixels in batches:
            arrays, ready = to_host(explained(pixels))  # the host hand-off extract does
            if ready is not None:
                ready.synchronize()  # as extract's writer thread waits before writing

    with job.method:
        explained(batches[0])  # warm-up: first-call costs are not the steady rate
        synchronize(job.device)
        measured = measure(run, n, repeats)
    return measured, setup


def time_extract(cfg_for: Callable[[Path], Any], n: int, scratch: Path, repeats: int
                 ) -> Measured:
    """Images/s of ``extract()`` in this process, each repeat in a fresh run_dir."""
    from pipeline.extract import extract

    counter = iter(range(10**6))

    def run() -> None:
        run_dir = scratch / f"run-{next(counter)}"
        summary = extract(cfg_for(run_dir), run_dir)
        if summary.done != n:
            raise RuntimeError(f"extract did {summary.done} of {n} images: {summary.errors}")
        shutil.rmtree(run_dir, ignore_errors=True)
    return measure(run, n, repeats)


def run_all(args: argparse.Namespace, device: torch.device, methods: list[str],
            scratch: Path) -> list[dict[str, Any]]:
    """Generate the images, then measure loader, model + method and extract per method."""
    folder = scratch / "images"
    folder.mkdir()
    t0 = time.perf_counter()
    make_jpegs(folder, args.n)
    mib = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    print(f"generated {args.n} JPEGs ({mib:.1f} MiB) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    loader_rate, loader_others = {}, {}
    for w in args.workers:
        loader_rate[w], loader_others[w] = time_loader(folder, args.n, args.batch_size, w,
                                                       device, args.repeats)
        print(f"loader only, {w} worker(s): {loader_rate[w]:.1f} images/s", flush=True)
    rows = []
    for method in methods:
        def cfg_for(run_dir: Path, workers: int = 0, method: str = method) -> Any:
            return compose_config(overrides_for(args, device, folder, method, workers, run_dir))

        prepare_dir = scratch / f"prepare-{method}"
        (model_rate, model_others), setup = time_model_only(
            cfg_for(prepare_dir), folder, args.n, prepare_dir, args.repeats)
        print(f"{method}: model + method only {model_rate:.1f} images/s (setup {setup:.2f} s)",
              flush=True)
        for w in args.workers:
            rate, others = time_extract(lambda d, w=w: cfg_for(d, w), args.n, scratch,
                                        args.repeats)
            print(f"{method}: extract, {w} worker(s): {rate:.1f} images/s", flush=True)
            measured = [c for c in (loader_others[w], model_others, others) if c is not None]
            steady = args.n / (args.n / rate - setup) if args.n / rate > setup else None
            rows.append({
                "method": method, "workers": w, "loader_images_per_s": loader_rate[w],
                "model_only_images_per_s": model_rate, "extract_images_per_s": rate,
                "extract_steady_images_per_s": steady, "setup_s": setup,
                "extract_vs_loader": rate / loader_rate[w],
                "extract_vs_model_only": rate / model_rate,
                "extract_steady_vs_model_only": steady / model_rate if steady else None,
                "other_cores": max(measured) if measured else None,
            })
    return rows


def report(info: dict[str, Any], settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    table = markdown_table(
        ["method", "workers", "loader only", "model + method only", "extract",
         "extract w/o setup", "extract ÷ loader (≥ 0.8)", "extract ÷ model + method",
         "setup s", "others"],
        [[r["method"], r["workers"], fmt(r["loader_images_per_s"]),
          fmt(r["model_only_images_per_s"]), fmt(r["extract_images_per_s"]),
          fmt(r["extract_steady_images_per_s"]),
          fmt_ratio(r["extract_vs_loader"], 0.8), fmt_ratio(r["extract_vs_model_only"]),
          fmt(r["setup_s"], 2), fmt(r["other_cores"], 1)] for r in rows],
        "l" + "r" * 9)
    lines = [
        f"# End-to-end throughput ({info['device']}, {settings['precision']})", "",
        *machine_lines(info),
        f"- {settings['n_images']} generated 640x480 JPEGs (seed {SEED}), model "
        f"{settings['model']} (random init), batch {settings['batch_size']}, input "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}; median of {settings['repeats']} run(s) per figure",
        f"- total wall time {settings['wall_s']:.0f} s",
        *busy_warning([r["other_cores"] for r in rows]), "",
        "All rates in images/s.", "", table, "",
        "- loader only: the pipeline's DataLoader (decode, resize, collate), no model.",
        "- model + method only: normalize + method + copy to host on pre-decoded uint8 "
        "batches, after one warm-up batch.",
        "- extract: `pipeline.extract.extract` in-process (decode + model + method + HDF5), "
        "fresh run_dir; 'w/o setup' subtracts the time of `prepare` (build the model, probe "
        "the layout, create the file).",
        "- others: the most cores other processes kept busy during the three measurements "
        "of the row (from /proc/stat).",
        "- With the model on a 2-core CPU the model dominates: extract ÷ loader then measures "
        "the model's speed, not the pipeline's overhead; extract ÷ model + method does.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__, "e2e-<device>[-<precision>][-quick]")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                   help="data.decode: PIL in the loader workers, or JPEGs on the device")
    p.add_argument("--model", default="resnet34",
                   help="a conf/model/*.yaml name, or timm/<name> of: " + " ".join(TIMM_LAYERS))
    p.add_argument("--methods", nargs="+", choices=["gradcam", "saliency", "activations"],
                   help="default: gradcam saliency activations (--quick: gradcam)")
    p.add_argument("--n", type=int, help="number of images (default 256; --quick 48)")
    p.add_argument("--batch-size", type=int, help="default 32 (--quick 16)")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2],
                   help="DataLoader workers to try (default 1 2)")
    p.add_argument("--repeats", type=int, default=1, help="runs per figure (median)")
    p.add_argument("--quick", action="store_true", help="smoke run: few images, gradcam only")
    p.add_argument("--keep", action="store_true", help="keep the generated images and runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.n = args.n or (48 if args.quick else 256)
    args.batch_size = args.batch_size or (16 if args.quick else 32)
    methods = args.methods or (["gradcam"] if args.quick else
                               ["gradcam", "saliency", "activations"])
    settings: dict[str, Any] = {
        "n_images": args.n, "model": args.model, "batch_size": args.batch_size,
        "methods": methods, "workers": args.workers, "repeats": args.repeats,
        "precision": args.precision, "decode": args.decode, "quick": args.quick,
    }
    info = machine_info(device)
    print("\n".join(machine_lines(info)), flush=True)
    t_start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="camsweep-bench-"))
    try:
        rows = run_all(args, device, methods, scratch)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    settings["wall_s"] = time.perf_counter() - t_start
    info["load_average_end"] = list(os.getloadavg())
    markdown = report(info, settings, rows)
    print("\n" + markdown)
    stem = args.name or "-".join(
        [f"e2e-{device.type}"] + ([args.precision] if args.precision != "fp32" else [])
        + (["device-decode"] if args.decode == "device" else [])
        + (["quick"] if args.quick else []))
    paths = write_results(stem, {"benchmark": "e2e", "machine": info, "settings": settings,
                                 "rows": rows}, markdown, args.out)
    print(f"\nwrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
