"""Report: the HTML pages of a run and of a sweep, opened in a real headless Chromium (no
console errors, every picture there, a screenshot that is not blank)."""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import yaml
from conftest import ROOT, TINY, compose_cfg, write_images

from pipeline.cli import run
from pipeline.errors import CamsweepError, StoreError
from pipeline.report import report, report_lock
from pipeline.report.gallery import Ranking, choose
from pipeline.report.plots import is_flat

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome")) if p), None)
NO_CHROMIUM = ("CHROMIUM IS NOT INSTALLED: the report pages were not checked in a browser. "
               "Install it (Debian/Ubuntu: apt-get install -y chromium) to run this test.")
EVALUATE = ("evaluate.steps=4", "evaluate.road_percentiles=[30,70]",
            "evaluate.sanity_max_steps=4")


pytestmark = pytest.mark.usefixtures("one_thread")


class Links(HTMLParser):
    """Every src/href of a page, and the classes of its table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.row_classes: list[str] = []
        self.images = 0
        self.img_attrs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(str(a[key]))
        self.images += tag == "img"
        if tag == "img":
            self.img_attrs.append(a)
        if tag == "tr":
            self.row_classes.append(a.get("class") or "")


def check_links(index: Path) -> Links:
    parser = Links()
    parser.feed(index.read_text(encoding="utf-8"))
    for link in parser.links:
        if link.startswith("data:"):
            continue
        assert "://" not in link and not link.startswith("/"), f"non-relative link {link}"
        assert (index.parent / link).is_file(), f"{link} referenced but missing"
    return parser


def browse(index: Path, tmp: Path) -> tuple[list[str], np.ndarray]:
    """Open the page in headless Chromium: its console lines and a 1280 x 2000 screenshot.
    ``#check`` makes the page load its lazy pictures at once, so all of them are checked."""
    if CHROMIUM is None:
        if os.environ.get("CI"):  # .ci/run installs chromium: missing there is a failure
            pytest.fail(NO_CHROMIUM)
        pytest.skip(NO_CHROMIUM)
    shot = tmp / f"{index.parent.parent.name}-screenshot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
           "--window-size=1280,2000", index.resolve().as_uri() + "#check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return console, cv2.imread(str(shot), cv2.IMREAD_COLOR)


def assert_clean(console: list[str], images: int) -> None:
    """Only the page's own all-clear line: no uncaught error, no missing picture."""
    expected = f"camsweep-report: {images} of {images} pictures loaded"
    assert any(expected in line for line in console), console
    noise = [line for line in console if expected not in line]
    assert not noise, noise


def assert_not_blank(shot: np.ndarray) -> None:
    gray = cv2.cvtColor(shot, cv2.COLOR_BGR2GRAY).astype(np.float32)
    assert gray.std() > 25, gray.std()  # a blank or one-colour page has std near 0
    colourful = np.abs(shot.astype(int) - shot.mean(2, keepdims=True)).max(2) > 40
    assert colourful.mean() > 0.02  # overlays and plots, not only text


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    """Grad-CAM at two layers of a random resnet18, evaluated (boxes for two images), with
    one undecodable file."""
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    write_images(images, 4, size=(150, 200))
    (images / "zz-broken.jpg").write_bytes(b"")
    (root / "boxes.csv").write_text("file,xmin,ymin,xmax,ymax\nimg000.jpg,40,30,150,120\n"
                                    "img002.jpg,0,0,90,80\n")
    base = (*TINY, "data=glob", f"data.pattern={images}/*.jpg",
            "model.target_layers=[layer3,layer4]")
    run_dir = root / "run"
    run(compose_cfg(*base, "stage=extract"), run_dir)
    run(compose_cfg(*base, "stage=evaluate", f"run_dir={run_dir}", *EVALUATE,
                    f"evaluate.boxes={root}/boxes.csv"), run_dir)
    return run_dir


