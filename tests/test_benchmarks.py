"""The benchmark scripts still run end to end (tiny settings; the figures are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = {
    "bench_methods": ["--models", "resnet18", "--batches", "2", "--layouts", "nchw", "nhwc",
                      "--methods", "forward", "gradcam", "pgc-gradcam", "--image-size", "64",
                      "--warmup", "0", "--repeats", "1", "--min-time", "0", "--in-process"],
    "bench_evaluate": ["--quick", "--metrics", "deletion", "road", "pointing", "--steps", "2",
                       "--image-size", "32"],
    "bench_e2e": ["--model", "resnet18", "--n", "8", "--batch-size", "4", "--methods",
                  "gradcam", "--workers", "0"],
    # timm rows: ours detects the token layout, pytorch-grad-cam gets the explicit reshape.
    "bench_methods:timm": ["--models", "timm/convnext_atto", "timm/vit_tiny_patch16_224",
                           "--batches", "1", "--layouts", "nchw", "--methods", "forward",
                           "gradcam", "pgc-gradcam", "--warmup", "0", "--repeats", "1",
                           "--min-time", "0", "--in-process"],
    # Start-up of --help and the reading stages (this checkout only: no --before).
    "bench_startup": ["--repeat", "1"],
    "bench_e2e:timm": ["--model", "timm/convnext_atto", "--n", "4", "--batch-size", "4",
                       "--methods", "gradcam", "--workers", "0"],
    "bench_verify": ["--quick"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_runs(tmp_path, script):
    file = script.partition(":")[0]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{file}.py"),
                           *SCRIPTS[script], "--device", "cpu", "--out", str(tmp_path),
                           "--name", "smoke"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "smoke.json").read_text())
    assert "machine" in payload and (tmp_path / "smoke.md").read_text().startswith("# ")
    if script == "bench_methods":
        cells = payload["cells"]
        assert {(c["layout"], c["method"]) for c in cells if not c["error"]} == {
            (layout, m) for layout in ("nchw", "nhwc")
            for m in ("forward", "gradcam", "pgc-gradcam")}
        assert all(c["max_abs_diff"] <= 1e-5 for c in cells if c["method"] == "pgc-gradcam")
        rows = payload["interleaved"]
        assert [r["layout"] for r in rows] == ["nchw", "nhwc"]
        assert all(r["rounds"] >= 1 and r["gradcam_vs_forward"] > 0 and r["gradcam_vs_pgc"] > 0
                   for r in rows)
    if script == "bench_startup":
        assert [(r["command"], r["imports_torch"]) for r in payload["rows"]] == [
            ("python run.py --help", False), ("python run.py stage=report", False),
            ("python run.py stage=render", False), ("python run.py stage=table", False),
            ("python run.py stage=verify", False), ("python run.py stage=status", False),
            ("python run.py stage=explore", False)]
    if script == "bench_methods:timm":
        cells = payload["cells"]
        assert not [c for c in cells if c["error"]]
        pgc = {c["model"]: c["max_abs_diff"] for c in cells if c["method"] == "pgc-gradcam"}
        assert sorted(pgc) == ["timm/convnext_atto", "timm/vit_tiny_patch16_224"]
        assert all(d <= 1e-5 for d in pgc.values()), pgc
