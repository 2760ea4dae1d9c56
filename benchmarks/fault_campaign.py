"""A randomized fault campaign: N random faults against small camsweep runs, and the
invariants every one of them must keep.

    python benchmarks/fault_campaign.py --faults 300 --seed 1 --jobs 2 \\
        --out benchmarks/results/fault-campaign.json

Each fault is drawn from its own random stream (``seed`` and its number), so a failure is
replayed alone with ``--seed S --only I``. The runs are tiny (a random-init resnet18 at
64 pixels, a dozen generated images, CPU); the uninterrupted reference runs are made once
per campaign and every fault is compared with them.

Faults: kill -9 / SIGINT / SIGTERM at a random row of extract (fixed size or native
resolution), and at a random point of merge, evaluate, render and report (the kill waits
for progress read from the files, never a fixed time); a tiny tmpfs disk (root only);
a file-size limit (RLIMIT_FSIZE); two writers in one run directory; an image changed
between a crash and the resume (new bytes, touched only, a FIFO); forged results files
(a map as a string, an external link, a virtual dataset to a missing file, a truncated or
overwritten file); a flipped bit in map data, checked by ``stage=verify`` where this
branch has it.

Invariants: done rows equal the uninterrupted run; no traceback, no "Logging error", no
death by a signal (we did not send), no hang (timeouts are a guard only); a refused run
says why in one line; verify names every flipped row. The summary (JSON) lists every
violation with the fault's parameters; the exit status is 1 when there is any.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from fault_tools import (  # beside this script
    DONE,
    FAILED,
    N_IMAGES,
    Fault,
    Outcome,
    clean,
    count_files,
    done_rows,
    photo,
    run_camsweep,
    same_rows,
    status_of,
    write_images,
)
from PIL import Image

BASE = ("model=resnet18", "model.weights=null", "data.image_size=64", "batch_size=2",
        "num_workers=0", "device=cpu", "data=glob")
NATIVE = ("data.resize=null", "data.max_side=48")
EVALUATE = ("evaluate.metrics=[deletion,confidence]", "evaluate.steps=4", "device=cpu",
            "num_workers=0")
ARRAYS = ("gradcam/layer4", "gradcam_weights/layer4", "targets/class", "targets/score",
          "predictions/class", "predictions/prob", "images/size")


class Campaign:
    def __init__(self, work: Path, seed: int, timeout: float) -> None:
        self.work = work
        self.seed = seed
        self.timeout = timeout
        self.images = work / "images"
        self._refs: dict[str, Path] = {}
        self._lock = threading.RLock()  # a reference may need another
        self.root = os.geteuid() == 0

    # -- running camsweep ------------------------------------------------------------------

    def run(self, *args: str, cwd: Path | None = None, stop_when: Callable[[], bool] | None = None,
            sig: int = signal.SIGKILL, fsize: int | None = None) -> Outcome:
        return run_camsweep(*args, timeout=self.timeout, cwd=cwd or self.work,
                            stop_when=stop_when, sig=sig, fsize=fsize)

    def extract_args(self, run_dir: Path, images: Path | None = None, *extra: str) -> list[str]:
        return ["stage=extract", f"run_dir={run_dir}", *BASE,
                f"data.pattern={images or self.images}/*.jpg", *extra]

    clean = staticmethod(clean)

    # -- references (made once, shared by all faults) -------------------------------------

    def ref(self, name: str) -> Path:
        with self._lock:
            if name not in self._refs:
                self._refs[name] = self._make_ref(name)
            return self._refs[name]

    def _make_ref(self, name: str) -> Path:
        if name == "images":
            write_images(self.images)
            return self.images
        self.ref("images")
        folder = self.work / f"ref-{name}"
        steps: list[list[str]] = []
        if name == "fixed":
            steps = [self.extract_args(folder)]
        elif name == "native":
            steps = [self.extract_args(folder, None, *NATIVE)]
        elif name == "shards":
            steps = [self.extract_args(folder, None, f"data.shard={i}", "data.num_shards=2")
                     for i in range(2)]
        elif name in ("evaluate", "render"):
            shutil.copytree(self.ref("fixed"), folder)
            steps = [[f"stage={name}", f"run_dir={folder}", *(EVALUATE if name == "evaluate"
                                                              else ())]]
        for args in steps:
            o = self.run(*args)
            if o.returncode != 0:
                raise RuntimeError(f"reference {name} failed: {o.stderr[-2000:]}")
        if name == "shards":
            (folder / "results.h5").unlink(missing_ok=True)  # the shards alone, to merge
        return folder

    def copy_ref(self, name: str, dest: Path) -> Path:
        shutil.copytree(self.ref(name), dest, ignore=shutil.ignore_patterns("*.lock"))
        return dest

    def compare(self, results: Path, ref: Path, rows: Any = None, what: str = "rows"
                ) -> list[str]:
        """Done rows of ``results`` against the uninterrupted run (``rows``: only those)."""
        try:
            with h5py.File(results, "r", locking=False) as a, \
                    h5py.File(ref / "results.h5", "r", locking=False) as b:
                status = a["images/status"][:]
                sel = np.flatnonzero(status == DONE) if rows is None else np.asarray(rows)
                if rows is None and len(sel) != len(status):
                    return [f"{what}: {len(status) - len(sel)} of {len(status)} rows not done"]
                bad = [key for key in ARRAYS if key in b and not same_rows(a, b, key, sel)]
                return [f"{what}: wrong rows in {', '.join(bad)}"] if bad else []
        except (OSError, KeyError) as e:
            return [f"{what}: cannot compare ({type(e).__name__}: {e})"]

    # -- the faults ------------------------------------------------------------------------

    def kill_extract(self, rng: random.Random, d: Path, f: Fault) -> None:
        native = rng.random() < 0.35
        sig = rng.choice([signal.SIGKILL] * 3 + [signal.SIGINT, signal.SIGTERM])
        k = rng.randint(1, N_IMAGES - 1)
        f.params.update(native=native, signal=sig.name, after_rows=k)
        extra = NATIVE if native else ()
        run_dir = d / "run"
        results = run_dir / "results.h5"
        o = self.run(*self.extract_args(run_dir, None, *extra),
                     stop_when=lambda: done_rows(results) >= k, sig=sig)
        f.violations += self.clean(o, "killed extract", ok=(0, 130, 143))
        again = self.run(*self.extract_args(run_dir, None, *extra))
        f.violations += self.clean(again, "resume")
        f.violations += self.compare(results, self.ref("native" if native else "fixed"))

    def kill_merge(self, rng: random.Random, d: Path, f: Fault) -> None:
        run_dir = self.copy_ref("shards", d / "run")
        copy = rng.random() < 0.7
        f.params.update(merge_copy=copy)
        o = self.run("stage=merge", f"run_dir={run_dir}", f"merge_copy={str(copy).lower()}",
                     stop_when=lambda: any(run_dir.glob(".results.h5.tmp-*")))
        f.violations += self.clean(o, "killed merge")
        again = self.run("stage=merge", f"run_dir={run_dir}", "merge_copy=false")
        f.violations += self.clean(again, "merge again")
        f.violations += self.compare(run_dir / "results.h5", self.ref("fixed"))

    def kill_evaluate(self, rng: random.Random, d: Path, f: Fault) -> None:
        ref = self.ref("evaluate")
        run_dir = d / "run"
        run_dir.mkdir()
        shutil.copy(self.ref("fixed") / "results.h5", run_dir / "results.h5")
        when = rng.choice(["partial", "late"])
        f.params.update(kill_at=when)
        partial = run_dir / ".metrics-partial.h5"
        o = self.run("stage=evaluate", f"run_dir={run_dir}", *EVALUATE,
                     stop_when=lambda: partial.exists() and (
                         when == "partial" or partial.stat().st_size > 0))
        f.violations += self.clean(o, "killed evaluate")
        again = self.run("stage=evaluate", f"run_dir={run_dir}", *EVALUATE,
                         "evaluate.overwrite=true")
        f.violations += self.clean(again, "evaluate again")
        try:
            with h5py.File(run_dir / "metrics.h5", "r") as a, \
                    h5py.File(ref / "metrics.h5", "r") as b:
                keys: list[str] = []
                b.visititems(lambda k, v: keys.append(k) if isinstance(v, h5py.Dataset)
                             else None)
                for k in keys:
                    if k not in a or (b[k].dtype.kind == "f" and not np.allclose(
                            a[k][()], b[k][()], rtol=1e-4, atol=1e-5, equal_nan=True)):
                        f.violations.append(f"metrics differ from the reference: {k}")
        except OSError as e:
            f.violations.append(f"metrics.h5 unreadable after the rerun: {e}")

    def kill_render(self, rng: random.Random, d: Path, f: Fault) -> None:
        ref = self.ref("render")
        run_dir = d / "run"
        run_dir.mkdir()
        shutil.copy(self.ref("fixed") / "results.h5", run_dir / "results.h5")
        k = rng.randint(0, N_IMAGES - 1)
        f.params.update(after_pictures=k)
        o = self.run("stage=render", f"run_dir={run_dir}",
                     stop_when=lambda: count_files(run_dir / "pictures", "*.png") >= k)
        f.violations += self.clean(o, "killed render")
        again = self.run("stage=render", f"run_dir={run_dir}")
        f.violations += self.clean(again, "render again")
        names = sorted(p.relative_to(run_dir).as_posix() for p in
                       (run_dir / "pictures").rglob("*.png"))
        want = sorted(p.relative_to(ref).as_posix() for p in (ref / "pictures").rglob("*.png"))
        if names != want:
            f.violations.append(f"pictures differ: {len(names)} written, {len(want)} expected")

    def kill_report(self, rng: random.Random, d: Path, f: Fault) -> None:
        run_dir = d / "run"
        run_dir.mkdir()
        shutil.copy(self.ref("fixed") / "results.h5", run_dir / "results.h5")
        o = self.run("stage=report", f"run_dir={run_dir}",
                     stop_when=lambda: count_files(run_dir, ".report*") > 0)
        f.violations += self.clean(o, "killed report")
        again = self.run("stage=report", f"run_dir={run_dir}")
        f.violations += self.clean(again, "report again")
        if not (run_dir / "report" / "index.html").is_file():
            f.violations.append("no report/index.html after the rerun")

    def disk_full(self, rng: random.Random, d: Path, f: Fault) -> None:
        if not self.root:
            f.skipped = "needs root to mount a tmpfs"
            return
        size_kb = rng.choice([16, 64, 200, 400, 700, 1000, 1500])
        native = rng.random() < 0.3
        f.params.update(size_kb=size_kb, native=native)
        point = d / "disk"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(point)],
                       check=True)
        try:
            extra = NATIVE if native else ()
            run_dir = point / "run"
            o = self.run(*self.extract_args(run_dir, None, *extra))
            f.violations += self.clean(o, "extract on a small disk", ok=(0, 1, 2))
            ref = self.ref("native" if native else "fixed")
            if (run_dir / "results.h5").exists() and done_rows(run_dir / "results.h5"):
                f.violations += self.compare(run_dir / "results.h5", ref, rows=np.flatnonzero(
                    status_of(run_dir / "results.h5") == DONE), what="done rows on a full disk")
            subprocess.run(["mount", "-o", "remount,size=64m", str(point)], check=True)
            again = self.run(*self.extract_args(run_dir, None, *extra))
            f.violations += self.clean(again, "extract after freeing space")
            f.violations += self.compare(run_dir / "results.h5", ref)
        finally:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)

    def fsize_limit(self, rng: random.Random, d: Path, f: Fault) -> None:
        limit = rng.choice([4096, 16384, 65536, 262144, 1 << 20])
        f.params.update(rlimit_fsize=limit)
        run_dir = d / "run"
        o = self.run(*self.extract_args(run_dir), fsize=limit)
        f.violations += self.clean(o, f"extract under RLIMIT_FSIZE={limit}", ok=(0, 1, 2))
        again = self.run(*self.extract_args(run_dir))
        f.violations += self.clean(again, "extract without the limit")
        f.violations += self.compare(run_dir / "results.h5", self.ref("fixed"))

    def concurrent(self, rng: random.Random, d: Path, f: Fault) -> None:
        other = rng.choice(["same", "layer3", "evaluate"])
        f.params.update(second=other)
        run_dir = d / "run"
        if other == "evaluate":
            shutil.copytree(self.ref("fixed"), run_dir, ignore=shutil.ignore_patterns("*.lock"))
            second = ["stage=evaluate", f"run_dir={run_dir}", *EVALUATE]
            first = self.extract_args(run_dir, None, "model.target_layers=[layer3]")
        else:
            first = self.extract_args(run_dir)
            second = self.extract_args(run_dir, None, *(
                ("model.target_layers=[layer3]",) if other == "layer3" else ()))
        outs: list[Outcome] = []
        threads = [threading.Thread(target=lambda a=a: outs.append(self.run(*a)))
                   for a in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for o in outs:
            f.violations += self.clean(o, "one of two writers", ok=(0, 2))
        final = self.run(*self.extract_args(run_dir), "overwrite=true" if other != "same"
                         else "resume=true")
        f.violations += self.clean(final, "the first config afterwards")
        f.violations += self.compare(run_dir / "results.h5", self.ref("fixed"))

    def changed_input(self, rng: random.Random, d: Path, f: Fault) -> None:
        images = d / "images"
        shutil.copytree(self.ref("images"), images)
        run_dir = d / "run"
        results = run_dir / "results.h5"
        k = rng.randint(1, N_IMAGES - 2)
        how = rng.choice(["new_content", "touched", "fifo"])
        f.params.update(after_rows=k, change=how)
        o = self.run(*self.extract_args(run_dir, images), stop_when=lambda: done_rows(results) >= k)
        f.violations += self.clean(o, "killed extract", ok=(0,))
        done = np.flatnonzero(status_of(results) == DONE)
        if not len(done):
            f.violations.append("no row done before the kill")
            return
        row = int(rng.choice(done.tolist()))
        path = images / f"img{row:03d}.jpg"
        f.params.update(row=row)
        if how == "new_content":
            Image.fromarray(photo(1000 + row, 48, 56)).save(path)
        elif how == "touched":
            os.utime(path, ns=(1, 1))
        else:
            path.unlink()
            os.mkfifo(path)
        again = self.run(*self.extract_args(run_dir, images))
        if how == "touched":
            f.violations += self.clean(again, "resume after a touch")
            f.violations += self.compare(results, self.ref("fixed"))
            return
        f.violations += self.clean(again, "resume after a change", ok=(2,))
        if again.returncode == 2 and path.name not in again.stderr:
            f.violations.append(f"the refusal does not name {path.name}: {again.stderr[-300:]}")
        rec = self.run(*self.extract_args(run_dir, images, "resume_changed=recompute"))
        f.violations += self.clean(rec, "resume_changed=recompute")
        others = np.setdiff1d(np.arange(N_IMAGES), [row])
        f.violations += self.compare(results, self.ref("fixed"), rows=others,
                                     what="unchanged rows")
        status = status_of(results)
        if how == "fifo" and status[row] != FAILED:
            f.violations.append("a FIFO's row is not failed")
        if how == "new_content" and status[row] != DONE:
            f.violations.append("the changed row was not computed again")

    def forged(self, rng: random.Random, d: Path, f: Fault) -> None:
        run_dir = d / "run"
        run_dir.mkdir()
        results = run_dir / "results.h5"
        shutil.copy(self.ref("fixed") / "results.h5", results)
        how = rng.choice(["string_map", "external_link", "virtual_missing", "truncated",
                          "garbage_header", "wrong_shape"])
        f.params.update(forgery=how)
        size = results.stat().st_size
        if how == "truncated":
            os.truncate(results, rng.randint(0, size - 1))
        elif how == "garbage_header":
            with open(results, "r+b") as fh:
                fh.write(bytes(rng.getrandbits(8) for _ in range(512)))
        else:
            with h5py.File(results, "r+") as h:
                n = len(h["images/status"])
                del h["gradcam/layer4"]
                if how == "string_map":
                    h["gradcam/layer4"] = np.array(["x"] * n, dtype=object).astype("S8")
                elif how == "external_link":
                    h["gradcam/layer4"] = h5py.ExternalLink("/etc/passwd", "/x")
                elif how == "wrong_shape":
                    h["gradcam/layer4"] = np.ones((n, 3, 1), np.float32)
                else:
                    layout = h5py.VirtualLayout((n, 2, 2), np.float32)
                    layout[:] = h5py.VirtualSource("missing.h5", "gradcam/layer4", (n, 2, 2))
                    h.create_virtual_dataset("gradcam/layer4", layout, fillvalue=0)
        for stage in ("render", "report"):
            o = self.run(f"stage={stage}", f"run_dir={run_dir}")
            f.violations += self.clean(o, f"{stage} of a forged file ({how})", ok=(0, 2))
            if how != "truncated" and o.returncode == 0 and stage == "render":
                f.violations.append(f"render accepted a forged file ({how})")

    def bit_flip(self, rng: random.Random, d: Path, f: Fault) -> None:
        run_dir = self.copy_ref("fixed", d / "run")
        results = run_dir / "results.h5"
        key = rng.choice(["gradcam/layer4", "gradcam_weights/layer4", "predictions/prob",
                          "targets/score"])
        with h5py.File(results, "r") as h:
            ds = h[key]
            row = rng.randrange(ds.shape[0])
            per_row = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
            chunk = ds.id.get_chunk_info_by_coord((row // ds.chunks[0] * ds.chunks[0],
                                                  *([0] * (ds.ndim - 1))))
            offset = chunk.byte_offset + (row % ds.chunks[0]) * per_row + rng.randrange(per_row)
        bit = rng.randrange(8)
        f.params.update(dataset=key, row=row, offset=int(offset), bit=bit)
        with open(results, "r+b") as fh:
            fh.seek(offset)
            byte = fh.read(1)[0]
            fh.seek(offset)
            fh.write(bytes([byte ^ (1 << bit)]))
        o = self.run("stage=verify", f"run_dir={run_dir}")
        f.violations += self.clean(o, "verify", ok=(1, 2, 3))
        text = o.stdout + o.stderr
        # verify's words for a damaged row: "damaged: <file> row <r> /<dataset>"
        if o.returncode == 0 or f"row {row} /{key}" not in text:
            f.violations.append(f"verify did not name {key} row {row}: rc {o.returncode}, "
                                f"{text.strip()[-300:]}")


KINDS = ("kill_extract", "kill_merge", "kill_evaluate", "kill_render", "kill_report",
         "disk_full", "fsize_limit", "concurrent", "changed_input", "forged", "bit_flip")
WEIGHTS = {"kill_extract": 4}  # the most varied: drawn more often


def run_fault(c: Campaign, index: int, kinds: tuple[str, ...], cycle: bool = False) -> Fault:
    rng = random.Random(f"{c.seed}-{index}")
    kind = rng.choices(kinds, weights=[WEIGHTS.get(k, 1) for k in kinds])[0]
    if cycle:  # every kind in turn (a short campaign that covers them all)
        kind = kinds[index % len(kinds)]
    f = Fault(index, kind)
    d = c.work / f"fault-{index:04d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    start = time.monotonic()
    try:
        getattr(c, kind)(rng, d, f)
    except Exception as e:  # a broken fault (or reference) is reported, not hidden
        f.violations.append(f"campaign error: {type(e).__name__}: {e}")
    f.seconds = round(time.monotonic() - start, 1)
    if not f.violations:
        shutil.rmtree(d, ignore_errors=True)
    return f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    p.add_argument("--only", type=int, default=None, help="replay fault I of --seed alone")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated of {KINDS}")
    p.add_argument("--jobs", type=int, default=1, help="faults run at once")
    p.add_argument("--cycle", action="store_true", help="the kinds in turn, not drawn")
    p.add_argument("--timeout", type=float, default=300, help="guard per command, seconds")
    p.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--out", type=Path, default=None, help="the JSON summary")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    kinds = tuple(k for k in a.kinds.split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown kinds {unknown}; valid: {', '.join(KINDS)}")
    print(f"fault campaign: seed {seed} (replay: --seed {seed}), {a.faults} faults", flush=True)
    work = a.work or Path(tempfile.mkdtemp(prefix="camsweep-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    c = Campaign(work, seed, a.timeout)
    indices = [a.only] if a.only is not None else list(range(a.faults))
    c.ref("images")
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        faults = []
        for f in pool.map(lambda i: run_fault(c, i, kinds, a.cycle), indices):
            faults.append(f)
            mark = "skipped: " + f.skipped if f.skipped else (
                "ok" if not f.violations else "; ".join(f.violations))
            print(f"  {f.index:4d} {f.kind:14s} {json.dumps(f.params)} {f.seconds}s: {mark}",
                  flush=True)
    ran = [f for f in faults if not f.skipped]
    bad = [f for f in ran if f.violations]
    summary = {
        "seed": seed, "faults": len(faults), "ran": len(ran), "skipped": len(faults) - len(ran),
        "violations": sum(len(f.violations) for f in bad), "faults_with_violations": len(bad),
        "lost_or_wrong_rows": sum(1 for f in bad for v in f.violations
                                  if "wrong rows" in v or "not done" in v),
        "seconds": round(time.monotonic() - start, 1), "jobs": a.jobs,
        "kinds": {k: sum(1 for f in ran if f.kind == k) for k in kinds},
        "failures": [f.__dict__ for f in bad],
        "skips": sorted({f"{f.kind}: {f.skipped}" for f in faults if f.skipped}),
        "work": str(work),
    }
    print(f"{len(ran)} faults ran ({summary['skipped']} skipped), {len(bad)} with violations, "
          f"{summary['lost_or_wrong_rows']} with lost or wrong rows, {summary['seconds']}s; "
          f"seed {seed}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=1))
    if a.work is None and not bad:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
