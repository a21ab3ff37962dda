"""The dashboard in headless Chromium against a real TensorBoard, on a recorded and analysed run.

Needs Debian's chromium (``apt-get install chromium``) and the playwright Python package (no
browser download). Missing either: the test FAILS when the CI environment variable is set,
and is skipped otherwise.

The tests save their screenshot under pytest's tmp path; they never touch tracked files. The
README screenshot ``docs/img/dashboard.png`` is made only on request, from the analysed sample
runs (``make demo`` writes them to ``demo_runs/``)::

    make demo && .venv/bin/python -m tests.plugin.test_plugin_browser demo_runs

It shows run ``digits_mlp``: the layer with the most distinct labels, the analysed step with the
most sources in it (the phase portrait and the marked label-map column), and one of those
sources selected (its time series).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.plugin import DEAD_UNIT, REAL_RUN, SYNTH_WARNING, build_logdir, tensorboard_server
from trajscope.io.results import open_results

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("TRAJSCOPE_CHROMIUM", "/usr/bin/chromium")  # Debian's chromium
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "dashboard.png"
SCREENSHOT_ENV = "TRAJSCOPE_SCREENSHOT_LOGDIR"
README_RUN = "digits_mlp"
VIEWPORT = {"width": 1440, "height": 1320}
LABEL_RGB = [(0x1A, 0x9E, 0x77), (0x7B, 0x6F, 0xC4), (0xE6, 0xA7, 0x00), (0xE0, 0x41, 0x2F)]  # common.js
SOURCE = 3
TIMEOUT = 20_000  # ms, every wait is bounded


# -- helpers (also used to make the README screenshot) -----------------------------------------


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing: apt-get install chromium"
    return None


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)


def watch(page) -> list[str]:
    """Collects page errors, console errors and failed requests."""
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on(
        "console",
        lambda m: (
            m.type == "error"
            and "favicon" not in m.text
            and "404" not in m.text
            and problems.append(f"console: {m.text}")
        ),
    )
    page.on("response", lambda r: r.status >= 400 and "favicon" not in r.url and problems.append(f"{r.status} {r.url}"))
    return problems


def cell(canvas, row: int, col: int) -> dict:
    """Position (relative to the canvas) of a cell's centre, from the geometry it exposes."""
    g = {k: float(canvas.get_attribute(f"data-{k}")) for k in ("left", "top", "cell-w", "cell-h")}
    return {"x": g["left"] + (col + 0.5) * g["cell-w"], "y": g["top"] + (row + 0.5) * g["cell-h"]}


def pixel(canvas, row: int, col: int) -> tuple[int, int, int]:
    """The colour drawn at the centre of a label-map cell."""
    rgb = canvas.evaluate(
        "(c, p) => { const d = window.devicePixelRatio || 1;"
        " return Array.from(c.getContext('2d').getImageData(Math.round(p.x * d),"
        " Math.round(p.y * d), 1, 1).data.slice(0, 3)); }",
        cell(canvas, row, col),
    )
    return tuple(rgb)


def open_dashboard(page, base: str):
    """Load TensorBoard's trajscope tab; returns the plugin's frame once a label map is drawn."""
    page.goto(base + "/#trajscope", timeout=TIMEOUT)
    frame = page.frame_locator("iframe")
    frame.locator("#ts-labelmap[data-rows]").wait_for(timeout=TIMEOUT)
    return frame


def show(frame, res, run: str, layer: str):
    """Select ``run`` and ``layer``; returns the label map once it has the layer's N rows × K columns."""
    if frame.locator("#ts-run").input_value() != run:
        frame.locator("#ts-run").select_option(run)  # its change handler fills the layer list
    frame.locator("#ts-layer").select_option(layer)
    canvas = frame.locator(f'#ts-labelmap[data-rows="{res.layers[layer]}"][data-cols="{len(res)}"]')
    canvas.wait_for(timeout=TIMEOUT)
    return canvas


def show_step(frame, res, index: int) -> None:
    """Move the phase-portrait slider to analysed step ``index`` and wait for its portrait."""
    # A range input clamps its value to max, which is the previous run's until the first portrait.
    frame.locator(f'#ts-step-slider[max="{len(res) - 1}"]').wait_for(state="attached", timeout=TIMEOUT)
    step = int(res.steps[index])
    frame.locator("#ts-step-slider").evaluate(
        "(s, i) => { s.value = String(i); s.dispatchEvent(new Event('input')); }", index
    )
    frame.locator("#ts-step-label", has_text=f"step {step} ").wait_for(timeout=TIMEOUT)


