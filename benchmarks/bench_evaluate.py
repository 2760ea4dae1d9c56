#!/usr/bin/env python
"""Cost per image of the evaluate stage, metric by metric, in seconds and in forward passes.

Extracts one small run with the real pipeline (N generated JPEGs, a random-init model,
``pipeline.extract.extract`` on a config composed like ``python run.py stage=extract ...``),
then times ``pipeline.evaluate.evaluate`` on it once per metric, each alone
(``stage=evaluate evaluate.metrics=[<metric>] evaluate.overwrite=true``):

    python benchmarks/bench_evaluate.py            # 16 images, resnet18 at 112 px, gradcam
    python benchmarks/bench_evaluate.py --quick    # 4 images

Every call includes the stage's fixed cost (rebuild the model, read the file, write
metrics.h5); an ``evaluate.limit=0`` call measures it (``setup``), and "per image" takes it
out. "× forward" is that per-image cost over one plain forward pass per image of the same
model (batch = ``--batch-size``, ``torch.inference_mode``), measured before and after the
metrics (the faster of the two, so a burst of load on the machine inflates it less).
Results: a Markdown table on stdout and ``benchmarks/results/evaluate-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    LoadMeter,
    argument_parser,
    busy_warning,
    fmt,
    machine_info,
    machine_lines,
    markdown_table,
    resolve_device,
    synchronize,
    time_calls,
    write_results,
)
from bench_e2e import compose_config, make_jpegs

from pipeline.evaluate import METRICS

JPEG_SIZE = (160, 120)  # small originals: decoding is not what is measured here
SEED = 0


def extract_run(args: argparse.Namespace, device: torch.device, folder: Path, run_dir: Path
                ) -> float:
    """A run with stored maps in ``run_dir``; returns the seconds extraction took."""
    from pipeline.extract import extract

    cfg = compose_config([
        "stage=extract", f"run_dir={run_dir}", f"model={args.model}", "model.weights=null",
        f"method={args.method}", "data=glob", f"data.pattern='{folder}/*.jpg'",
        f"data.image_size={args.image_size}", f"batch_size={args.batch_size}",
        f"num_workers={args.workers}", f"device={device}", f"seed={SEED}",
    ])
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # progress bar
        extract(cfg, run_dir)
    return time.perf_counter() - t0


def boxes_csv(folder: Path, n: int) -> Path:
    """One box per image (the central half, in original pixels), so the pointing game runs."""
    w, h = JPEG_SIZE
    path = folder / "boxes.csv"
    lines = ["file,xmin,ymin,xmax,ymax"] + [
        f"img_{i:05d}.jpg,{w // 4},{h // 4},{3 * w // 4},{3 * h // 4}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def evaluate_once(args: argparse.Namespace, device: torch.device, run_dir: Path,
                  metric: str, boxes: Path, limit: int | None = None
                  ) -> dict[str, Any]:
    """Seconds of one ``evaluate(cfg, run_dir)`` call (config composed outside the timing)."""
    from pipeline.evaluate import evaluate

    cfg = compose_config([
        "stage=evaluate", f"run_dir={run_dir}", f"evaluate.metrics=[{metric}]",
        "evaluate.overwrite=true", f"evaluate.boxes={boxes}", f"evaluate.steps={args.steps}",
        f"batch_size={args.batch_size}", f"num_workers={args.workers}", f"device={device}",
        *([f"evaluate.limit={limit}"] if limit is not None else []),
    ])
    meter = LoadMeter()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        summary = evaluate(cfg, run_dir)
    synchronize(device)
    seconds = time.perf_counter() - t0
    load = meter.stop()
    return {"seconds": seconds, "evaluated": summary.evaluated, "notes": summary.notes,
            "own_cores": load["own_cores"], "other_cores": load["other_cores"]}


def forward_seconds_per_image(args: argparse.Namespace, device: torch.device) -> float:
    """One plain forward pass per image, batched as evaluate batches, in the memory format
    evaluate uses (``channels_last=auto``: NHWC on the CPU)."""
    import torchvision

    from pipeline.models import use_channels_last

    torch.manual_seed(SEED)
    model = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if use_channels_last(model, "auto", x[:1]):
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    timing = time_calls(forward, device, warmup=1, min_repeats=3, min_time=1.0, max_time=10.0)
    return timing.median / args.batch_size


def measure(args: argparse.Namespace, device: torch.device, scratch: Path
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    folder = scratch / "images"
    folder.mkdir()
    make_jpegs(folder, args.n, SEED, JPEG_SIZE)
    boxes = boxes_csv(folder, args.n)
    run_dir = scratch / "run"
    extra: dict[str, Any] = {"extract_s": extract_run(args, device, folder, run_dir)}
    print(f"extracted {args.n} images in {extra['extract_s']:.1f} s", flush=True)
    forward_before = forward_seconds_per_image(args, device)
    setups = [evaluate_once(args, device, run_dir, "confidence", boxes, limit=0)["seconds"]
              for _ in range(args.repeats)]
    extra["setup_s"] = statistics.median(setups)
    print(f"forward {forward_before * 1e3:.1f} ms/image, evaluate setup "
          f"{extra['setup_s']:.2f} s", flush=True)
    rows = []
    for metric in args.metrics:
        runs = [evaluate_once(args, device, run_dir, metric, boxes) for _ in range(args.repeats)]
        total = statistics.median(r["seconds"] for r in runs)
        n = runs[0]["evaluated"]
        per_image = max(0.0, total - extra["setup_s"]) / n if n else None
        row = {
            "metric": metric, "images": n, "total_s": total, "calls_s": [r["seconds"] for r in
                                                                         runs],
            "s_per_image": per_image,
            "own_cores": statistics.median(r["own_cores"] or 0 for r in runs),
            "other_cores": max(r["other_cores"] or 0 for r in runs),
            "notes": runs[0]["notes"],
        }
        rows.append(row)
        print(f"{metric:>10}: {total:6.2f} s for {n} images, "
              f"{fmt(per_image and per_image * 1e3, 1)} ms/image", flush=True)
    forward_after = forward_seconds_per_image(args, device)
    extra["forward_s_per_image_before_after"] = [forward_before, forward_after]
    extra["forward_s_per_image"] = forward = min(forward_before, forward_after)
    for row in rows:
        row["x_forward"] = row["s_per_image"] / forward if row["s_per_image"] else None
    return rows, extra


def report(info: dict[str, Any], settings: dict[str, Any], rows: list[dict[str, Any]],
           extra: dict[str, Any]) -> str:
    table = markdown_table(
        ["metric", "images", "s/call (median)", "ms/image (w/o setup)", "× forward",
         "own cores", "others"],
        [[r["metric"], r["images"], fmt(r["total_s"], 2),
          fmt(r["s_per_image"] and r["s_per_image"] * 1e3, 1), fmt(r["x_forward"], 1),
          fmt(r["own_cores"], 1), fmt(r["other_cores"], 1)] for r in rows])
    notes = sorted({n for r in rows for n in r["notes"]})
    size = settings["image_size"]
    lines = [
        f"# Evaluate stage: cost per image and metric ({info['device']})", "",
        *machine_lines(info),
        f"- run: {settings['n_images']} generated {JPEG_SIZE[0]}x{JPEG_SIZE[1]} JPEGs, "
        f"{settings['model']} (random init, seed {SEED}) at {size}x{size}, method "
        f"{settings['method']}, batch {settings['batch_size']}, {settings['workers']} "
        f"DataLoader workers; extraction took {extra['extract_s']:.1f} s",
        f"- evaluate settings: the defaults (conf/config.yaml) but steps={settings['steps']}; "
        "pointing with one box per image (the central half)",
        f"- one forward pass: {extra['forward_s_per_image'] * 1e3:.2f} ms/image "
        f"(batch {settings['batch_size']}, inference mode; the faster of a measurement before "
        "and one after the metrics)",
        f"- setup (an `evaluate.limit=0` call: model, files, metrics.h5): {extra['setup_s']:.2f} s,"
        f" taken out of the per-image figures; {settings['repeats']} call(s) per metric, median",
        f"- total wall time {settings['wall_s']:.0f} s",
        *busy_warning([r["other_cores"] for r in rows]), "",
        table, "",
        "`× forward`: the metric's cost per image over one plain forward pass per image "
        "(deletion/insertion: about steps + 1 forwards; ROAD: 2 per percentile plus the "
        "imputation; sanity: one run of the method per randomized unit).",
        *([""] + [f"- note: {n}" for n in notes] if notes else []),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__, "evaluate-<device>[-quick]")
    p.add_argument("--model", default="resnet18", help="torchvision model (conf/model/*.yaml)")
    p.add_argument("--method", default="gradcam", help="the method whose maps are scored")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--n", type=int, help="images (default 16; quick: 4)")
    p.add_argument("--batch-size", type=int, help="default 16; quick: 4")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--steps", type=int, default=50, help="evaluate.steps (deletion/insertion)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    p.add_argument("--repeats", type=int, default=1, help="calls per metric (median)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 images")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.n = args.n or (4 if args.quick else 16)
    args.batch_size = args.batch_size or (4 if args.quick else 16)
    settings: dict[str, Any] = {
        "n_images": args.n, "model": args.model, "method": args.method,
        "image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
        "steps": args.steps, "metrics": args.metrics, "repeats": args.repeats,
        "quick": args.quick,
    }
    info = machine_info(device)
    print("\n".join(machine_lines(info)), flush=True)
    t_start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="camsweep-bench-eval-"))
    try:
        rows, extra = measure(args, device, scratch)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    settings["wall_s"] = time.perf_counter() - t_start
    info["load_average_end"] = list(os.getloadavg())
    markdown = report(info, settings, rows, extra)
    print("\n" + markdown)
    stem = args.name or "-".join([f"evaluate-{device.type}"] + (["quick"] if args.quick else []))
    paths = write_results(stem, {"benchmark": "evaluate", "machine": info, "settings": settings,
                                 "extra": extra, "rows": rows}, markdown, args.out)
    print(f"\nwrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
