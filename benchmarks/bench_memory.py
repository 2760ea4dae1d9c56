"""Peak memory of a whole extraction run does not grow with the dataset.

Runs the real pipeline (decode -> model -> method -> HDF5) in a fresh process per dataset
size and records its peak resident memory (host) and peak CUDA allocation (device), so
1,000 and 10,000 images can be compared side by side. Writes JSON + Markdown to
benchmarks/results/memory-<device>.{json,md}.

    python benchmarks/bench_memory.py                 # 1,000 and 10,000 images
    python benchmarks/bench_memory.py --sizes 200 2000 --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"

CHILD = r"""
import json, resource, sys, time
import torch
from hydra import compose, initialize_config_dir
import pipeline.config  # registers the schemas
from pipeline.extract import extract
conf, pattern, run_dir, device, method, model, size, batch, workers = sys.argv[1:10]
with initialize_config_dir(conf, version_base="1.3"):
    cfg = compose("config", overrides=[
        f"model={model}", "model.weights=null", f"method={method}", "data=glob",
        f"data.pattern={pattern}", f"data.image_size={size}", f"batch_size={batch}",
        f"num_workers={workers}", f"device={device}"])
t = time.perf_counter()
summary = extract(cfg, __import__("pathlib").Path(run_dir))
seconds = time.perf_counter() - t
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({"done": summary.done, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_cuda_mb": cuda / 2**20}))
"""


def make_images(folder: Path, n: int, side: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (side // 8, side // 8, 3), dtype=np.uint8)
    for i in range(n):
        img = np.kron(np.roll(base, i, axis=0), np.ones((8, 8, 1), np.uint8))
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict:
    images = work / f"images-{n}"
    make_images(images, n, args.side)
    run_dir = work / f"run-{n}"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT / "conf"), f"{images}/*.jpg", str(run_dir),
         args.device, args.method, args.model, str(args.image_size), str(args.batch_size),
         str(args.num_workers)],
        capture_output=True, text=True, cwd=ROOT, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(images=n, images_per_s=row["done"] / row["seconds"],
               results_mb=(run_dir / "results.h5").stat().st_size / 2**20)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="gradcam")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--side", type=int, default=96, help="side of the generated JPEGs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = p.parse_args()
    if args.quick:
        args.sizes = [100, 400]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rows.append(run_size(n, args, Path(tmp)))
            print(f"{n:>7} images: {rows[-1]['images_per_s']:.0f} img/s, "
                  f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, "
                  f"peak CUDA {rows[-1]['peak_cuda_mb']:.0f} MB", flush=True)
    first = rows[0]
    lines = [f"Peak memory vs dataset size ({args.model}, {args.method}, "
             f"{args.image_size}px, batch {args.batch_size}, {args.num_workers} worker(s), "
             f"{args.device}, {datetime.now(timezone.utc):%Y-%m-%d})", "",
             "| images | img/s | peak host RSS MB | x first | peak CUDA MB | results.h5 MB |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['images']} | {r['images_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / first['peak_rss_mb']:.2f} | {r['peak_cuda_mb']:.0f} | "
                     f"{r['results_mb']:.1f} |")
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(), "python": platform.python_version(),
            "machine": platform.machine(), "args": vars(args), "rows": rows}
    (OUT / f"memory-{args.device}.json").write_text(json.dumps(meta, indent=1))
    (OUT / f"memory-{args.device}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