def test_run_report_in_a_browser(evaluated_run, tmp_path):
    index = report(evaluated_run, compose_cfg(*TINY))
    assert index == evaluated_run / "report" / "index.html"
    text = index.read_text()
    parser = check_links(index)
    # Gallery: 4 images x 2 layers, drawn from the stored arrays; two plots.
    assert parser.images == 8 + 2
    assert not (evaluated_run / "pictures").exists()  # the report writes only report/
    assert "plots/faithfulness.svg" in text and "plots/sanity.svg" in text
    assert "failed" in parser.row_classes  # the broken file, marked
    assert "zz-broken.jpg" in text and "Deletion AUC" in text
    assert f"python run.py stage=explore run_dir={evaluated_run}" in text
    assert "all 4 images" in text and "sorted worst to best by deletion AUC" in text
    console, shot = browse(index, tmp_path)
    assert_clean(console, parser.images)
    assert_not_blank(shot)

    # Rebuilt from scratch: a stale file of an earlier report does not survive.
    (evaluated_run / "report" / "img" / "stale.jpg").write_bytes(b"x")
    (evaluated_run / ".report.tmp-99999-0badc0de").mkdir()  # left by a killed report
    report(evaluated_run)
    assert not (evaluated_run / "report" / "img" / "stale.jpg").exists()
    assert not list(evaluated_run.glob(".report.*-*"))  # no temporary left


def test_gallery_thumbnails_are_small_lazy_jpegs_without_a_banner(evaluated_run):
    """The page stays small however many images it shows: separate JPEG files, loaded
    when scrolled to, and no title burned into them (the page shows that text)."""
    index = report(evaluated_run)
    parser = check_links(index)
    gallery = [a for a in parser.img_attrs if str(a["src"]).startswith("img/")]
    assert len(gallery) == 8
    assert all(a["loading"] == "lazy" and str(a["src"]).endswith(".jpg") for a in gallery)
    assert not any(str(a["src"]).startswith("data:") for a in parser.img_attrs)
    for a in gallery:
        thumb = cv2.imread(str(index.parent / str(a["src"])), cv2.IMREAD_COLOR)
        # The photos are 150 x 200: a banner would make the picture taller than that.
        assert thumb.shape[:2] == (150, 200)
        assert (int(a["height"] or 0), int(a["width"] or 0)) == (150, 200)
        assert (index.parent / str(a["src"])).stat().st_size < 40_000
    assert index.stat().st_size < 60_000


def test_gallery_shows_the_worst_the_best_and_each_class(evaluated_run, tmp_path):
    """With more done images than report.max_images, the gallery ranks by the first
    metric evaluate stored instead of showing the first rows in file order."""
    with h5py.File(evaluated_run / "metrics.h5", "r") as m:
        auc = m["gradcam/layer3/deletion_auc"][:]
    ranked = [int(r) for r in np.argsort(-np.nan_to_num(auc, nan=-np.inf))
              if np.isfinite(auc[r])]  # worst (highest deletion AUC) first
    text = report(evaluated_run, compose_cfg(*TINY, "report.max_images=3")).read_text()
    gallery = text[text.index("<h2>Gallery"):]
    heads = re.findall(r"<h3>(.*?)<small>(.*?)</small></h3>", gallery)
    titles = [t for t, _ in heads]
    assert titles[:2] == ["worst by deletion AUC (gradcam/layer3)",
                          "best by deletion AUC (gradcam/layer3)"]
    assert len(titles) == 3 and titles[2].startswith("per class · predicted ")
    shown = [int(r) for r in re.findall(r'row (\d+)</span>', gallery)]
    assert shown[:2] == [ranked[0], ranked[-1]] and len(shown) == 3
    assert len(set(shown)) == 3
    # Under each image, the value it was ranked by stands out (layer3's deletion AUC).
    assert re.findall(r'class="chip rank">(\w+) ', gallery) == ["del"] * 3


