#!/usr/bin/env python
"""The explorer at scale: a synthetic 50,000-image run, served by ``stage=explore``.

The run is written the way extraction writes one, through ``pipeline.store``
(``create_results`` + ``ResultsWriter``): random 7 x 7 Grad-CAM maps of ``layer4``, top-5
predictions, ImageNet-style labels (about 70 % right), 0.5 % failed rows, center-crop
boxes of 500 x 375 photos (16 generated JPEGs, linked under 50,000 names), and a
``metrics.h5`` written through ``pipeline.metrics.file`` (deletion and insertion curves of
21 points, their AUCs, Average Drop). Then a server process is started and asked over HTTP:

    python benchmarks/bench_explore.py               # 50,000 images
    python benchmarks/bench_explore.py --n 2000      # quicker

Figures (targets in brackets): server start, from process start to the printed URL (< 5 s:
the explorer alone, ``serve()``; ``python run.py stage=explore`` also imports Hydra and,
until the command line starts without it, torch: reported beside it); the first page
(< 1 s); a sort on a metric (< 1 s); overlays drawn cold, not cached (< 100 ms); the
server's resident memory (< 1 GB). Results: ``benchmarks/results/explore-cpu.{json,md}``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from _common import ROOT, argument_parser, machine_info, markdown_table
from _images import blob_photo
from PIL import Image

from pipeline.images import input_box
from pipeline.metrics.registry import coordinates, layout
from pipeline.store import DONE, ResultsWriter, create_results, identity, open_results
from pipeline.store.metrics import PARTIAL, Partial, install

BLOCK = 5000  # rows per write
STEPS = 20
TARGETS = {"start_s": 5.0, "first_page_s": 1.0, "sort_metric_s": 1.0, "overlay_s": 0.1,
           "rss_mb": 1024.0}



def photo(seed: int, h: int = 375, w: int = 500) -> np.ndarray:
    return blob_photo(seed, h, w, blobs=6, radius=(20, 90))


def make_run(root: Path, n: int, seed: int = 0) -> Path:
    """A results.h5 + metrics.h5 of ``n`` images in ``root/run``; returns the run folder."""
    rng = np.random.default_rng(seed)
    pics = root / "photos"
    pics.mkdir(parents=True)
    sources = []
    for i in range(16):
        p = pics / f"source{i:02d}.jpg"
        Image.fromarray(photo(i)).save(p, quality=90)
        sources.append(p)
    names = root / "images"
    names.mkdir()
    paths = []
    for i in range(n):
        p = names / f"ILSVRC2012_val_{i:08d}.JPEG"
        os.symlink(sources[i % 16], p)
        paths.append(str(p))
    labels = rng.integers(0, 1000, n)
    run_dir = root / "run"
    run_dir.mkdir()
    from torchvision.models import ResNet50_Weights  # class names only, no weights

    attrs = {"method": "gradcam", "model": "resnet50", "target_layers": ["layer4"],
             "config": "synthetic: benchmarks/bench_explore.py", "image_size": 224,
             "resize": "center_crop", "categories": ResNet50_Weights.DEFAULT.meta["categories"],
             "first_index": 0, "n_total": n}
    spec = {"targets/class": ((), np.int32), "targets/score": ((), np.float32),
            "predictions/class": ((5,), np.int32), "predictions/prob": ((5,), np.float32),
            "gradcam/layer4": ((7, 7), np.float32)}
    path = run_dir / "results.h5"
    create_results(path, paths, labels, np.arange(n), spec, attrs, method_kind="cam")
    box = np.array(input_box((375, 500), 224, "center_crop"), np.float32)
    failed = set(rng.choice(n, n // 200, replace=False).tolist())
    with ResultsWriter(path) as w:
        for lo in range(0, n, BLOCK):
            rows = np.arange(lo, min(n, lo + BLOCK))
            m = len(rows)
            pred = rng.integers(0, 1000, (m, 5)).astype(np.int32)
            right = rng.random(m) < 0.7
            pred[right, 0] = labels[rows][right]
            prob = np.sort(rng.dirichlet(np.ones(6), m)[:, :5], axis=1)[:, ::-1]
            arrays = {"images/size": np.tile([375, 500], (m, 1)).astype(np.int32),
                      "images/box": np.tile(box, (m, 1)),
                      "targets/class": pred[:, 0], "targets/score": rng.normal(8, 2, m),
                      "predictions/class": pred, "predictions/prob": prob.astype(np.float32),
                      "gradcam/layer4": (rng.random((m, 7, 7)) ** 3).astype(np.float32)}
            bad = {int(r): "UnidentifiedImageError: cannot identify image file" for r in rows
                   if int(r) in failed}
            keep = np.array([int(r) not in failed for r in rows])
            w.write(rows[keep], {k: v[keep] for k, v in arrays.items()}, bad)
    with open_results(path) as f:
        results = identity(f)
        done = f["images/status"][:] == DONE
        paths = [p.decode() if isinstance(p, bytes) else str(p) for p in f["images/path"][:]]
    settings = {"steps": STEPS, "road_percentiles": [], "score": "logit"}
    maps = ["gradcam/layer4"]
    metrics = ["deletion", "insertion", "confidence"]
    part = Partial(run_dir / PARTIAL, n, settings, results, layout(settings, maps, metrics))
    try:
        rows = np.flatnonzero(done)
        for lo in range(0, len(rows), BLOCK):
            r = rows[lo:lo + BLOCK]
            m = len(r)
            x = np.linspace(0, 1, STEPS + 1)
            k = rng.uniform(1, 6, (m, 1))
            dele = (np.exp(-k * x) * 8).astype(np.float32)
            ins = (8 - 8 * np.exp(-rng.uniform(1, 6, (m, 1)) * x)).astype(np.float32)
            part.write(r, {"score": rng.normal(8, 2, m).astype(np.float32),
                           "confidence": rng.random(m).astype(np.float32),
                           "gradcam/layer4/deletion": dele,
                           "gradcam/layer4/deletion_auc": np.trapezoid(dele, x, axis=1),
                           "gradcam/layer4/insertion": ins,
                           "gradcam/layer4/insertion_auc": np.trapezoid(ins, x, axis=1),
                           "gradcam/layer4/drop": rng.random(m).astype(np.float32),
                           "gradcam/layer4/increase": (rng.random(m) < .1).astype(np.float32),
                           "gradcam/layer4/explanation_score": rng.random(m).astype(
                               np.float32)})
    finally:
        part.close()
    install(part.path, run_dir / "metrics.h5", results,
            {"settings": settings, "metrics": metrics,
             "maps": maps, "steps": STEPS, "score": "logit", "road_removed_percent": [],
             "sanity_layers": [], "n_evaluated": int(done.sum())},
            paths, coordinates(settings, metrics))
    return run_dir


def start(cmd: list[str]) -> tuple[subprocess.Popen, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    took = time.perf_counter() - t0
    if not line.startswith("explore -> "):
        proc.kill()
        sys.exit(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, line.split()[-1], took


APP_S: dict[str, list[float]] = {}  # the server's own time (Server-Timing), per figure


def timed(client: httpx.Client, url: str, **params: Any) -> tuple[float, httpx.Response]:
    """Seconds from request to the whole response (HTTP round trip included)."""
    t0 = time.perf_counter()
    r = client.get(url, params=params)
    took = time.perf_counter() - t0
    if r.status_code != 200:
        sys.exit(f"{url} {params}: {r.status_code} {r.text[:300]}")
    app = r.headers.get("server-timing", "app;dur=nan").split("dur=")[-1]
    APP_S.setdefault(url, []).append(float(app) / 1000)
    return took, r


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def measure(run_dir: Path, n: int) -> dict[str, Any]:
    serve = [sys.executable, "-c", "import sys, types; from pipeline.explore import serve; "
             "serve(sys.argv[1], types.SimpleNamespace(host='127.0.0.1', port=0))",
             str(run_dir)]
    out: dict[str, Any] = {}
    proc, url, out["start_s"] = start(serve)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            out["first_page_s"], r = timed(c, "api/images", limit=48)
            assert r.json()["total"] == n
            out["sort_metric_s"], r = timed(c, "api/images", sort="deletion_auc", desc=1,
                                            limit=48)
            worst = r.json()["rows"]
            sorts = [timed(c, "api/images", sort=col, desc=d, limit=48)[0]
                     for col in ("insertion_auc", "entropy", "file", "pred_name", "drop")
                     for d in (0, 1)]
            out["sort_median_s"] = statistics.median(sorts)
            out["page_deep_s"] = timed(c, "api/images", sort="deletion_auc",
                                       offset=n - 100, limit=48)[0]
            out["search_s"] = timed(c, "api/images", q="tabby", limit=48)[0]
            out["per_class_s"] = timed(c, "api/images", per_class=3, sort="deletion_auc",
                                       limit=48)[0]
            out["misclassified_s"] = timed(c, "api/images", correct=0, limit=48)[0]
            out["range_s"] = timed(c, "api/images", min_deletion_auc=1, max_deletion_auc=2,
                                   limit=48)[0]
            rows = [w["row"] for w in worst[:20]]
            thumbs = [timed(c, "api/overlay", row=r, map="gradcam/layer4", size=320)[0]
                      for r in rows]
            full = [timed(c, "api/overlay", row=r, map="gradcam/layer4", size=1024,
                          cmap="viridis", alpha=0.6)[0] for r in rows]
            cached = [timed(c, "api/overlay", row=r, map="gradcam/layer4", size=320)[0]
                      for r in rows]
            out.update(overlay_s=statistics.median(thumbs), overlay_max_s=max(thumbs),
                       overlay_full_s=statistics.median(full), overlay_full_max_s=max(full),
                       overlay_cached_s=statistics.median(cached))
            out["detail_s"] = statistics.median(
                [timed(c, "api/image", row=r)[0] for r in rows[:10]])
        out["rss_mb"], out["rss_peak_mb"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    cli = [sys.executable, str(ROOT / "run.py"), "stage=explore", f"run_dir={run_dir}",
           "explore.port=0"]
    proc, _, out["start_cli_s"] = start(cli)
    out["rss_cli_mb"] = rss_mb(proc.pid)[0]
    proc.terminate()
    proc.wait(timeout=30)
    return out


def main() -> None:
    p = argument_parser(__doc__, "explore-cpu")
    p.add_argument("--n", type=int, default=50_000, help="images in the synthetic run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-explore-") as tmp:
        t0 = time.perf_counter()
        run_dir = make_run(Path(tmp), args.n)
        made = time.perf_counter() - t0
        load = os.getloadavg()
        figures = measure(run_dir, args.n)
        size = sum(f.stat().st_size for f in run_dir.iterdir())
    rows = []
    for key, label in (("start_s", "server start (serve)"),
                       ("start_cli_s", "server start (python run.py stage=explore)"),
                       ("first_page_s", "first page (48 rows)"),
                       ("sort_metric_s", "sort by deletion_auc (first)"),
                       ("sort_median_s", "sort by other columns (median)"),
                       ("page_deep_s", "a page at the end"), ("search_s", "search"),
                       ("per_class_s", "3 per class"), ("misclassified_s", "misclassified"),
                       ("range_s", "metric range"),
                       ("overlay_s", "overlay 320 px, cold (median)"),
                       ("overlay_max_s", "overlay 320 px, cold (max)"),
                       ("overlay_full_s", "overlay 1024 px, cold (median)"),
                       ("overlay_cached_s", "overlay, cached (median)"),
                       ("detail_s", "detail of one image (median)")):
        target = TARGETS.get(key)
        ok = "" if target is None else (" ✓" if figures[key] < target else " ✗")
        rows.append([label, f"{figures[key] * 1000:.0f} ms",
                     f"< {target * 1000:.0f} ms{ok}" if target else ""])
    for key, label in (("rss_mb", "server memory (RSS)"), ("rss_peak_mb", "server peak RSS"),
                       ("rss_cli_mb", "memory, run.py stage=explore (RSS)")):
        target = TARGETS.get(key)
        ok = "" if target is None else (" ✓" if figures[key] < target else " ✗")
        rows.append([label, f"{figures[key]:.0f} MB", f"< {target:.0f} MB{ok}" if target else ""])
    table = markdown_table(["", "measured", "target"], rows, "lrr")
    app = {k: {"median_s": statistics.median(v), "max_s": max(v), "calls": len(v)}
           for k, v in APP_S.items()}
    payload = {"machine": machine_info(torch.device("cpu")), "n_images": args.n,
               "server_time_by_route": app,
               "run_bytes": size, "make_run_s": made, "load_average_before": list(load),
               "figures": figures, "targets": TARGETS}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "explore-cpu"
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    inside = markdown_table(["route", "median", "max", "calls"], [
        [k, f"{v['median_s'] * 1000:.1f} ms", f"{v['max_s'] * 1000:.1f} ms", v["calls"]]
        for k, v in app.items()])
    md = (f"# Explorer on a synthetic {args.n:,}-image run (CPU)\n\n"
          "Wall time of each HTTP request as a client sees it:\n\n"
          f"{table}\n\nThe server's own time per request (its Server-Timing header: "
          f"routing, reading, drawing, encoding; no HTTP):\n\n{inside}\n\n"
          f"Load average before: {load[0]:.1f} on {os.cpu_count()} CPUs. "
          f"Run files: {size / 2**20:.0f} MB. Making the run took {made:.0f} s.\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
