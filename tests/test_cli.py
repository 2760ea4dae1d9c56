"""The command line as a user runs it: real `python run.py` subprocesses."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, TINY

from pipeline.results import load_run, load_sweep


def run_py(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_default_job_on_bundled_samples(tmp_path):
    """`python run.py`: embedded pretrained Lite0, bundled photos, overlays, summary."""
    proc = run_py(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "4 of 4 images done, 0 failed" in out
    assert "chelsea.jpg: 285 Egyptian cat" in out and "coffee.jpg: 967 espresso" in out
    (results,) = tmp_path.glob("outputs/*/*/results.h5")
    run_dir = results.parent
    assert len(list((run_dir / "pictures").glob("*.png"))) == 4
    assert (run_dir / ".hydra" / "config.yaml").exists()
    with load_run(results) as run:
        assert run.model == "efficientnet_lite0" and run.done.all()
        assert list(run.predictions[0][:2, 0]) == [285, 967]

    # Render again from the stored arrays only; the run's own config record is kept.
    before = (run_dir / ".hydra" / "config.yaml").read_text()
    for png in (run_dir / "pictures").glob("*.png"):
        png.unlink()
    proc = run_py("stage=render", f"run_dir={run_dir}", "model=resnet18", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run_dir / "pictures").glob("*.png"))) == 4
    assert (run_dir / ".hydra" / "config.yaml").read_text() == before
    assert list((run_dir / ".hydra").glob("render-*/config.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["model=resnet43"], "error: unknown model 'resnet43'; did you mean 'resnet34'"),
    (["device=gpu"], "error: unknown device 'gpu'"),
    ([*TINY, "model.target_layers=[layer5]"], "unknown layer 'layer5'; did you mean"),
    ([*TINY, "data=glob", "data.pattern=nothing/*.jpg"], "matches no files"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, message):
    proc = run_py(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.slow
def test_run_where_every_image_fails_exits_nonzero(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("no")
    (tmp_path / "bad" / "b.jpg").write_bytes(b"")
    proc = run_py(*TINY, "data=glob", f"data.pattern={tmp_path}/bad/*.jpg", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no image could be processed (2 failed)" in proc.stderr


@pytest.mark.slow
def test_existing_run_of_other_config_is_not_overwritten(tmp_path, image_dir):
    common = (*TINY, "stage=extract", "data=glob", f"data.pattern={image_dir}/*.jpg",
              f"run_dir={tmp_path}/run")
    assert run_py(*common, cwd=tmp_path).returncode == 0
    proc = run_py(*common, "method=saliency", cwd=tmp_path)
    assert proc.returncode == 2 and "different config: method.name" in proc.stderr
    with load_run(tmp_path / "run") as run:
        assert run.method == "gradcam" and run.done.all()
    assert "method:\n  name: gradcam" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_class_index_shorthand(tmp_path):
    """`target=281` on the command line is `target=class target.index=281`."""
    run_dir = tmp_path / "run"
    proc = run_py(*TINY, "target=281", "stage=extract", "data.limit=2", f"run_dir={run_dir}",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with load_run(run_dir) as run:
        assert list(run.targets[0]) == [281, 281]
        assert "index: 281" in run.attrs["config"]


@pytest.mark.slow
def test_sweeps_take_hydras_whole_override_grammar(tmp_path):
    """choice(), range() (also through the target=N shorthand), glob() and quoted lists."""
    tiny = [a for a in TINY if not a.startswith("model=")]
    proc = run_py("-m", *tiny, "stage=extract", "data.limit=1", "data.image_size=32",
                  "model=glob(resnet1*)", "method=choice(gradcam,saliency)",
                  "target=range(281,283)", "model.target_layers=[layer4]",
                  "hydra.sweep.dir='sweep dir'", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = load_sweep(tmp_path / "sweep dir")
    assert len(sweep) == 4 and (sweep.table["state"] == "done").all()
    combos = set()
    for _, run in sweep.runs():
        assert run.model == "resnet18" and run.layers in (["layer4"], [])
        combos.add((run.method, int(run.targets[0][0])))
    assert combos == {("gradcam", 281), ("gradcam", 282), ("saliency", 281), ("saliency", 282)}
