"""End to end: a real ``tensorboard`` process discovers the plugin through its entry point."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from plugin_fixtures import LAYERS, N_STEPS, RUNS, build_logdir, tensorboard_server
from trajscope.results import open_results

pytestmark = pytest.mark.slow


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    logdir = build_logdir(tmp_path_factory.mktemp("server"))
    with tensorboard_server(logdir) as base:
        yield logdir, base


def test_listing_enables_trajscope(served):
    _, base = served
    status, ctype, body = fetch(base + "/data/plugins_listing")
    assert status == 200 and ctype == "application/json"
    meta = json.loads(body)["trajscope"]
    assert meta["enabled"] is True and meta["tab_name"] == "trajscope"
    assert meta["loading_mechanism"]["type"] == "IFRAME"
    assert meta["loading_mechanism"]["module_path"] == "/data/plugin/trajscope/static/index.js"
    status, ctype, _ = fetch(base + meta["loading_mechanism"]["module_path"])
    assert status == 200 and ctype == "text/javascript"


def test_routes_answer_with_every_step(served):
    logdir, base = served
    runs = json.loads(fetch(base + "/data/plugin/trajscope/runs")[2])["runs"]
    assert [r["name"] for r in runs] == list(RUNS)
    for run in RUNS:
        res = open_results(logdir / run)
        for layer, n in LAYERS.items():
            status, _, body = fetch(f"{base}/data/plugin/trajscope/labels?run={run}&layer={layer}")
            assert status == 200
            d = json.loads(body)
            # 12 steps > TensorBoard's default of 10 tensors per tag: the loader's fix_flags works.
            assert len(d["steps"]) == N_STEPS and d["source"] == "events"
            labels = np.frombuffer(base64.b64decode(d["labels"]["data"]), np.uint8).reshape(n, N_STEPS)
            np.testing.assert_array_equal(labels.T, res.node(layer, "label"))
    status, _, body = fetch(f"{base}/data/plugin/trajscope/node?run=alpha&layer=net.0&node=3")
    assert status == 200 and len(json.loads(body)["series"]["rho"]) == N_STEPS
    status, ctype, body = fetch(f"{base}/data/plugin/trajscope/labels?run=gamma&layer=net.0")
    assert status == 404 and ctype == "application/json" and "unknown run" in json.loads(body)["error"]
    status, _, _ = fetch(f"{base}/data/plugin/trajscope/static/..%2Fplugin.py")
    assert 400 <= status < 500
    status, ctype, body = fetch(base + "/data/plugin_entry.html?name=trajscope")
    assert status == 200 and b"static/index.js" in body


def test_stock_dashboards_see_the_tags(served):
    _, base = served
    tags = json.loads(fetch(base + "/data/plugin/scalars/tags")[2])
    assert "trajscope/global/sharpness" in tags["alpha"]
    assert "trajscope/net.0/frac/source" in tags["alpha"]
    hist = json.loads(fetch(base + "/data/plugin/histograms/histograms?run=alpha&tag=trajscope/net.0/rho")[2])
    assert len(hist) == N_STEPS