def select_node(frame, canvas, node: int, row: int, col: int) -> None:
    """Click ``node``'s cell (drawn in ``row``) at column ``col``; wait for its time series."""
    canvas.click(position=cell(canvas, row, col))
    frame.locator(f'#ts-node-body[data-node="{node}"] #ts-node-charts').wait_for(timeout=TIMEOUT)


def story(res) -> tuple[str, int, int]:
    """(layer, step index, node) for the README: the layer with the most distinct labels (then the
    most source cells), its analysed step with the most sources, and the source at that step whose
    label changes most often (ties: the first)."""

    def score(m: str) -> tuple[int, int]:
        lab = res.node(m, "label")
        return len(np.unique(lab[lab < len(LABEL_RGB)])), int((lab == SOURCE).sum())

    layer = max(res.layers, key=score)  # max keeps the first of equals: layer order
    lab = res.node(layer, "label")
    index = int(np.argmax((lab == SOURCE).sum(axis=1)))
    sources = np.flatnonzero(lab[index] == SOURCE)
    if not sources.size:  # no source anywhere: any node
        return layer, len(res) - 1, 0
    changes = (np.diff(lab.astype(np.int16), axis=0) != 0).sum(axis=0)
    node = int(sources[np.argmax(changes[sources])])
    return layer, index, node


def readme_screenshot(browser, logdir: Path, out: Path = README_SCREENSHOT, run: str = README_RUN) -> dict:
    """Open ``run`` of ``logdir`` in the dashboard as :func:`story` says and save ``out``."""
    res = open_results(Path(logdir) / run)
    layer, index, node = story(res)
    step = int(res.steps[index])
    with tensorboard_server(Path(logdir)) as base:
        page = browser.new_page(viewport=VIEWPORT)
        problems = watch(page)
        try:
            frame = open_dashboard(page, base)
            canvas = show(frame, res, run, layer)
            show_step(frame, res, index)
            select_node(frame, canvas, node, row=node, col=index)
            frame.locator("#ts-stab-body .ts-chart").nth(2).wait_for(timeout=TIMEOUT)
            page.mouse.move(2, 2)  # no hover box in the picture
            frame.locator("#ts-tooltip").wait_for(state="hidden", timeout=TIMEOUT)
            # Tall enough for every card (TensorBoard scrolls the plugin inside its iframe).
            inner = frame.locator("body").evaluate("(b) => b.ownerDocument.documentElement.scrollHeight")
            top = page.locator("iframe").bounding_box()["y"]
            height = max(VIEWPORT["height"], int(top + inner) + 4)
            page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
            page.wait_for_timeout(400)
            assert canvas.get_attribute("data-selected") == str(node)
            assert frame.locator("#ts-legend .ts-key").count() >= len(LABEL_RGB)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            assert not problems, problems
        finally:
            page.close()
    return {
        "run": run,
        "layer": layer,
        "step": step,
        "node": node,
        "nodes": res.layers[layer],
        "steps": len(res),
        "path": str(out),
    }


# -- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium, or the reason there is none (each test then fails under CI, else skips)."""
    why = _missing()
    if why:
        yield why
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
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


