"""The TensorBoard plugin's routes through a WSGI test client over the fixture logdir."""
from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import zarr
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from plugin_fixtures import LAYERS, N_STEPS, RUNS, build_logdir
from trajscope.results import LABELS, open_results
from trajscope_tensorboard.loader import TrajscopeLoader

P = "/data/plugin/trajscope"


def make_client(logdir: Path) -> Client:
    """The plugin inside TensorBoard's own WSGI app, over a multiplexer that keeps every step."""
    mux = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"trajscope": 0})
    if logdir.exists():
        mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    ctx = base_plugin.TBContext(logdir=str(logdir), data_provider=provider, multiplexer=mux)
    plugin = TrajscopeLoader().load(ctx)
    return Client(application.TensorBoardWSGI([plugin], data_provider=provider))


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    return build_logdir(tmp_path_factory.mktemp("routes"))


@pytest.fixture(scope="module")
def client(logdir):
    return make_client(logdir)


def get_json(client: Client, url: str, status: int = 200) -> dict:
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.get_data(as_text=True)[:500])
    assert r.mimetype == "application/json", (url, r.mimetype)
    return json.loads(r.get_data(as_text=True))


def unpack(packed: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(packed["data"]), dtype=np.dtype(packed["dtype"]).newbyteorder("<")) \
        .reshape(packed["shape"])


def nan_to_none(a: np.ndarray) -> list:
    return [None if not np.isfinite(x) else pytest.approx(float(x), rel=1e-6) for x in np.asarray(a, np.float64)]


def test_runs(client):
    d = get_json(client, f"{P}/runs")
    assert [r["name"] for r in d["runs"]] == list(RUNS)
    for r in d["runs"]:
        assert r["results"] and r["steps"] == N_STEPS and r["results_error"] is None
        assert [(l["name"], l["nodes"], l["labels"], l["metrics"]) for l in r["layers"]] == \
            [(m, n, True, True) for m, n in LAYERS.items()]
    assert d["label_names"] == list(LABELS)


@pytest.mark.parametrize("run", RUNS)
def test_labels_match_store(client, logdir, run):
    res = open_results(logdir / run)
    for layer, n in LAYERS.items():
        d = get_json(client, f"{P}/labels?run={run}&layer={layer}")
        assert d["source"] == "events" and d["nodes"] == n and d["label_names"] == list(LABELS)
        assert d["steps"] == res.steps.tolist()
        labels = unpack(d["labels"])
        assert labels.shape == (n, N_STEPS) and labels.dtype == np.uint8  # node-major
        np.testing.assert_array_equal(labels.T, res.node(layer, "label"))
        s = get_json(client, f"{P}/labels?run={run}&layer={layer}&kind=stable_label")
        assert s["source"] == "analysis.zarr"
        np.testing.assert_array_equal(unpack(s["labels"]).T, res.node(layer, "stable_label"))


def test_every_label_present(client):
    d = get_json(client, f"{P}/labels?run=alpha&layer=net.2")
    assert set(np.unique(unpack(d["labels"]))) == {0, 1, 2, 3}


def test_node_series(client, logdir):
    res = open_results(logdir / "alpha")
    for node in (0, 7, 15):  # 7 is the dead node: NaN ρ and drift come back as null
        d = get_json(client, f"{P}/node?run=alpha&layer=net.0&node={node}")
        assert d["steps"] == res.steps.tolist() and d["node"] == node
        for metric in res.metrics("net.0"):
            assert d["series"][metric] == nan_to_none(res.node("net.0", metric)[:, node]), metric
    dead = get_json(client, f"{P}/node?run=alpha&layer=net.0&node=7")
    assert all(v is None for v in dead["series"]["rho"])


def test_step(client, logdir):
    res = open_results(logdir / "beta")
    for url, index in ((f"{P}/step?run=beta&layer=net.0&index=3", 3),
                       (f"{P}/step?run=beta&layer=net.0&step={int(res.steps[5])}", 5),
                       (f"{P}/step?run=beta&layer=net.0", N_STEPS - 1),
                       (f"{P}/step?run=beta&layer=net.0&index=-1", N_STEPS - 1)):
        d = get_json(client, url)
        assert d["index"] == index and d["step"] == int(res.steps[index]) and d["nodes"] == 16
        for metric in res.metrics("net.0"):
            np.testing.assert_array_equal(unpack(d["metrics"][metric]), res.node("net.0", metric, index), err_msg=metric)


