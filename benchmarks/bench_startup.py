"""Start-up of `python run.py` for the stages that only read files, before/after side by side.

Times each command from process start to exit, as a user waits for it, for two checkouts in
one run: this repository and an older revision (``--before``, extracted with ``git archive``
into a temporary folder), alternating between them so both see the same machine load. Also
records whether each command imported torch (the module list at exit). A small run to read
is made first (a random-init resnet18 on three generated pictures). Writes JSON + Markdown
to benchmarks/results/startup-cpu.{json,md}.

    python benchmarks/bench_startup.py --before 0f649ee          # the revision before #20
    python benchmarks/bench_startup.py --repeat 3                # this checkout only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
# run.py as `python run.py` runs it, writing every imported module's name at exit.
LIST_MODULES = """\
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def commands(run_dir: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "stage=report": ["stage=report", f"run_dir={run_dir}"],
        "stage=render": ["stage=render", f"run_dir={run_dir}"],
        "stage=table": ["stage=table", f"run_dir={run_dir}"],
        "stage=verify": ["stage=verify", f"run_dir={run_dir}"],
        "stage=status": ["stage=status", f"run_dir={run_dir}"],
        # a server: timed until it prints its URL, then stopped
        "stage=explore": ["stage=explore", f"run_dir={run_dir}", "explore.port=0"],
    }


def has_stage(code: Path, args: list[str]) -> bool:
    """Whether checkout ``code`` knows the stage ``args`` ask for (newer stages are timed
    in this checkout only)."""
    stage = next((a.split("=", 1)[1] for a in args if a.startswith("stage=")), None)
    return stage is None or f'"{stage}"' in (code / "pipeline" / "config.py").read_text()


def checkout(rev: str, into: Path) -> Path:
    """The tree of git revision ``rev`` of this repository, extracted under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_py(code: Path, args: list[str], cwd: Path) -> float:
    """Seconds from start to exit of ``python run.py ARGS`` in checkout ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    if "stage=explore" in args:  # until the URL is printed
        server = subprocess.Popen([sys.executable, str(code / "run.py"), *args], cwd=cwd,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        line = server.stdout.readline()
        seconds = time.perf_counter() - start
        server.terminate()
        _, err = server.communicate(timeout=60)
        if not line.startswith("explore -> "):
            sys.exit(f"{code}: run.py {' '.join(args)} printed no URL:\n{err[-2000:]}")
        return seconds
    proc = subprocess.run([sys.executable, str(code / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{code}: run.py {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def imports_torch(code: Path, args: list[str], cwd: Path) -> bool:
    if "stage=explore" in args:  # a server: its imports are checked by tests/test_explore.py
        return False
    listing = cwd / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(code)}
    subprocess.run([sys.executable, "-c", LIST_MODULES, str(listing), str(code / "run.py"),
                    *args], cwd=cwd, env=env, capture_output=True, check=True)
    return "torch" in json.loads(listing.read_text())


def make_run(work: Path) -> Path:
    rng = np.random.default_rng(0)
    images = work / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(
            images / f"{i}.jpg")
    run_dir = work / "run"
    run_py(ROOT, ["stage=extract", "model=resnet18", "model.weights=null", "data=glob",
                  f"data.pattern={images}/*.jpg", "data.image_size=64", "device=cpu",
                  "num_workers=0", f"run_dir={run_dir}"], work)
    return run_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="git revision to compare with (e.g. 0f649ee)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each command per checkout")
    p.add_argument("--out", type=Path, default=OUT, help="folder for JSON + Markdown")
    p.add_argument("--name", default="startup-cpu", help="file stem (default startup-cpu)")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto",
                   help="start-up runs on the CPU whatever the machine has")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_dir = make_run(work)
        codes = {"after": ROOT}
        if args.before:
            codes = {"before": checkout(args.before, work / "before"), **codes}
        rows = []
        for label, cmd in commands(run_dir).items():
            known = {v: c for v, c in codes.items() if has_stage(c, cmd)}
            seconds: dict[str, list[float]] = {version: [] for version in known}
            for _ in range(args.repeat):  # alternate: both see the same load
                for version, code in known.items():
                    seconds[version].append(run_py(code, cmd, work))
            for version, code in known.items():
                rows.append({"command": f"python run.py {label}", "code": version,
                             "median_s": round(statistics.median(seconds[version]), 3),
                             "min_s": round(min(seconds[version]), 3),
                             "runs_s": [round(s, 3) for s in seconds[version]],
                             "imports_torch": imports_torch(code, cmd, work)})

    result = {
        "benchmark": "startup", "created": datetime.now(timezone.utc).isoformat(),
        "before": args.before, "repeat": args.repeat,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }
    lines = ["| command | code | median s | min s | imports torch |", "|---|---|---|---|---|"]
    lines += [f"| `{r['command']}` | {r['code']} | {r['median_s']:.2f} | {r['min_s']:.2f} | "
              f"{'yes' if r['imports_torch'] else 'no'} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(
        f"# Start-up of read-only stages (CPU)\n\nBefore: {args.before or '-'}; after: this "
        f"checkout; {args.repeat} runs each, alternating; {os.cpu_count()} CPUs, load "
        f"{result['machine']['load_avg_1m_at_end']} at the end. Time to exit of the "
        f"process.\n\n{table}\n")


if __name__ == "__main__":
    main()