def test_dashboard_in_tensorboard(browser, served, tmp_path):
    browser = _use(browser)
    logdir, base = served
    res = open_results(logdir / REAL_RUN)
    labels = res.node("0", "label")  # (K, N)
    k, n = labels.shape
    page = browser.new_page(viewport=VIEWPORT)
    problems = watch(page)
    try:
        frame = open_dashboard(page, base)
        canvas = frame.locator("#ts-labelmap")
        # The first layer of the run: N nodes × K analysed steps of the real run.
        assert (canvas.get_attribute("data-rows"), canvas.get_attribute("data-cols")) == (str(n), str(k))

        # The cells are drawn with the colour of each node's label (default order: node index).
        src_col, src_node = map(int, np.argwhere(labels == SOURCE)[0])
        for node, col in ((0, 0), (DEAD_UNIT, 3), (DEAD_UNIT, k - 1), (n - 1, k - 1), (src_node, src_col), (7, k // 2)):
            assert pixel(canvas, node, col) == LABEL_RGB[labels[col, node]], (node, col)

        # Another layer, and back.
        show(frame, res, REAL_RUN, "2")
        canvas = show(frame, res, REAL_RUN, "0")

        # Hover shows the node's metrics; a click opens its time series.
        canvas.hover(position=cell(canvas, 3, 2))
        tip = frame.locator("#ts-tooltip")
        tip.wait_for(state="visible", timeout=TIMEOUT)
        frame.locator("#ts-tooltip .ts-tip-row").first.wait_for(timeout=TIMEOUT)
        assert "node 3" in tip.inner_text() and f"step {int(res.steps[2])}" in tip.inner_text()
        select_node(frame, canvas, 3, row=3, col=2)
        assert frame.locator("#ts-node-charts .ts-chart").count() == 6
        assert "node 3" in frame.locator("#ts-node-title").inner_text()
        assert canvas.get_attribute("data-selected") == "3"

        # Stability and phase portrait are drawn; the step slider moves the portrait.
        frame.locator("#ts-stab-body svg").first.wait_for(timeout=TIMEOUT)
        assert frame.locator("#ts-stab-body .ts-chart").count() >= 3
        show_step(frame, res, 2)
        finite = np.isfinite(res.node("0", "drift", 2)) & np.isfinite(res.node("0", "spectral_radius", 2))
        assert int(frame.locator("#ts-phase").get_attribute("data-points")) == int(finite.sum())

        # Sorting keeps the selection and regroups the rows: earliest sources first.
        frame.locator("#ts-sort").select_option("source")
        first = np.where((labels == SOURCE).any(axis=0), np.argmax(labels == SOURCE, axis=0), k)
        order = sorted(range(n), key=lambda i: (first[i], i))
        assert pixel(canvas, 0, int(first[order[0]])) == LABEL_RGB[SOURCE]
        for row in (0, 1, n - 1):
            for col in (0, k - 1):
                assert pixel(canvas, row, col) == LABEL_RGB[labels[col, order[row]]], (row, col)
        assert canvas.get_attribute("data-selected") == "3"

        page.mouse.move(2, 2)
        page.wait_for_timeout(300)
        shot = tmp_path / "dashboard.png"  # never the tracked docs/img/dashboard.png
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 20_000
        assert not problems, problems
    finally:
        page.close()


def test_analysis_warnings_show_as_a_banner(browser, tmp_path):
    """The WARNING lines an analysis printed (kept in analysis.zarr) are shown above the dashboard."""
    browser = _use(browser)
    logdir = build_logdir(tmp_path, runs=("alpha",))
    with tensorboard_server(logdir) as base:
        page = browser.new_page(viewport=VIEWPORT)
        problems = watch(page)
        try:
            frame = open_dashboard(page, base)
            banner = frame.locator("#ts-warnings")
            banner.wait_for(state="visible", timeout=TIMEOUT)
            assert banner.inner_text().strip() == SYNTH_WARNING.removeprefix("WARNING: ")
            assert not problems, problems
        finally:
            page.close()


def test_empty_logdir_shows_how_to_start(browser, tmp_path):
    browser = _use(browser)
    (tmp_path / "empty").mkdir()
    with tensorboard_server(tmp_path / "empty") as base:
        page = browser.new_page()
        problems = watch(page)
        try:
            page.goto(base + "/data/plugin_entry.html?name=trajscope", timeout=TIMEOUT)
            empty = page.locator("#ts-empty")
            empty.wait_for(state="visible", timeout=TIMEOUT)
            assert "trajscope analyze" in empty.inner_text()
            assert page.locator("#ts-main").is_hidden()
            assert not problems, problems
        finally:
            page.close()


def main(argv: list[str]) -> int:
    """``python -m tests.plugin.test_plugin_browser [LOGDIR] [OUT.png]``: the README screenshot, without pytest."""
    why = _missing()
    if why:
        print(why, file=sys.stderr)
        return 2
    logdir = Path(argv[0] if argv else os.environ.get(SCREENSHOT_ENV, "demo_runs"))
    out = Path(argv[1]) if len(argv) > 1 else README_SCREENSHOT
    if not (logdir / README_RUN / "analysis.zarr").is_dir():
        print(f"{logdir / README_RUN} is not an analysed run: run `make demo` first", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        try:
            shown = readme_screenshot(b, logdir, out)
        finally:
            b.close()
    print(
        f"{shown['path']}: run {shown['run']}, layer {shown['layer']} ({shown['nodes']} nodes × "
        f"{shown['steps']} steps), node {shown['node']} selected, phase portrait at step {shown['step']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