def test_stability(client, logdir):
    res = open_results(logdir / "alpha")
    d = get_json(client, f"{P}/stability?run=alpha")
    g = d["global"]
    assert g["steps"] == res.steps.tolist()
    for name in ("loss", "sharpness", "threshold", "n_hvp"):
        assert g["series"][name] == nan_to_none(res.global_series(name))
    assert [l["name"] for l in d["layers"]] == list(LAYERS)
    for entry in d["layers"]:
        labels = res.node(entry["name"], "label")
        for code, name in enumerate(LABELS):
            np.testing.assert_allclose(entry["fractions"][name], (labels == code).mean(axis=1))
        r = res.node(entry["name"], "spectral_radius").astype(np.float64)
        np.testing.assert_allclose(entry["max_spectral_radius"]["values"], np.nanmax(r, axis=1), rtol=1e-6)


@pytest.mark.parametrize("url, status, needle", [
    (f"{P}/labels?run=nope&layer=net.0", 404, "unknown run 'nope'"),
    (f"{P}/labels?run=alpha&layer=net.9", 404, "unknown layer 'net.9'"),
    (f"{P}/node?run=alpha&layer=nope&node=0", 404, "unknown layer"),
    (f"{P}/step?run=nope&layer=net.0", 404, "unknown run"),
    (f"{P}/stability?run=nope", 404, "unknown run"),
    (f"{P}/labels?layer=net.0", 400, "missing query parameter 'run'"),
    (f"{P}/node?run=alpha&layer=net.0", 400, "missing query parameter 'node'"),
    (f"{P}/node?run=alpha&layer=net.0&node=x", 400, "must be an integer"),
    (f"{P}/node?run=alpha&layer=net.0&node=16", 400, "out of range"),
    (f"{P}/step?run=alpha&layer=net.0&index=99", 400, "out of range"),
    (f"{P}/step?run=alpha&layer=net.0&step=7", 404, "step 7 was not analysed"),
    (f"{P}/labels?run=alpha&layer=net.0&kind=bogus", 400, "kind must be"),
    (f"{P}/labels?run=..%2F..&layer=net.0", 404, "unknown run"),
])
def test_bad_requests_are_json_4xx(client, url, status, needle):
    d = get_json(client, url, status)
    assert needle in d["error"]
    assert "Traceback" not in d["error"] and "\n" not in d["error"]


def test_static_files(client):
    names = {p.name for p in (resources.files("trajscope_tensorboard") / "static").iterdir()}
    assert {"index.js", "style.css"} <= names
    for name in names:
        r = client.get(f"{P}/static/{name}")
        assert r.status_code == 200, name
        assert r.mimetype in ("text/javascript", "text/css")
    # Every relative import of every module is shipped (no CDN, no build step).
    for name in (n for n in names if n.endswith(".js")):
        src = client.get(f"{P}/static/{name}").get_data(as_text=True)
        for target in re.findall(r"""(?:from|import)\s*\(?\s*["']([^"']+)["']""", src):
            assert target.startswith("./") and target[2:] in names, (name, target)
            assert "http" not in target


@pytest.mark.parametrize("path", [
    "/static/../plugin.py", "/static/%2e%2e/plugin.py", "/static/..%2Fplugin.py", "/static/%2e%2e%2f__init__.py",
    "/static//etc/passwd", "/static/", "/static/nope.js", "/static/./index.js/../../loader.py",
])
def test_static_refuses_paths_outside(client, path):
    r = client.get(P + path)
    assert 400 <= r.status_code < 500, (path, r.status_code)
    body = r.get_data(as_text=True)
    assert "import" not in body and "def " not in body and "root:" not in body


def test_plugin_entry_and_listing(client):
    listing = get_json(client, "/data/plugins_listing")
    meta = listing["trajscope"]
    assert meta["enabled"] is True
    assert meta["loading_mechanism"] == {"type": "IFRAME", "module_path": f"{P}/static/index.js"}
    entry = client.get("/data/plugin_entry.html?name=trajscope")
    assert entry.status_code == 200 and "./static/index.js" in entry.get_data(as_text=True)


def test_empty_logdir(tmp_path):
    (tmp_path / "empty").mkdir()
    c = make_client(tmp_path / "empty")
    d = get_json(c, f"{P}/runs")
    assert d["runs"] == [] and d["logdir"] is True
    err = get_json(c, f"{P}/labels?run=x&layer=y", 404)
    assert "empty logdir" in err["error"]
    assert get_json(c, "/data/plugins_listing")["trajscope"]["enabled"] is False
    assert c.get(f"{P}/static/index.js").status_code == 200


