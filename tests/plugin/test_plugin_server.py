"""End to end: a real ``tensorboard`` process discovers the plugin through its entry point.

It serves the logdir of a run recorded with ``trajscope.Recorder`` and analysed with
``trajscope.analyze`` (``tests.helpers.plugin.real_logdir``).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.helpers.plugin import REAL_RUN, event_labels, read_events
from trajscope.io.results import open_results

pytestmark = pytest.mark.slow


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read()


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
    res = open_results(logdir / REAL_RUN)
    events = read_events(logdir / REAL_RUN)
    k = len(res)
    assert k > 10  # more than TensorBoard keeps per tag by default: the loader's fix_flags works
    runs = json.loads(fetch(base + "/data/plugin/trajscope/runs")[2])["runs"]
    assert [r["name"] for r in runs] == [REAL_RUN]
    assert [(l["name"], l["nodes"]) for l in runs[0]["layers"]] == list(res.layers.items())
    for layer, n in res.layers.items():
        status, _, body = fetch(f"{base}/data/plugin/trajscope/labels?run={REAL_RUN}&layer={layer}")
        assert status == 200
        d = json.loads(body)
        assert d["steps"] == res.steps.tolist() and d["source"] == "events"
        labels = np.frombuffer(base64.b64decode(d["labels"]["data"]), np.uint8).reshape(n, k)
        np.testing.assert_array_equal(labels.T, res.node(layer, "label"))
        np.testing.assert_array_equal(labels.T, event_labels(events, layer)[1])
    status, _, body = fetch(f"{base}/data/plugin/trajscope/node?run={REAL_RUN}&layer=0&node=3")
    assert status == 200
    rho = json.loads(body)["series"]["rho"]
    np.testing.assert_allclose(rho, res.node_series("0", "rho", 3), rtol=1e-6)
    status, _, body = fetch(f"{base}/data/plugin/trajscope/stability?run={REAL_RUN}")
    np.testing.assert_allclose(
        json.loads(body)["global"]["series"]["sharpness"], res.global_series("sharpness"), rtol=1e-6
    )
    status, ctype, body = fetch(f"{base}/data/plugin/trajscope/labels?run=gamma&layer=0")
    assert status == 404 and ctype == "application/json" and "unknown run" in json.loads(body)["error"]
    status, _, _ = fetch(f"{base}/data/plugin/trajscope/static/..%2Fplugin.py")
    assert 400 <= status < 500
    status, ctype, body = fetch(base + "/data/plugin_entry.html?name=trajscope")
    assert status == 200 and b"static/index.js" in body


def test_stock_dashboards_see_the_tags(served):
    logdir, base = served
    res = open_results(logdir / REAL_RUN)
    tags = json.loads(fetch(base + "/data/plugin/scalars/tags")[2])
    assert "trajscope/global/sharpness" in tags[REAL_RUN]
    assert {f"trajscope/{m}/frac/source" for m in res.layers} <= set(tags[REAL_RUN])
    scalars = json.loads(fetch(f"{base}/data/plugin/scalars/scalars?run={REAL_RUN}&tag=trajscope/global/loss")[2])
    assert [int(p[1]) for p in scalars] == res.steps.tolist()
    np.testing.assert_allclose([p[2] for p in scalars], res.global_series("loss"), rtol=1e-6)
    hist = json.loads(fetch(f"{base}/data/plugin/histograms/histograms?run={REAL_RUN}&tag=trajscope/0/rho")[2])
    assert len(hist) == len(res)
