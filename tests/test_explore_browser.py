"""The explorer in a real headless Chromium, driven by Playwright: the server started as a
user starts it (``python run.py stage=explore explore.port=0``), then sort by a column,
filter, search, presets, the detail view with live opacity and colormap, names that are
markup shown as text, and no error in the page's console."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import cv2
import httpx
import pytest
from conftest import ROOT
from explore_runs import HOSTILE, labelled_run

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome")) if p), None)
MISSING = ("{} IS NOT INSTALLED: the explorer was not checked in a browser. Install it "
           "(chromium: apt-get install -y chromium; playwright: pip install playwright, "
           "which drives the system chromium: no browser download) to run this test.")

pytestmark = pytest.mark.usefixtures("one_thread")


def need(what: str, present: bool) -> None:
    if not present:
        if os.environ.get("CI"):  # CI installs both: missing there is a failure
            pytest.fail(MISSING.format(what))
        pytest.skip(MISSING.format(what))


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(URL, run folder) of a real ``stage=explore`` process on a free port."""
    run_dir = labelled_run(tmp_path_factory.mktemp("browser"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "stage=explore",
                             f"run_dir={run_dir}", "explore.port=0"], env=env,
                            cwd=run_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the server prints its URL once it listens
        assert line.startswith("explore -> http://127.0.0.1:"), (line, proc.stderr.read())
        yield line.split()[-1], run_dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    need("CHROMIUM", CHROMIUM is not None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need("PLAYWRIGHT", False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def problems() -> list[str]:
    """What the page logged as an error or warning (a test may expect some)."""
    return []


@pytest.fixture
def page(browser, server, problems) -> Iterator[object]:
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    pg.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning")
          else None)
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.goto(server[0])
    pg.wait_for_selector(".card")
    yield pg
    pg.close()
    assert not problems, problems


def api(server, **params) -> dict:
    return httpx.get(server[0] + "api/images", params={"limit": 500, **params},
                     timeout=30).json()


def files_shown(page) -> list[str]:
    return [e.text_content() for e in page.query_selector_all(".card .file")]


def test_grid_sort_filter_search_and_presets(page, server):
    layer = "gradcam/layer3"  # the page shows the first map's tiles
    assert files_shown(page) == [r["file"] for r in api(server, map=layer)["rows"]]
    assert page.get_attribute("#results", "data-total") == "6"
    # Sort by a metric, descending.
    page.select_option("#sort", "deletion_auc")
    page.click("#desc")
    page.wait_for_selector("#desc:has-text('descending')")
    page.wait_for_selector(".card .meta:has-text('deletion_auc')")
    want = api(server, map=layer, sort="deletion_auc", desc=1)["rows"]
    assert files_shown(page) == [r["file"] for r in want]
    # Filter: misclassified (the preset), then a search within it.
    page.click("#misclassified")
    page.wait_for_selector("#results[data-total='3']")
    wrong = api(server, map=layer, correct=0, sort="deletion_auc", desc=1)["rows"]
    assert files_shown(page) == [r["file"] for r in wrong]
    page.fill("#q", wrong[0]["file"][:6].upper())
    page.wait_for_function("() => document.querySelector('#q').value !== ''")
    expect = api(server, map=layer, correct=0, q=wrong[0]["file"][:6].upper())["total"]
    page.wait_for_selector(f"#results[data-total='{expect}']")
    page.click("#reset")
    page.wait_for_selector("#results[data-total='6']")
    # Worst 2 by deletion AUC (higher is worse): the two highest.
    page.fill("#worst-n", "2")
    page.select_option("#worst-metric", "deletion_auc")
    page.click("#worst")
    page.wait_for_selector("#results[data-total='2']")
    assert files_shown(page) == [r["file"] for r in want[:2]]
    # A metric range.
    page.click("#reset")
    page.wait_for_selector("#results[data-total='6']")
    lo = sorted(r["deletion_auc"] for r in want if r["deletion_auc"] is not None)[2]
    page.select_option("#range-col", "deletion_auc")
    page.fill("#range-min", repr(lo))
    page.press("#range-min", "Tab")  # a change event, as a user leaving the field
    page.wait_for_selector("#results[data-total='3']")
    assert set(files_shown(page)) == {r["file"] for r in want
                                      if (r["deletion_auc"] or -1) >= lo}


def test_table_sorts_by_clicking_a_column(page, server):
    page.click("#view-table")
    page.wait_for_selector("table.rows tbody tr")
    page.click("table.rows th:has-text('entropy')")
    page.wait_for_selector("th.sorted:has-text('entropy ▲')")
    page.click("table.rows th:has-text('entropy')")
    page.wait_for_selector("th.sorted:has-text('entropy ▼')")
    want = api(server, map="gradcam/layer3", sort="entropy", desc=1)["rows"]
    cells = page.query_selector_all("table.rows tbody tr")
    files = [row.query_selector_all("td")[2].text_content() for row in cells]
    assert files == [r["file"] for r in want]


def test_detail_view_with_live_opacity_and_colormap(page, server, tmp_path):
    first = api(server, map="gradcam/layer4", sort="row")["rows"][1]
    page.click(f".card:has-text('{first['file']}')")
    page.wait_for_selector("#detail:not([hidden]) section.view img.overlay")
    assert page.text_content("#detail-title") == first["file"]
    views = page.query_selector_all("section.view h3")
    assert [v.text_content() for v in views] == ["gradcam/layer3", "gradcam/layer4"]
    assert len(page.query_selector_all("section.view svg.chart")) == 4  # deletion, insertion
    assert len(page.query_selector_all("table.topk tbody tr, table.topk tr")) >= 5
    # Opacity and colormap are the overlay URL's parameters, changed live.
    page.select_option("#d-cmap", "viridis")
    page.fill("#d-alpha", "0.8")  # a range input: sets the value and fires input
    page.wait_for_selector("img.overlay[src*='cmap=viridis'][src*='alpha=0.8']")
    srcs = [e.get_attribute("src") for e in page.query_selector_all("img.overlay")]
    for src in srcs:
        q = parse_qs(urlparse(src).query)
        assert q["cmap"] == ["viridis"] and q["alpha"] == ["0.8"] and q["row"] == [
            str(first["row"])]
    page.wait_for_function("() => [...document.querySelectorAll('img.overlay')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    shot = tmp_path / "detail.png"
    page.screenshot(path=str(shot))
    img = cv2.imread(str(shot))
    assert cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).std() > 25  # not blank
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail", state="hidden")


def test_names_that_are_markup_stay_text(page, server):
    page.fill("#q", "onmouseover")
    page.wait_for_selector("#results[data-total='1']")
    assert files_shown(page) == [HOSTILE]
    assert page.query_selector(".card b") is None  # no element came out of the name
    assert page.evaluate("() => window.__hacked") is None
    page.click(".card")
    page.wait_for_selector("#detail:not([hidden])")
    assert page.text_content("#detail-title") == HOSTILE
    assert page.query_selector("#detail b") is None


def test_errors_show_in_the_page_not_as_a_blank(page, server, problems):
    page.goto(server[0] + "#sort=nonsense")
    page.wait_for_selector("#message.error")
    assert "unknown sort column 'nonsense'" in page.text_content("#message")
    assert problems == ["Failed to load resource: the server responded with a status of 400 "
                        "(Bad Request)"]  # the browser's own line for the refused request
    problems.clear()