def test_runs_without_store_or_without_events(tmp_path, logdir):
    d = tmp_path / "logs"
    shutil.copytree(logdir, d)
    shutil.rmtree(d / "alpha" / "analysis.zarr")  # events only
    for f in (d / "beta").glob("events.out.tfevents.*"):  # store only
        f.unlink()
    c = make_client(d)
    runs = {r["name"]: r for r in get_json(c, f"{P}/runs")["runs"]}
    assert runs["alpha"]["results"] is False
    assert [(l["name"], l["nodes"], l["metrics"]) for l in runs["alpha"]["layers"]] == \
        [(m, n, False) for m, n in sorted(LAYERS.items())]
    lab = get_json(c, f"{P}/labels?run=alpha&layer=net.0")
    assert lab["source"] == "events" and lab["nodes"] == 16
    err = get_json(c, f"{P}/node?run=alpha&layer=net.0&node=0", 404)
    assert "analysis.zarr" in err["error"]
    stab = get_json(c, f"{P}/stability?run=alpha")
    assert stab["global"]["source"] == "events" and len(stab["global"]["series"]["sharpness"]) == N_STEPS
    assert stab["layers"][0]["max_spectral_radius"] is None
    # beta has no event files, so TensorBoard does not know it as a run: clear 404.
    assert "unknown run" in get_json(c, f"{P}/labels?run=beta&layer=net.0", 404)["error"]


def test_labels_fall_back_to_store(tmp_path, logdir, monkeypatch):
    c = make_client(logdir)
    from trajscope_tensorboard import plugin as plugin_mod
    monkeypatch.setattr(plugin_mod.TrajscopePlugin, "_label_series", lambda self, request: {})
    d = get_json(c, f"{P}/labels?run=alpha&layer=net.2")
    assert d["source"] == "analysis.zarr"
    np.testing.assert_array_equal(unpack(d["labels"]).T, open_results(logdir / "alpha").node("net.2", "label"))


def test_other_format_version_is_409(tmp_path, logdir):
    d = tmp_path / "logs"
    shutil.copytree(logdir, d)
    root = zarr.open_group(str(d / "alpha" / "analysis.zarr"), mode="r+")
    root.attrs["trajscope_format"] = {"name": "trajscope.analysis", "version": 99}
    c = make_client(d)
    alpha = {r["name"]: r for r in get_json(c, f"{P}/runs")["runs"]}["alpha"]
    assert alpha["results"] is False and "version 99" in alpha["results_error"]
    err = get_json(c, f"{P}/node?run=alpha&layer=net.0&node=0", 409)
    assert "version 99" in err["error"]


def test_internal_error_is_json_500_without_trace(client, monkeypatch):
    from trajscope_tensorboard import plugin as plugin_mod

    def boom(self, request):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(plugin_mod.TrajscopePlugin, "_label_series", boom)
    d = get_json(client, f"{P}/runs", 500)
    assert d["error"] == "internal error in the trajscope plugin: RuntimeError: kaput"


def test_loader_keeps_every_step():
    loader = TrajscopeLoader()
    for given, want in (({}, {"trajscope": 0}), ("images=5", {"images": 5, "trajscope": 0}),
                        ({"trajscope": 7}, {"trajscope": 7})):
        flags = argparse.Namespace(samples_per_plugin=given)
        loader.fix_flags(flags)
        assert flags.samples_per_plugin == want
    loader.fix_flags(argparse.Namespace())  # no such flag: nothing to do


def test_plugin_imports_no_torch():
    code = ("import sys, trajscope_tensorboard.loader, trajscope_tensorboard.plugin, trajscope.results; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_model_that_is_one_layer_with_uncomputed_labels(tmp_path):
    from plugin_fixtures import synthetic_run, write_run

    data = synthetic_run(5, layers={"": 3}, n_steps=4)  # module name "": the model is one Linear
    for step in data["nodes"]:
        step[""]["label"][:] = 255  # kinematics only: labels not computed
    write_run(tmp_path / "logs" / "lin", data)
    c = make_client(tmp_path / "logs")
    run = get_json(c, f"{P}/runs")["runs"][0]
    assert run["layers"] == [{"name": "", "nodes": 3, "labels": True, "metrics": True}]
    d = get_json(c, f"{P}/labels?run=lin&layer=")
    assert (unpack(d["labels"]) == 255).all()
    stab = get_json(c, f"{P}/stability?run=lin")
    assert all(v == 0 for name in LABELS for v in stab["layers"][0]["fractions"][name])
    assert get_json(c, f"{P}/node?run=lin&layer=&node=2")["series"]["label"] == [255] * 4
