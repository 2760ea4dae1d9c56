"""The metric registry and what is derived from it (config, layout, summaries, columns), the
labelled metrics file and its readers, evaluate on sweeps with progress and locks, and the
faults of the evaluate stage: full disks (a real tmpfs), damaged partial files, images
deleted after extraction, datasets deleted from metrics.h5."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, TINY, compose_cfg, write_images

from pipeline import evaluate as E
from pipeline.cli import run
from pipeline.errors import StoreError
from pipeline.evaluate_setup import read_setup
from pipeline.locks import lock_is_held
from pipeline.metrics import registry
from pipeline.store import metrics as SM
from pipeline.store.metrics import METRICS_FILE, PARTIAL

pytestmark = pytest.mark.usefixtures("one_thread")
EVAL = ("stage=evaluate", "evaluate.steps=4", "evaluate.road_percentiles=[50]",
        "evaluate.sanity_max_steps=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    """Three photos with one box, Grad-CAM of a random resnet18 at layer4: run ``a``."""
    root = tmp_path_factory.mktemp("metrics")
    write_images(root / "images", 3, size=(96, 128))
    (root / "boxes.csv").write_text("file,xmin,ymin,xmax,ymax\nimg001.jpg,10,12,60,50\n"
                                    "img001.jpg,70,20,90,40\n")
    base = (*TINY, "data=glob", f"data.pattern={root}/images/*.jpg",
            "model.target_layers=[layer4]")
    run(compose_cfg(*base, "stage=extract"), root / "a")
    return root, base


def _copy(runs: tuple[Path, tuple[str, ...]], to: Path) -> Path:
    shutil.copytree(runs[0] / "a", to, ignore=shutil.ignore_patterns(".*", METRICS_FILE))
    return to


def _evaluate(runs, run_dir: Path, *extra: str) -> dict:
    root, base = runs
    return run(compose_cfg(*base, *EVAL, f"run_dir={run_dir}",
                           f"evaluate.boxes={root}/boxes.csv", *extra), run_dir)


# -- the registry -----------------------------------------------------------------------------

def test_the_registry_declares_each_metric_once_and_everything_else_follows():
    assert list(registry.METRICS) == ["deletion", "insertion", "confidence", "road", "pointing",
                                      "sanity"]
    assert [o.name for o in registry.per_map_columns()] == [
        "deletion_auc", "insertion_auc", "drop", "increase", "explanation_score", "road",
        "pointing_hit", "pointing_energy"]
    figs = {f.key: (f.output, f.direction) for f in registry.figures()}
    assert figs["deletion_auc"] == ("deletion_auc", "lower")
    assert figs["avg_drop"] == ("drop", "lower") and figs["sanity_last"][1] == "zero"
    # The evaluate config is the general keys plus every metric's options, once each.
    keys = [f.name for f in dataclasses.fields(compose_cfg().evaluate._metadata.object_type)]
    assert keys.count("steps") == 1 and {"road_rule", "tolerance", "sanity_depth"} <= set(keys)
    assert list(compose_cfg().evaluate.metrics) == list(registry.METRICS)
    # The layout follows the declarations: shapes from the settings, a class axis for topk.
    settings = {"steps": 4, "road_percentiles": [10, 50], "sanity_units": ["fc"],
                "score": "logit", "confidence_score": "prob", "max_boxes": 2}
    spec = registry.layout(settings, ["gradcam/layer4"], list(registry.METRICS), classes=3)
    assert spec["gradcam/layer4/deletion"][:2] == ((3, 5), ["image", "class", "step"])
    assert spec["gradcam/layer4/road_morf"][0] == (3, 2)
    assert spec["boxes"][:2] == ((2, 4), ["image", "box", "corner"])  # per image, not class
    assert spec["confidence"][:2] == ((3,), ["image", "class"])
    # The found bug: explanation_score is Average Drop's confidence, not the curves' logit.
    assert "softmax probability" in spec["gradcam/layer4/explanation_score"][2]
    assert "logit" in spec["gradcam/layer4/deletion"][2]
    with pytest.raises(TypeError, match="'deletion' is not a new"):
        registry.register(registry.METRICS["deletion"])


def map_max(ctx, batch):
    """A metric added by a test: the largest value of each stored map."""
    return {f"{key}/map_max": raw.flatten(1).amax(1) for key, raw in batch.maps.items()}


@pytest.fixture
def added_metric():
    spec = registry.register(registry.MetricSpec(
        name="map_max", compute=f"{__name__}:map_max", description="the map's maximum",
        outputs=(registry.OutputSpec("map_max", "largest value of the stored map"),),
        figures=(registry.Figure("map_max", "map_max", "Max", "higher", "{:.4f}"),)))
    yield spec
    del registry.METRICS["map_max"]


def test_adding_a_metric_is_its_function_and_its_registration(runs, tmp_path, added_metric):
    """Nothing else changes: evaluate computes it, the file holds it (described, labelled),
    the summary and the table columns show it."""
    run_dir = _copy(runs, tmp_path / "run")
    _evaluate(runs, run_dir, "evaluate.metrics=[deletion,map_max]")
    with h5py.File(run_dir / "results.h5") as f, h5py.File(run_dir / METRICS_FILE) as m:
        np.testing.assert_array_equal(m["gradcam/layer4/map_max"][:],
                                      f["gradcam/layer4"][:].max((1, 2)))
        assert m["gradcam/layer4/map_max"].attrs["description"] == (
            "largest value of the stored map")
    summary = SM.summarize_run(run_dir)[0]
    assert "map_max" in summary.figures and "Max " in summary.line()
    assert "map_max" in [o.name for o in registry.per_map_columns()]


def test_the_declarations_import_without_torch():
    code = ("import sys\nimport pipeline.metrics.registry, pipeline.store.metrics\n"
            "from pipeline.metrics.registry import per_map_columns\nper_map_columns()\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_a_metric_option_out_of_range_is_one_line():
    from pipeline.errors import ConfigError

    for bad, match in (("evaluate.steps=0", "evaluate.steps must be >= 1, got 0"),
                       ("evaluate.tolerance=-1", "evaluate.tolerance must be >= 0"),
                       ("evaluate.blur_size=4", "evaluate.blur_size odd"),
                       ("evaluate.road_percentiles=[0]", "percentages in \\(0, 100\\)")):
        with pytest.raises(ConfigError, match=match):
            E.check_settings(compose_cfg(bad).evaluate)


# -- the file ---------------------------------------------------------------------------------

def test_metrics_file_is_labelled_and_readable(runs, tmp_path):
    """xarray opens each map group with an ``image`` dimension holding the paths (no phony
    dims, no warning); the readers give arrays image-first; Average Drop is recomputed from
    the stored confidence; the boxes are stored in original-image pixels."""
    xr = pytest.importorskip("xarray")
    run_dir = _copy(runs, tmp_path / "run")
    _evaluate(runs, run_dir)
    with h5py.File(run_dir / "results.h5") as f:
        paths = list(f["images/path"].asstr()[:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_dataset(run_dir / METRICS_FILE, engine="h5netcdf", group="gradcam/layer4")
        root = xr.open_dataset(run_dir / METRICS_FILE, engine="h5netcdf")
    with ds, root:
        assert list(ds["image"].values) == paths and ds.sizes["image"] == 3
        assert not [d for d in (*ds.dims, *root.dims) if d.startswith("phony_dim")]
        assert ds["deletion"].dims == ("image", "step")
        np.testing.assert_allclose(ds["step"].values, [0, 0.25, 0.5, 0.75, 1])
        assert list(ds["randomized_layer"].values) == ["fc", "layer4.1"]
        assert root["score"].dims == ("image",) and list(root["image"].values) == paths
    arrays = SM.read_metric_arrays(run_dir)
    assert list(arrays) == ["gradcam/layer4"]
    layer = arrays["gradcam/layer4"]
    assert layer["deletion"].shape == (3, 5) and "image" not in layer
    per_image = SM.read_image_metrics(run_dir)
    y, o = per_image["confidence"], layer["explanation_score"]
    np.testing.assert_allclose(layer["drop"], np.maximum(0, y - o) / (y + 1e-7), rtol=1e-5)
    assert ((y > 0) & (y < 1)).all()  # a probability, whatever the run's score (the logit)
    boxes = per_image["boxes"]
    assert boxes.shape == (3, 2, 4) and np.isnan(boxes[[0, 2]]).all()
    np.testing.assert_array_equal(boxes[1], [[10, 12, 60, 50], [70, 20, 90, 40]])
    with pytest.raises(StoreError, match="unknown map with metrics 'gradcam/layer3'"):
        SM.read_metric_arrays(run_dir, ["gradcam/layer3"])
    summary = SM.summarize_run(run_dir)[0]
    assert summary.figures["avg_drop"] == pytest.approx(100 * layer["drop"].mean(), rel=1e-5)
    assert summary.line().startswith("gradcam/layer4 (3 images): Deletion AUC ")
    assert "Avg Drop " in summary.line() and "%" in summary.line()


def test_a_metric_dataset_deleted_from_the_file_is_named_on_read(runs, tmp_path):
    run_dir = _copy(runs, tmp_path / "run")
    _evaluate(runs, run_dir, "evaluate.metrics=[deletion,confidence]")
    shutil.copy(run_dir / METRICS_FILE, tmp_path / "whole.h5")
    with h5py.File(run_dir / METRICS_FILE, "r+") as m:
        del m["gradcam/layer4/deletion_auc"]
    with pytest.raises(StoreError, match=r"is damaged: gradcam/layer4/deletion_auc \(an output "
                                         r"of metric 'deletion'\) is missing; rerun"):
        SM.summarize_run(run_dir)
    shutil.copy(tmp_path / "whole.h5", run_dir / METRICS_FILE)
    with h5py.File(run_dir / METRICS_FILE, "r+") as m:
        del m["confidence"]
    with pytest.raises(StoreError, match=r"confidence \(an output of metric 'confidence'\)"):
        SM.read_image_metrics(run_dir)


def test_an_image_deleted_after_extraction_is_not_counted_as_evaluated(runs, tmp_path,
                                                                       caplog):
    root, base = runs
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    base = (*TINY, "data=glob", f"data.pattern={images}/*.jpg", "model.target_layers=[layer4]")
    run(compose_cfg(*base, "stage=extract"), tmp_path / "run")
    (images / "img001.jpg").unlink()
    cfg = compose_cfg(*base, *EVAL, f"run_dir={tmp_path / 'run'}",
                      "evaluate.metrics=[deletion]")
    summary = E.evaluate(cfg, tmp_path / "run")
    assert summary.evaluated == 2 and summary.failed == [str(images / "img001.jpg")]
    assert any("not evaluated: 1 images no longer load" in line and "img001.jpg" in line
               for line in summary.lines())
    with h5py.File(tmp_path / "run" / METRICS_FILE) as m:
        assert m.attrs["n_evaluated"] == 2
        assert np.isnan(m["gradcam/layer4/deletion_auc"][1])
    assert SM.summarize_run(tmp_path / "run")[0].n == 2


# -- the side file ----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_partial_file_is_rebuilt_not_reused(runs, tmp_path, damage, caplog):
    """A side file that opens but does not read back (cut short by a full disk) or is no
    HDF5 at all is rebuilt: the evaluation gives the numbers of a clean one."""
    run_dir = _copy(runs, tmp_path / "run")
    extra = ("evaluate.metrics=[deletion]", "batch_size=2")
    _evaluate(runs, run_dir, *extra)
    with h5py.File(run_dir / METRICS_FILE) as m:
        clean = m["gradcam/layer4/deletion"][:]
    os.replace(run_dir / METRICS_FILE, tmp_path / "old.h5")
    # The partial file a first batch leaves: made by the stage itself, then damaged.
    cfg = compose_cfg(*runs[1], *EVAL, f"run_dir={run_dir}", *extra)
    setup = read_setup(cfg, run_dir / "results.h5", E.torch.device("cpu"))
    settings = E._settings(cfg, setup, {})
    spec = registry.layout(settings, setup.maps, ["deletion"])
    side = SM.Partial(run_dir / PARTIAL, setup.n, settings, setup.results, spec)
    side.write(np.array([0, 1]), {"gradcam/layer4/deletion": np.full((2, 5), 42.0, "f4")})
    side.close()
    assert side.problem() == ""
    data = (run_dir / PARTIAL).read_bytes()
    (run_dir / PARTIAL).write_bytes(data[: len(data) // 2] if damage == "truncated"
                                    else b"\x89HDF\r\n" + os.urandom(len(data)))
    assert side.problem().startswith("damaged")
    with caplog.at_level(logging.WARNING):
        result = run(cfg, run_dir)
    assert result["evaluated"] == 3
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    with h5py.File(run_dir / METRICS_FILE) as m:
        np.testing.assert_array_equal(m["gradcam/layer4/deletion"][:], clean)


# -- sweeps, progress, locks ------------------------------------------------------------------

def test_evaluate_on_a_sweep_folder(runs, tmp_path, monkeypatch, caplog):
    """Every job is evaluated, holding the metrics file's lock; a rerun skips them; a job that
    cannot be evaluated fails the stage naming it, after the others ran; progress lines go
    to the log."""
    import pipeline.progress

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        _copy(runs, sweep / job)
    seen_locks = []
    original = E._BatchEvaluator.run

    def watched(self, rows, partial, workers):
        seen_locks.append(lock_is_held(self.path.with_name(METRICS_FILE)))
        return original(self, rows, partial, workers)

    class Chatty(pipeline.progress.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "every": 0.0})

    monkeypatch.setattr(E._BatchEvaluator, "run", watched)
    monkeypatch.setattr(pipeline.progress, "Progress", Chatty)
    extra = ("evaluate.metrics=[deletion]",)
    with caplog.at_level(logging.INFO):
        result = _evaluate(runs, sweep, *extra)
    assert result["evaluated"] == 6 and seen_locks == [True, True]
    assert any("evaluate 0: 3/3 img (100%)" in r.getMessage() for r in caplog.records)
    for job in ("0", "1"):
        assert SM.summarize_run(sweep / job)[0].n == 3
    assert not lock_is_held(sweep / "0" / METRICS_FILE)
    summary = E.evaluate(compose_cfg(*runs[1], *EVAL, f"evaluate.boxes={runs[0]}/boxes.csv",
                                     *extra), sweep)
    assert [j.state for j in summary.jobs] == ["skipped", "skipped"] and summary.evaluated == 0
    assert "2 already evaluated with these settings, 0 failed" in summary.lines()[0]
    # Other settings: the existing metrics are not replaced silently; the job says so.
    (sweep / "2").mkdir()
    (sweep / "2" / "results.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match=r"evaluate: 3 of 3 jobs failed: 0 \(.*already holds "
                                         r"metrics.*\); 1 \(.*\); 2 \(cannot open"):
        _evaluate(runs, sweep, "evaluate.metrics=[deletion]", "evaluate.steps=2")


def test_evaluate_on_a_sweep_through_the_command_line(runs, tmp_path):
    """Every job is tried; the table ends the log; exit 2 with one line naming the job that
    failed (exit 0 when none does: the call above returns)."""
    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        _copy(runs, sweep / job)
    (sweep / "1" / "results.h5").write_bytes(b"broken")
    args = [sys.executable, str(ROOT / "run.py"), *runs[1], *EVAL, f"run_dir={sweep}",
            "evaluate.metrics=[deletion]"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "2 jobs, 1 evaluated, 0 already evaluated with these settings, 1 failed" in out
    assert "gradcam/layer4 (3 images): Deletion AUC" in out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()][-1:]
    assert errors[0].startswith("error: evaluate: 1 of 2 jobs failed: 1 (cannot open")
    assert (sweep / "0" / METRICS_FILE).exists()  # the good job was evaluated all the same


# -- full disks -------------------------------------------------------------------------------



def _fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up to ``leave`` bytes free."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while (free := shutil.disk_usage(folder).free) > leave:
            os.write(fd, b"\0" * min(4096, free - leave))
    except OSError:
        pass  # full
    finally:
        os.close(fd)
    return filler


def _cli(runs, run_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``run.py stage=evaluate`` logging to the terminal only (Hydra's own files in the
    full run folder are another matter)."""
    args = [sys.executable, str(ROOT / "run.py"), *runs[1], *EVAL, f"run_dir={run_dir}",
            "evaluate.metrics=[deletion,confidence]", "hydra.output_subdir=null",
            "hydra/job_logging=stdout"]
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("leave_kb", [0, 60])
def test_evaluate_on_a_full_disk_is_one_line_and_the_rerun_succeeds(runs, tmp_path, tmpfs,
                                                                    leave_kb):
    """0 bytes free: the lock file's write fails; 60 KB: the metrics do not fit. Either way
    one line, exit 2, no traceback or logging error; after freeing space the same command
    finishes."""
    disk = tmpfs(1024)
    run_dir = _copy(runs, disk / "run")
    filler = _fill(disk, leave_kb * 1024)
    proc = _cli(runs, run_dir, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: not enough disk space for ")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Logging error" not in proc.stdout + proc.stderr
    assert not (run_dir / METRICS_FILE).exists()
    filler.unlink()
    _evaluate(runs, run_dir, "evaluate.metrics=[deletion,confidence]")
    assert SM.summarize_run(run_dir)[0].n == 3


@pytest.mark.parametrize("leave_kb", [20, 60])
def test_hdf5_running_out_of_space_is_one_line_and_keeps_nothing_damaged(runs, tmp_path, tmpfs,
                                                                         monkeypatch, leave_kb):
    """Past the space check (as when another process fills the disk meanwhile): HDF5 fails
    creating the side file (20 KB free) or the metrics file (60 KB): one StoreError, not
    HDF5's RuntimeErrors; the rerun with space rebuilds or reuses the side file as it
    checks out, and gives the numbers of an evaluation on a roomy disk."""
    clean = _copy(runs, tmp_path / "clean")
    _evaluate(runs, clean, "evaluate.metrics=[deletion,confidence]")
    disk = tmpfs(1024)
    run_dir = _copy(runs, disk / "run")
    filler = _fill(disk, leave_kb * 1024)
    monkeypatch.setattr(SM, "_room", lambda path, need: None)
    with pytest.raises(StoreError, match=r"^not enough disk space for .*(metrics-partial|metri"
                                         r"cs)\.h5 .*free space or use another run_dir"):
        _evaluate(runs, run_dir, "evaluate.metrics=[deletion,confidence]")
    assert not (run_dir / METRICS_FILE).exists()
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    filler.unlink()
    _evaluate(runs, run_dir, "evaluate.metrics=[deletion,confidence]")
    with h5py.File(run_dir / METRICS_FILE) as a, h5py.File(clean / METRICS_FILE) as b:
        for key in ("gradcam/layer4/deletion", "gradcam/layer4/drop", "score"):
            np.testing.assert_array_equal(a[key][:], b[key][:], err_msg=key)
        assert json.loads(a.attrs["settings"]) == json.loads(b.attrs["settings"])
