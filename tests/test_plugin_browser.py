"""The dashboard in headless Chromium against a real TensorBoard (writes docs/img/dashboard.png).

Needs Debian's chromium (``apt-get install chromium``) and the playwright Python package (no
browser download). Missing either: the test FAILS when the CI environment variable is set,
and is skipped otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugin_fixtures import LAYERS, N_STEPS, build_logdir, tensorboard_server
from trajscope.results import open_results

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("TRAJSCOPE_CHROMIUM", "/usr/bin/chromium")  # Debian's chromium
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "dashboard.png"
LABEL_RGB = [(0x1A, 0x9E, 0x77), (0x7B, 0x6F, 0xC4), (0xE6, 0xA7, 0x00), (0xE0, 0x41, 0x2F)]  # common.js
TIMEOUT = 20_000  # ms, every wait is bounded


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing: apt-get install chromium"
    return None


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium, or the reason there is none (each test then fails under CI, else skips)."""
    why = _missing()
    if why:
        yield why
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def _use(browser):
    if isinstance(browser, str):
        if os.environ.get("CI"):
            pytest.fail(f"{browser} (required when CI is set)")
        pytest.skip(browser)
    return browser


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    logdir = build_logdir(tmp_path_factory.mktemp("browser"))
    with tensorboard_server(logdir) as base:
        yield logdir, base


def _watch(page) -> list[str]:
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("console", lambda m: m.type == "error" and "favicon" not in m.text and "404" not in m.text
            and problems.append(f"console: {m.text}"))
    page.on("response", lambda r: r.status >= 400 and "favicon" not in r.url and problems.append(f"{r.status} {r.url}"))
    return problems


def _cell(canvas, row: int, col: int) -> dict:
    """Position (relative to the canvas) of a cell's centre, from the geometry it exposes."""
    g = {k: float(canvas.get_attribute(f"data-{k}")) for k in ("left", "top", "cell-w", "cell-h")}
    return {"x": g["left"] + (col + 0.5) * g["cell-w"], "y": g["top"] + (row + 0.5) * g["cell-h"]}


def test_dashboard_in_tensorboard(browser, served):
    browser = _use(browser)
    logdir, base = served
    res = open_results(logdir / "alpha")
    labels = res.node("net.0", "label")
    page = browser.new_page(viewport={"width": 1440, "height": 1320})
    problems = _watch(page)
    try:
        page.goto(base + "/#trajscope", timeout=TIMEOUT)
        frame = page.frame_locator("iframe")
        canvas = frame.locator("#ts-labelmap[data-rows]")
        canvas.wait_for(timeout=TIMEOUT)
        assert canvas.get_attribute("data-rows") == str(LAYERS["net.0"])
        assert canvas.get_attribute("data-cols") == str(N_STEPS)

        # The cells are drawn with the colour of each node's label (default order: node index).
        for node, col in ((0, 0), (3, 0), (3, N_STEPS - 1), (7, 5), (1, N_STEPS - 2), (15, 9)):
            p = _cell(canvas, node, col)
            rgb = canvas.evaluate("(c, p) => { const d = window.devicePixelRatio || 1;"
                                  " return Array.from(c.getContext('2d').getImageData(Math.round(p.x * d),"
                                  " Math.round(p.y * d), 1, 1).data.slice(0, 3)); }", p)
            assert tuple(rgb) == LABEL_RGB[labels[col, node]], (node, col, rgb)

        # Another layer, and back.
        frame.locator("#ts-layer").select_option("net.2")
        frame.locator('#ts-labelmap[data-rows="5"]').wait_for(timeout=TIMEOUT)
        frame.locator("#ts-layer").select_option("net.0")
        frame.locator('#ts-labelmap[data-rows="16"]').wait_for(timeout=TIMEOUT)

        # Hover shows the node's metrics; a click opens its time series.
        canvas.hover(position=_cell(canvas, 3, 2))
        tip = frame.locator("#ts-tooltip")
        tip.wait_for(state="visible", timeout=TIMEOUT)
        frame.locator("#ts-tooltip .ts-tip-row").first.wait_for(timeout=TIMEOUT)
        assert "node 3" in tip.inner_text() and f"step {int(res.steps[2])}" in tip.inner_text()
        canvas.click(position=_cell(canvas, 3, 2))
        frame.locator('#ts-node-body[data-node="3"] #ts-node-charts').wait_for(timeout=TIMEOUT)
        assert frame.locator("#ts-node-charts .ts-chart").count() == 6
        assert "node 3" in frame.locator("#ts-node-title").inner_text()
        assert canvas.get_attribute("data-selected") == "3"

        # Stability and phase portrait are drawn; the step slider moves the portrait.
        frame.locator("#ts-stab-body svg").first.wait_for(timeout=TIMEOUT)
        assert frame.locator("#ts-stab-body .ts-chart").count() >= 3
        slider = frame.locator("#ts-step-slider")
        slider.evaluate("(s) => { s.value = '2'; s.dispatchEvent(new Event('input')); }")
        frame.locator("#ts-step-label", has_text=f"step {int(res.steps[2])} ").wait_for(timeout=TIMEOUT)
        assert int(frame.locator("#ts-phase").get_attribute("data-points")) == LAYERS["net.0"] - 1  # dead node: NaN drift

        # Sorting keeps the selection and regroups the rows: earliest sources first.
        frame.locator("#ts-sort").select_option("source")
        first = _cell(canvas, 0, 0)
        rgb = canvas.evaluate("(c, p) => Array.from(c.getContext('2d').getImageData(Math.round(p.x * (window.devicePixelRatio||1)),"
                              " Math.round(p.y * (window.devicePixelRatio||1)), 1, 1).data.slice(0, 3))", first)
        assert tuple(rgb) == LABEL_RGB[3]

        page.mouse.move(2, 2)
        page.wait_for_timeout(300)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size > 20_000
        assert not problems, problems
    finally:
        page.close()


def test_empty_logdir_shows_how_to_start(browser, tmp_path):
    browser = _use(browser)
    (tmp_path / "empty").mkdir()
    with tensorboard_server(tmp_path / "empty") as base:
        page = browser.new_page()
        problems = _watch(page)
        try:
            page.goto(base + "/data/plugin_entry.html?name=trajscope", timeout=TIMEOUT)
            empty = page.locator("#ts-empty")
            empty.wait_for(state="visible", timeout=TIMEOUT)
            assert "trajscope analyze" in empty.inner_text()
            assert page.locator("#ts-main").is_hidden()
            assert not problems, problems
        finally:
            page.close()
