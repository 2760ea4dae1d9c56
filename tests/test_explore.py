"""The explorer over HTTP (Starlette's TestClient): the table API against the files
themselves, filters and presets, overlays equal to render's, the detail view, hostile
requests, read-only serving, damaged and unfinished runs, a sweep, the command line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import httpx
import numpy as np
import pytest
from conftest import ROOT, TINY, compose_cfg, write_images
from explore_runs import HOSTILE, labelled_run, small_sweep
from starlette.testclient import TestClient

from pipeline.cli import run
from pipeline.errors import StoreError
from pipeline.explore import Source, create_app
from pipeline.locks import writer_lock
from pipeline.pictures import overlay_cam
from pipeline.render import load_photo

pytestmark = pytest.mark.usefixtures("one_thread")
COLUMNS = {"row", "path", "file", "label", "label_name", "pred", "pred_name", "correct",
           "target", "score", "status", "error", "method", "layer", "map", "deletion_auc",
           "insertion_auc", "drop", "entropy", "peak_y", "peak_x", "top10_mass"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return labelled_run(tmp_path_factory.mktemp("explore"))


def client(path: Path) -> tuple[Source, TestClient]:
    src = Source(path)
    return src, TestClient(create_app(src), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def api(run_dir):
    src, c = client(run_dir)
    yield c
    src.close()


def files(run_dir: Path) -> dict[str, np.ndarray]:
    with h5py.File(run_dir / "results.h5", "r") as f, \
            h5py.File(run_dir / "metrics.h5", "r") as m:
        return {"status": f["images/status"][:], "label": f["images/label"][:],
                "pred": f["predictions/class"][:, 0], "path": f["images/path"].asstr()[:],
                "deletion": m["gradcam/layer4/deletion"][:],
                "deletion_auc": m["gradcam/layer4/deletion_auc"][:],
                "topk": f["predictions/class"][:], "prob": f["predictions/prob"][:]}


def rows(api: TestClient, **params) -> tuple[int, list[dict]]:
    r = api.get("/api/images", params={"limit": 500, **params})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["total"], body["rows"]


def test_images_are_the_table_sorted_and_paged(api, run_dir):
    f = files(run_dir)
    total, got = rows(api)
    assert total == 6 * 2 and len(got) == 12  # 6 images (one failed) x 2 layers
    assert set(got[0]) >= COLUMNS
    assert {r["map"] for r in got} == {"gradcam/layer3", "gradcam/layer4"}
    # Sorted by a metric, worst (highest deletion AUC) first; the failed row (NaN) last.
    total, got = rows(api, map="gradcam/layer4", sort="deletion_auc", desc=1)
    auc = f["deletion_auc"]
    done = np.flatnonzero(f["status"] == 1)
    failed = int(np.flatnonzero(f["status"] == 2)[0])
    assert [r["row"] for r in got] == [*done[np.argsort(-auc[done], kind="stable")], failed]
    np.testing.assert_allclose([r["deletion_auc"] for r in got[:5]],
                               np.sort(auc[done])[::-1], rtol=1e-6)
    assert got[-1]["deletion_auc"] is None and got[-1]["status"] == "failed"
    # Paging: any window is the same slice of the whole.
    _, page = rows(api, map="gradcam/layer4", sort="deletion_auc", desc=1, limit=2, offset=2)
    assert page == got[2:4]
    assert rows(api, offset=100) == (12, [])
    # Columns of the image itself.
    first = next(r for r in got if r["file"] == HOSTILE)
    row = first["row"]
    assert first["path"] == f["path"][row]
    assert first["label"] == f["label"][row] and first["pred"] == f["pred"][row]
    assert first["correct"] == 1.0 and first["label_name"] == first["pred_name"] != ""


def test_filters_search_and_presets(api, run_dir):
    f = files(run_dir)
    right = set(np.flatnonzero((f["pred"] == f["label"]) & (f["status"] == 1)))
    wrong = set(np.flatnonzero((f["pred"] != f["label"]) & (f["status"] == 1)))
    assert len(right) == 2 and len(wrong) == 3
    one = {"map": "gradcam/layer4"}
    assert {r["row"] for r in rows(api, correct=1, **one)[1]} == right
    assert {r["row"] for r in rows(api, correct="false", **one)[1]} == wrong
    failed = list(np.flatnonzero(f["status"] == 2))
    assert [r["row"] for r in rows(api, status="failed", **one)[1]] == failed
    assert [r["row"] for r in rows(api, failed=1, **one)[1]] == failed
    assert rows(api, failed=0, **one)[0] == 5
    # Search: a literal, case-insensitive substring of the file or a class name.
    assert {r["file"] for r in rows(api, q="IMG00", **one)[1]} == {
        "img000.jpg", "img001.jpg", "img002.jpg", "img003.jpg"}
    assert rows(api, q="onmouseover=alert(1)", **one)[0] == 1
    assert rows(api, q=".*", **one)[0] == 0  # no pattern language
    _, all_rows = rows(api, **one)
    name = all_rows[1]["label_name"]
    by_name = {r["row"] for r in all_rows if name in (r["label_name"], r["pred_name"])}
    assert {r["row"] for r in rows(api, q=name.upper(), **one)[1]} == by_name
    assert {r["row"] for r in rows(api, **{"class": name}, **one)[1]} == by_name
    label = int(f["label"][1])
    assert {r["row"] for r in rows(api, label=label, **one)[1]} == set(
        np.flatnonzero(f["label"] == label))
    # Metric ranges: inclusive bounds, NaN never inside.
    auc = f["deletion_auc"]
    lo, hi = np.sort(auc[np.isfinite(auc)])[[1, 3]]
    got = {r["row"] for r in rows(api, min_deletion_auc=repr(float(lo)),
                                  max_deletion_auc=repr(float(hi)), **one)[1]}
    assert got == set(np.flatnonzero((auc >= lo) & (auc <= hi)))
    # Presets: worst 2 by deletion AUC; misclassified; one per class.
    total, worst = rows(api, sort="deletion_auc", desc=1, top=2, status="done", **one)
    assert total == 2 and [r["row"] for r in worst] == list(np.argsort(-np.nan_to_num(
        auc, nan=-np.inf))[:2])
    total, per = rows(api, per_class=1, **one)
    assert total == len(set(f["label"])) and len({r["label"] for r in per}) == total


def test_overlay_is_the_picture_render_draws(api, run_dir):
    with h5py.File(run_dir / "results.h5", "r") as f:
        cam, size, box = f["gradcam/layer4"][2], f["images/size"][2], f["images/box"][2]
        path = f["images/path"].asstr()[2]
    assert not np.allclose(box, [0, 0, *size])  # a center crop: the box matters
    photo, pbox = load_photo(path, size, box)
    expected = overlay_cam(photo, cam, pbox, image_weight=0.5)
    r = api.get("/api/overlay", params={"row": 2, "map": "gradcam/layer4", "alpha": 0.5,
                                        "cmap": "jet", "fmt": "png", "size": 2048})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = cv2.cvtColor(cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR),
                       cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(got, expected)
    # Opacity and colormap change the picture; the photo outside the box stays as it is.
    other = api.get("/api/overlay", params={"row": 2, "map": "gradcam/layer4", "alpha": 0.9,
                                            "cmap": "viridis", "fmt": "png", "size": 2048})
    pic = cv2.imdecode(np.frombuffer(other.content, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert pic.shape == got.shape and not np.array_equal(pic, got)
    y0, x0, y1, x1 = (int(round(v)) for v in pbox)
    np.testing.assert_array_equal(pic[:, :x0], photo[:, :x0])
    # Thumbnails: JPEG at the size asked for.
    thumb = api.get("/api/overlay", params={"row": 2, "map": "gradcam/layer3", "size": 64})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(cv2.imdecode(np.frombuffer(thumb.content, np.uint8), 1).shape[:2]) == 64
    photo_r = api.get("/api/photo", params={"row": 2, "crop": 1, "size": 2048})
    crop = cv2.imdecode(np.frombuffer(photo_r.content, np.uint8), 1)
    assert crop.shape[:2] == (y1 - y0, x1 - x0)


def test_detail_has_every_map_its_metrics_topk_and_curves(api, run_dir):
    f = files(run_dir)
    d = api.get("/api/image", params={"row": 1}).json()
    assert d["row"] == 1 and d["path"] == f["path"][1] and d["status"] == "done"
    assert [t["class"] for t in d["topk"]] == list(f["topk"][1])
    np.testing.assert_allclose([t["prob"] for t in d["topk"]], f["prob"][1], rtol=1e-6)
    assert [v["map"] for v in d["views"]] == ["gradcam/layer3", "gradcam/layer4"]
    v4 = d["views"][1]
    assert v4["values"]["deletion_auc"] == pytest.approx(float(f["deletion_auc"][1]))
    curves = {c["name"]: c for c in v4["curves"]}
    assert set(curves) == {"deletion", "insertion"}
    np.testing.assert_allclose(curves["deletion"]["y"], f["deletion"][1], rtol=1e-6)
    assert curves["deletion"]["x"] == [0, 0.25, 0.5, 0.75, 1]
    row = int(np.flatnonzero(f["status"] == 2)[0])
    failed = api.get("/api/image", params={"row": row}).json()  # details of a failed image
    assert failed["status"] == "failed" and failed["topk"] == [] and failed["error"]


HOSTILE_REQUESTS = [
    ("/api/overlay", {"row": "../../etc/passwd", "map": "gradcam/layer4"}, 400, "integer"),
    ("/api/overlay", {"row": "-1", "map": "gradcam/layer4"}, 400, "out of range"),
    ("/api/overlay", {"row": "6", "map": "gradcam/layer4"}, 400, "out of range"),
    ("/api/overlay", {"row": "1e3", "map": "gradcam/layer4"}, 400, "integer"),
    ("/api/overlay", {"row": "9" * 5000, "map": "gradcam/layer4"}, 400, "integer"),
    ("/api/overlay", {"map": "gradcam/layer4"}, 400, "row is required"),
    ("/api/overlay", {"row": "1", "map": "../results.h5"}, 404, "unknown map"),
    ("/api/overlay", {"row": "1", "map": "/etc/passwd"}, 404, "unknown map"),
    ("/api/overlay", {"row": "1", "map": "images/path"}, 404, "unknown map"),
    ("/api/overlay", {"row": "1", "job": "../.."}, 400, "not a sweep"),
    ("/api/overlay", {"row": "1", "alpha": "2"}, 400, "alpha"),
    ("/api/overlay", {"row": "1", "alpha": "nan"}, 400, "alpha"),
    ("/api/overlay", {"row": "1", "cmap": "../jet"}, 400, "cmap"),
    ("/api/overlay", {"row": "1", "size": str(10 ** 9)}, 400, "size"),
    ("/api/overlay", {"row": "1", "fmt": "svg"}, 400, "fmt"),
    ("/api/overlay", {"row": "FAILED", "map": "gradcam/layer4"}, 409, "failed: "),
    ("/api/photo", {"row": "FAILED"}, 409, "failed"),
    ("/api/image", {"row": "x"}, 400, "integer"),
    ("/api/images", {"limit": "-1"}, 400, "limit"),
    ("/api/images", {"limit": "0"}, 400, "limit"),
    ("/api/images", {"limit": str(10 ** 12)}, 400, "limit"),
    ("/api/images", {"limit": "ten"}, 400, "limit"),
    ("/api/images", {"offset": "-5"}, 400, "offset"),
    ("/api/images", {"sort": "'; DROP TABLE images;--"}, 400, "unknown sort column"),
    ("/api/images", {"sort": "__class__"}, 400, "unknown sort column"),
    ("/api/images", {"desc": "maybe"}, 400, "desc"),
    ("/api/images", {"q": "x" * 1000}, 400, "at most"),
    ("/api/images", {"status": "<script>"}, 400, "unknown status"),
    ("/api/images", {"min_deletion_auc": "abc"}, 400, "not a number"),
    ("/api/images", {"min_path": "1"}, 400, "unknown parameter"),
    ("/api/images", {"map": "gradcam/../../x"}, 400, "unknown map"),
    ("/api/images", {"top": "0"}, 400, "top"),
    ("/api/images", {"per_class": "-3"}, 400, "per_class"),
    ("/api/images", {"__proto__": "1"}, 400, "unknown parameter"),
]


@pytest.mark.parametrize(("path", "params", "status", "reason"), HOSTILE_REQUESTS)
def test_hostile_requests_get_a_reason(api, run_dir, path, params, status, reason):
    failed = str(np.flatnonzero(files(run_dir)["status"] == 2)[0])
    r = api.get(path, params={k: failed if v == "FAILED" else v for k, v in params.items()})
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]


def test_no_request_reaches_the_filesystem(api, run_dir):
    for url in ("/static/../results.h5", "/static/%2e%2e/%2e%2e/results.py",
                "/static/..%2f..%2fsource.py", "/../../etc/passwd", "/api/../etc/passwd",
                f"/{run_dir}/results.h5"):
        r = api.get(url)
        assert r.status_code == 404 and b"camsweep" not in r.content, url
    assert api.post("/api/images").status_code == 405
    assert api.get("/", headers={"host": "evil.example"}).status_code == 400  # rebinding
    page = api.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert api.get("/static/explore.js").status_code == 200


def test_markup_in_names_stays_text(run_dir, tmp_path):
    hostile_dir = tmp_path / "run<script>alert(1)</script>"
    shutil.copytree(run_dir, hostile_dir)
    src, c = client(hostile_dir)
    try:
        page = c.get("/").text
        assert "run&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<script>alert" not in page
        names = [r["file"] for r in c.get("/api/images").json()["rows"]]
        assert HOSTILE in names  # JSON carries the name as a string; the page sets textContent
    finally:
        src.close()


def snapshot(*folders: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def test_serving_never_writes(run_dir):
    photos = run_dir.parent / "val"
    before = snapshot(run_dir, photos)
    src, c = client(run_dir)
    try:
        for row in range(6):
            c.get("/api/image", params={"row": row})
            for m in ("gradcam/layer3", "gradcam/layer4"):
                c.get("/api/overlay", params={"row": row, "map": m, "cmap": "magma"})
            c.get("/api/photo", params={"row": row})
        c.get("/api/images", params={"sort": "entropy", "desc": 1})
        # Drawn once per (row, map, look), kept in a bounded cache: 5 done rows x 2 maps.
        assert len(src.overlays.items) == 10
        c.get("/api/overlay", params={"row": 1, "map": "gradcam/layer4", "cmap": "magma"})
        assert len(src.overlays.items) == 10
    finally:
        src.close()
    assert snapshot(run_dir, photos) == before


def test_damaged_stale_and_unfinished_runs_say_so(run_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    data = (broken / "results.h5").read_bytes()
    (broken / "results.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="results.h5") as caught:
        run(compose_cfg("stage=explore", f"run_dir={broken}"), broken)  # the stage itself
    assert "\n" not in str(caught.value)
    with pytest.raises(StoreError, match="no run or sweep"):
        Source(tmp_path / "nothing")
    # Metrics of an earlier extraction: browse the maps, say why the metrics are missing.
    stale = tmp_path / "stale"
    shutil.copytree(run_dir, stale)
    with h5py.File(stale / "metrics.h5", "r+") as m:
        m.attrs["results_run_id"] = "an-earlier-run"
    src, c = client(stale)
    assert any("stale" in w for w in src.warnings)
    assert "deletion_auc" not in c.get("/api/meta").json()["numeric"]
    assert "stale" in c.get("/").text
    src.close()
    # A run being written: rows not done yet are refused with the reason, the rest served.
    live = tmp_path / "live"
    shutil.copytree(run_dir, live)
    with h5py.File(live / "results.h5", "r+") as f:
        f["images/status"][3] = 0
    with writer_lock(live / "results.h5"):
        src, c = client(live)
        assert any("being written" in w for w in src.warnings)
        r = c.get("/api/overlay", params={"row": 3, "map": "gradcam/layer4"})
        assert r.status_code == 409 and "pending: not computed yet" in r.json()["error"]
        assert c.get("/api/overlay", params={"row": 2, "map": "gradcam/layer4"}).status_code \
            == 200
        src.close()
    # A map whose stored bytes cannot be read any more: one line, not a 500.
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    with h5py.File(damaged / "results.h5", "r+") as f:  # compressed, so bad bytes fail to read
        attrs = dict(f["gradcam/layer4"].attrs)
        values = f["gradcam/layer4"][:]
        del f["gradcam/layer4"]
        f.create_dataset("gradcam/layer4", data=values, compression="gzip")
        f["gradcam/layer4"].attrs.update({k: v for k, v in attrs.items() if k in (
            "kind", "method", "layer")})
        chunk = f["gradcam/layer4"].id.get_chunk_info(0)
    src, c = client(damaged)  # damaged while it is served
    with open(damaged / "results.h5", "r+b") as fh:
        fh.seek(chunk.byte_offset)
        fh.write(b"\xff" * chunk.size)
    r = c.get("/api/overlay", params={"row": 1, "map": "gradcam/layer4"})
    assert r.status_code == 422 and "damaged" in r.json()["error"]
    src.close()
    with pytest.raises(StoreError, match="damaged: cannot read /gradcam/layer4"):
        Source(damaged)  # damaged before it starts: one line


def test_a_sweep_shows_every_job(tmp_path):
    sweep = small_sweep(tmp_path)
    src, c = client(sweep)
    try:
        meta = c.get("/api/meta").json()
        assert meta["sweep"] and meta["jobs"] == ["0", "1"]
        assert meta["swept"] == ["model.target_layers"] and meta["maps"] == [
            "gradcam/layer3", "gradcam/layer4"]
        total, got = rows(c)
        assert total == 2 * 6 and {r["job"] for r in got} == {"0", "1"}
        assert {r["model.target_layers"] for r in got if r["job"] == "1"} == {"[layer4]"}
        assert {r["map"] for r in rows(c, job="1")[1]} == {"gradcam/layer4"}
        d = c.get("/api/image", params={"row": 0, "job": "0"}).json()
        assert [(v["job"], v["map"]) for v in d["views"]] == [("0", "gradcam/layer3"),
                                                              ("1", "gradcam/layer4")]
        ok = c.get("/api/overlay", params={"row": 0, "job": "1", "map": "gradcam/layer4"})
        assert ok.status_code == 200
        wrong = c.get("/api/overlay", params={"row": 0, "job": "1", "map": "gradcam/layer3"})
        assert wrong.status_code == 404 and "unknown map" in wrong.json()["error"]
        for job in ("../0", "2", ""):
            r = c.get("/api/overlay", params={"row": 0, "job": job})
            assert r.status_code == 404 and "unknown job" in r.json()["error"]
    finally:
        src.close()


def test_the_command_serves_on_a_free_port_without_torch(run_dir, tmp_path):
    """``stage=explore explore.port=0`` prints the URL it serves; the explorer's modules
    never import torch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys\nimport pipeline.explore, pipeline.explore.app\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr[-2000:]
    server = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "stage=explore",
                               f"run_dir={run_dir}", "explore.port=0"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        line = server.stdout.readline()  # blocks until the server says where it is
        assert line.startswith("explore -> http://127.0.0.1:"), (line, server.stderr.read())
        # The serving process, started by run.py, never loaded torch's library.
        assert "libtorch" not in Path(f"/proc/{server.pid}/maps").read_text()
        url = line.split()[-1]
        body = httpx.get(url + "api/images", params={"limit": 3, "sort": "score"},
                         timeout=30).json()
        assert body["total"] == 12 and len(body["rows"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=30)
    bad = subprocess.run([sys.executable, str(ROOT / "run.py"), "stage=explore"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: stage=explore needs run_dir=<a run folder or a multirun folder>")


def test_input_maps_are_overlaid_too(tmp_path):
    """A saliency run: its input-resolution map is listed and drawn (HOT by default)."""
    folder = tmp_path / "photos"
    write_images(folder, 2)
    run(compose_cfg(*TINY, "stage=extract", "method=saliency", "data=glob",
                    f"data.pattern={folder}/*.jpg"), tmp_path / "run")
    src, c = client(tmp_path / "run")
    try:
        assert c.get("/api/meta").json()["maps"] == ["saliency/input"]
        r = c.get("/api/overlay", params={"row": 1, "map": "saliency/input", "fmt": "png"})
        assert r.status_code == 200
        pic = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
        assert pic.shape[:2] == (80, 96)
        assert c.get("/api/images").json()["rows"][0]["entropy"] is not None
    finally:
        src.close()


def test_a_photo_moved_away_still_shows_its_map(tmp_path):
    folder = tmp_path / "photos"
    paths = write_images(folder, 2)
    run(compose_cfg(*TINY, "stage=extract", "data=glob", f"data.pattern={folder}/*.jpg"),
        tmp_path / "run")
    paths[1].unlink()
    src, c = client(tmp_path / "run")
    try:
        r = c.get("/api/overlay", params={"row": 1, "fmt": "png"})
        assert r.status_code == 200  # the map alone, at the photo's stored size
        assert cv2.imdecode(np.frombuffer(r.content, np.uint8), 1).shape[:2] == (80, 96)
        r = c.get("/api/photo", params={"row": 1})
        assert r.status_code == 404 and "cannot be read" in r.json()["error"]
    finally:
        src.close()


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/bench_explore.py on a small synthetic run (the figures are not checked)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_explore.py"),
                           "--n", "300", "--out", str(tmp_path), "--name", "smoke"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "smoke.json").read_text())
    assert payload["n_images"] == 300 and payload["figures"]["rss_mb"] > 0
    assert set(payload["targets"]) <= set(payload["figures"])