def test_gallery_choice_by_numbers():
    values = np.array([0.5, 0.9, np.nan, 0.1, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4])
    classes = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, -1])
    done = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    lower_better = Ranking("deletion AUC", values, "down")
    sections = choose(done, lower_better, classes, str, budget=7, per_class=2)
    assert [(s.title, s.rows) for s in sections] == [
        ("worst by deletion AUC", [1, 7]),  # highest AUC first
        ("best by deletion AUC", [3, 6]),
        ("per class · label 0", [0, 2]),  # classes with most images left first; the
        ("per class · label 1", [4]),  # row without a value after the others; budget spent
    ]
    # All done images fit: one section, worst first, the row without a value last.
    (everything,) = choose(done[:4], lower_better, classes, str, budget=7)
    assert everything.rows == [1, 0, 3, 2] and everything.title == "all 4 images"
    # One class left: it gets the rest of the budget, spread from worst to best.
    one = np.where(classes >= 0, 0, -1)
    assert choose(done, lower_better, one, str, budget=7)[2].rows == [4, 0, 5]
    higher_better = Ranking("top-1 probability", values, "up")
    assert choose(done, higher_better, classes, str, budget=3)[0].rows == [3]
    assert choose(done, lower_better, classes, str, budget=0) == []


def test_a_deleted_metric_dataset_is_shown_as_missing(evaluated_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(evaluated_run, run_dir)
    with h5py.File(run_dir / "metrics.h5", "r+") as m:
        del m["gradcam/layer4/deletion_auc"]
    text = report(run_dir).read_text()
    table = _metrics_table(text)
    assert table.count(">missing</td>") == 1  # layer4's deletion AUC; layer3's is shown
    assert "missing from metrics.h5: gradcam/layer4/deletion_auc" in text
    assert f"stage=evaluate run_dir={run_dir} evaluate.overwrite=true" in text


def test_a_deleted_metric_dataset_of_a_sweep_job_is_shown_as_missing(sweep_dir, tmp_path):
    sweep = tmp_path / "multirun"
    shutil.copytree(sweep_dir, sweep)
    with h5py.File(sweep / "0" / "metrics.h5", "r+") as m:
        del m["gradcam/layer3/insertion_auc"]
    text = report(sweep).read_text()
    assert "job 0: missing from 0/metrics.h5: gradcam/layer3/insertion_auc" in text
    table = text[text.index("<h2>Metrics per job"):]
    assert table.count(">missing</td>") == 1


def test_run_report_without_metrics_says_how_to_get_them(tmp_path, image_dir):
    run_dir = tmp_path / "run"
    run(compose_cfg(*TINY, "stage=all", "data=glob", f"data.pattern={image_dir}/*.jpg",
                    "method=saliency"), run_dir)
    index = report(run_dir)
    text = index.read_text()
    assert "No metrics yet" in text and "stage=evaluate" in text
    check_links(index)


def test_topk_run_report_shows_each_class(tmp_path, image_dir):
    run_dir = tmp_path / "top"
    common = (*TINY, "data=glob", f"data.pattern={image_dir}/*.jpg", "data.limit=2")
    run(compose_cfg(*common, "stage=extract", "target=topk", "target.k=2"), run_dir)
    run(compose_cfg(*common, "stage=evaluate", f"run_dir={run_dir}", "evaluate.steps=2",
                    "evaluate.metrics=[deletion,confidence]"), run_dir)
    index = report(run_dir)
    parser = check_links(index)
    assert parser.images == 2 * 2 + 1  # 2 images x 2 classes, and the curves
    text = index.read_text()
    assert "top-1 " in text and "top-2 " in text and "del " in text


def _job(sweep: Path, job: int, overrides: list[str]) -> Path:
    folder = sweep / str(job)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return folder


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A multirun folder as Hydra leaves it: resnet18 at layer3 and layer4, resnet34 at
    layer4 (all evaluated), and a job that failed on a misspelled layer."""
    root = tmp_path_factory.mktemp("sweep")
    images = root / "images"
    write_images(images, 3, size=(120, 160))
    sweep = root / "multirun"
    jobs = [("resnet18", "layer3"), ("resnet18", "layer4"), ("resnet34", "layer4"),
            ("resnet18", "layer9")]
    for job, (model, layer) in enumerate(jobs):
        overrides = [f"model={model}", f"model.target_layers=[{layer}]"]
        folder = _job(sweep, job, overrides)
        base = (*TINY, *overrides, "data=glob", f"data.pattern={images}/*.jpg")
        try:
            run(compose_cfg(*base, "stage=extract"), folder)
        except CamsweepError as e:  # what pipeline.cli.main records for a failed job
            (folder / "camsweep.json").write_text(json.dumps({"status": "failed",
                                                              "error": str(e)}))
            continue
        run(compose_cfg(*base, "stage=evaluate", f"run_dir={folder}",
                        "evaluate.metrics=[deletion,insertion,confidence]",
                        "evaluate.steps=4"), folder)
    report(sweep / "1")  # one job has its own report, linked from the sweep's
    return sweep


def test_sweep_report_in_a_browser(sweep_dir, tmp_path):
    index = report(sweep_dir)
    assert index == sweep_dir / "report" / "index.html"
    text = index.read_text()
    parser = check_links(index)
    assert (sweep_dir / "report" / "plots" / "vs_layer.svg").is_file()
    assert (sweep_dir / "report" / "plots" / "vs_model.svg").is_file()
    assert parser.images == 2
    assert parser.row_classes.count("failed") == 1
    assert "unknown layer &#39;layer9&#39;" in text and "FAILED" in text
    assert "../1/report/index.html" in parser.links
    # resnet18's mean top-1 prob and target score do not depend on the layer: listed with
    # their values, not drawn as flat lines; the metrics, which do, are drawn.
    assert ("<li>Mean top-1 prob: the same for every layer · <b>resnet18 gradcam "
            in text)
    assert "<li>Mean target score: the same for every layer" in text
    assert "<li>Deletion AUC" not in text
    panels = (sweep_dir / "report" / "plots" / "vs_layer.svg").read_text().count('id="axes_')
    assert panels == 3  # deletion AUC, insertion AUC, avg drop (increase: 0.0 in every job)
    assert "stage=explore run_dir=" in text
    console, shot = browse(index, tmp_path)
    assert_clean(console, parser.images)
    assert_not_blank(shot)


def test_flat_means_flat_within_each_line():
    def points(values: dict[tuple[str, str], float]) -> list[dict[str, object]]:
        return [{"model": m, "method": "gradcam", "layer": layer, "value": v}
                for (m, layer), v in values.items()]

    series = ("model", "method")
    # Two models, each the same at both layers: flat against the layer, not the model.
    two = points({("a", "l3"): 0.5, ("a", "l4"): 0.5, ("b", "l3"): 0.7, ("b", "l4"): 0.7})
    assert is_flat(two, "layer", series) and not is_flat(two, "model", ("layer", "method"))
    assert is_flat(points({("a", "l3"): 0.5, ("a", "l4"): 0.5 + 1e-9}), "layer", series)
    assert not is_flat(points({("a", "l3"): 0.5, ("a", "l4"): 0.501}), "layer", series)
    # No line with two points: flat only if every value is the same.
    assert not is_flat(points({("a", "l3"): 0.5, ("b", "l4"): 0.7}), "layer", series)
    assert is_flat(points({("a", "l3"): 0.5, ("b", "l4"): 0.5}), "layer", series)


def _report_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "stage=report", f"run_dir={run_dir}"]


@pytest.mark.slow
def test_two_reports_at_once_never_crash(evaluated_run, tmp_path):
    """Two ``stage=report`` on one run at the same moment: one writes, the other waits for
    it and writes again; both succeed and the page is whole."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(_report_cmd(evaluated_run), cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("Traceback" not in out for out in outputs), outputs
    parser = check_links(evaluated_run / "report" / "index.html")
    assert parser.images == 8 + 2
    assert not list(evaluated_run.glob(".report.*-*"))  # no temporary left behind


def test_a_report_waits_for_the_one_being_written(evaluated_run, tmp_path):
    """While one report holds the lock, a second says so in one line and waits; it writes
    its page once the first is done."""
    code = ("import logging, sys\nlogging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            f"from pipeline.report import report\nprint(report({str(evaluated_run)!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with report_lock(evaluated_run):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = ""
        while "waiting for it" not in seen:  # its own words, read as they come
            ready, _, _ = select.select([proc.stderr], [], [], 120)
            line = proc.stderr.readline() if ready else ""
            assert line, f"no word from the second report: {seen}"
            seen += line
        assert proc.poll() is None  # still waiting: it did not write under our lock
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert out.strip() == str(evaluated_run / "report" / "index.html")
    assert f", writing the report) is writing the report in {evaluated_run}; waiting" in seen


@pytest.mark.slow
def test_report_stage_through_run_py(sweep_dir, tmp_path):
    """``python run.py stage=report run_dir=<multirun>``, as a user types it."""
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "stage=report",
                           f"run_dir={sweep_dir}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report -> {sweep_dir}/report/index.html" in proc.stdout + proc.stderr


def test_report_refuses_a_folder_that_is_neither(tmp_path):
    with pytest.raises(StoreError, match="neither a run"):
        report(tmp_path)


def test_render_and_report_never_import_torch():
    """The reading stages run where torch is not installed (or too heavy to load)."""
    code = ("import sys\nimport pipeline.render, pipeline.report, pipeline.pictures, "
            "pipeline.images, pipeline.store.metrics, pipeline.table\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_names_from_files_are_escaped_in_the_page(tmp_path):
    """File names are data: markup in them shows as text, it does not become markup."""
    folder = tmp_path / "photos"
    (hostile,) = write_images(folder, 1)
    hostile = hostile.rename(folder / "<b onmouseover=alert(1)>cat.jpg")
    (folder / "<script>alert(2)<!--.jpg").write_bytes(b"")  # fails to decode: listed
    run_dir = tmp_path / "run"
    run(compose_cfg(*TINY, "stage=extract", "data=glob", f"data.pattern={folder}/*.jpg"),
        run_dir)
    index = report(run_dir)
    text = index.read_text()
    assert "&lt;b onmouseover=alert(1)&gt;cat.jpg" in text
    assert "&lt;script&gt;alert(2)&lt;!--.jpg" in text
    assert "<b onmouseover" not in text and "<script>alert" not in text
    parser = check_links(index)
    assert parser.images == 1 and parser.row_classes.count("failed") == 1


def _metrics_table(text: str) -> str:
    return text[text.index("<h2>Metrics"):text.index("</table>", text.index("<h2>Metrics"))]


def test_report_reads_metrics_stored_inside_older_results_files(evaluated_run, tmp_path):
    """Before metrics.h5, evaluate wrote them to /metrics inside results.h5: such a run's
    report shows the same numbers (read only)."""
    current = _metrics_table(report(evaluated_run).read_text())
    old = tmp_path / "run"
    shutil.copytree(evaluated_run, old)
    with h5py.File(old / "metrics.h5", "r") as m, h5py.File(old / "results.h5", "r+") as f:
        g = f.create_group("metrics")
        for name in m:
            m.copy(m[name], g, name=name)
        g.attrs.update({k: v for k, v in m.attrs.items() if not k.startswith(("format",
                                                                              "results_"))})
    (old / "metrics.h5").unlink()
    legacy = _metrics_table(report(old).read_text())
    assert "Deletion AUC" in legacy and "gradcam/layer4" in legacy
    assert legacy == current


class Terminal(io.StringIO):
    """What a terminal's stderr looks like to the progress bar."""

    def isatty(self) -> bool:
        return True


def test_report_shows_progress_on_a_terminal(evaluated_run, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    report(evaluated_run)
    assert re.search(r"report thumbnails: 100%.*4/4", terminal.getvalue()), terminal.getvalue()
