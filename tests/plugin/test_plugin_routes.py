"""The TensorBoard plugin's routes through a WSGI test client.

The contract tests run on a real run: recorded with ``trajscope.Recorder`` and analysed with
``trajscope.analyze`` (``tests.helpers.plugin.real_logdir``); every answer must equal what
``trajscope.io.results.open_results`` and the run's event files hold. The synthetic logdir
(``tests.helpers.plugin.build_logdir``) covers what a small real run cannot show: every label in one
layer, dotted module names, a zero-norm node (NaN ρ and drift), a one-layer model, labels not
computed.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import zarr
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from werkzeug.test import Client

from tests.helpers.plugin import (
    DEAD_UNIT,
    LAYERS,
    N_STEPS,
    REAL_LAYERS,
    REAL_RUN,
    REAL_STEPS,
    RUNS,
    SYNTH_WARNING,
    build_logdir,
    event_labels,
    read_events,
    real_logdir,
)
from tests.helpers.scripts import run_script
from trajscope.io.results import LABELS, open_results
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
def real(tmp_path_factory) -> Path:
    """Logdir of the recorded and analysed run ``REAL_RUN`` (shared by the session: read only)."""
    return real_logdir(tmp_path_factory)


@pytest.fixture(scope="module")
def res(real):
    return open_results(real / REAL_RUN)


@pytest.fixture(scope="module")
def events(real):
    return read_events(real / REAL_RUN)


@pytest.fixture(scope="module")
def client(real):
    return make_client(real)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """The synthetic logdir (runs alpha and beta)."""
    return build_logdir(tmp_path_factory.mktemp("routes"))


@pytest.fixture(scope="module")
def synth_client(logdir):
    return make_client(logdir)


def get_json(client: Client, url: str, status: int = 200) -> dict:
    r = client.get(url)
    assert r.status_code == status, (url, r.status_code, r.get_data(as_text=True)[:500])
    assert r.mimetype == "application/json", (url, r.mimetype)
    return json.loads(r.get_data(as_text=True))


def unpack(packed: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(packed["data"]), dtype=np.dtype(packed["dtype"]).newbyteorder("<")).reshape(
        packed["shape"]
    )


def nan_to_none(a: np.ndarray) -> list:
    return [None if not np.isfinite(x) else pytest.approx(float(x), rel=1e-6) for x in np.asarray(a, np.float64)]


def copy_run(src: Path, dst: Path, store: bool = True, events: bool = True) -> Path:
    """A run folder with only its analysis.zarr and/or event files (no trajectory)."""
    dst.mkdir(parents=True)
    if store:
        shutil.copytree(src / "analysis.zarr", dst / "analysis.zarr")
    if events:
        for f in src.glob("events.out.tfevents.*"):
            shutil.copy2(f, dst / f.name)
    return dst


# -- contract: a real run, recorded and analysed ------------------------------------------------


def test_real_run_is_what_the_tests_expect(res, events):
    """The fixture itself: every step but the last analysed, more than one label, the dead unit a plateau."""
    assert res.layers == REAL_LAYERS and len(res) == REAL_STEPS - 1
    assert res.steps.tolist() == list(range(REAL_STEPS - 1))
    labels = np.concatenate([res.node(m, "label") for m in res.layers], axis=1)
    assert len(np.unique(labels)) >= 3 and labels.max() < len(LABELS)
    assert (res.node("0", "label")[:, DEAD_UNIT] == LABELS.index("plateau")).all()
    label_tags = {t for t in events.Tags()["tensors"] if t.endswith("/labels")}
    assert label_tags == {f"trajscope/{m}/labels" for m in REAL_LAYERS}


def test_runs(client, res, events):
    d = get_json(client, f"{P}/runs")
    assert [r["name"] for r in d["runs"]] == [REAL_RUN]
    r = d["runs"][0]
    assert r["results"] and r["results_error"] is None
    assert r["warnings"] == []  # a faithful SGD replay: nothing to warn about
    assert r["steps"] == len(res) and r["max_step"] == int(res.steps[-1]) == event_labels(events, "0")[0][-1]
    assert [(l["name"], l["nodes"], l["labels"], l["metrics"]) for l in r["layers"]] == [
        (m, n, True, True) for m, n in res.layers.items()
    ]
    assert d["label_names"] == list(res.label_names)


@pytest.mark.parametrize("layer", REAL_LAYERS)
def test_labels_match_store_and_events(client, res, events, layer):
    n, k = res.layers[layer], len(res)
    d = get_json(client, f"{P}/labels?run={REAL_RUN}&layer={layer}")
    assert d["source"] == "events" and d["nodes"] == n and d["label_names"] == list(res.label_names)
    ev_steps, ev_labels = event_labels(events, layer)
    assert d["steps"] == res.steps.tolist() == ev_steps
    labels = unpack(d["labels"])
    assert labels.shape == (n, k) and labels.dtype == np.uint8  # node-major
    np.testing.assert_array_equal(labels.T, res.node(layer, "label"))
    np.testing.assert_array_equal(labels.T, ev_labels)
    content = json.loads(events.SummaryMetadata(f"trajscope/{layer}/labels").plugin_data.content)
    assert content["labels"] == d["label_names"] and content["nodes"] == n
    s = get_json(client, f"{P}/labels?run={REAL_RUN}&layer={layer}&kind=stable_label")
    assert s["source"] == "analysis.zarr" and s["steps"] == res.steps.tolist()
    np.testing.assert_array_equal(unpack(s["labels"]).T, res.node(layer, "stable_label"))


def test_node_series(client, res, events):
    for layer, node in (("0", 0), ("0", DEAD_UNIT), ("0", 15), ("2", 11), ("4", 2)):
        d = get_json(client, f"{P}/node?run={REAL_RUN}&layer={layer}&node={node}")
        assert d["steps"] == res.steps.tolist() and d["node"] == node and d["layer"] == layer
        assert d["label_names"] == list(res.label_names)
        assert list(d["series"]) == res.metrics(layer)
        for metric in res.metrics(layer):
            assert d["series"][metric] == nan_to_none(res.node_series(layer, metric, node)), (layer, node, metric)
        assert d["series"]["label"] == event_labels(events, layer)[1][:, node].tolist()


def test_step(client, res):
    last = len(res) - 1
    for layer, url, index in (
        ("0", f"{P}/step?run={REAL_RUN}&layer=0&index=3", 3),
        ("2", f"{P}/step?run={REAL_RUN}&layer=2&step={int(res.steps[5])}", 5),
        ("0", f"{P}/step?run={REAL_RUN}&layer=0", last),
        ("4", f"{P}/step?run={REAL_RUN}&layer=4&index=-1", last),
    ):
        d = get_json(client, url)
        assert d["index"] == index and d["step"] == int(res.steps[index]) and d["nodes"] == res.layers[layer]
        assert d["steps"] == res.steps.tolist() and list(d["metrics"]) == res.metrics(layer)
        for metric in res.metrics(layer):
            want = res.node(layer, metric, index)
            got = unpack(d["metrics"][metric])
            assert got.dtype.kind == want.dtype.kind, metric
            np.testing.assert_array_equal(got, want, err_msg=metric)


def test_stability(client, res, events):
    d = get_json(client, f"{P}/stability?run={REAL_RUN}")
    g = d["global"]
    assert g["source"] == "analysis.zarr" and g["steps"] == res.steps.tolist()
    assert list(g["series"]) == res.global_names
    for name in res.global_names:
        assert g["series"][name] == nan_to_none(res.global_series(name)), name
        ev = events.Scalars(f"trajscope/global/{name}")  # the event files hold the same series
        assert [e.step for e in ev] == g["steps"]
        np.testing.assert_allclose([e.value for e in ev], g["series"][name], rtol=1e-6)
    assert d["label_names"] == list(res.label_names)
    assert [l["name"] for l in d["layers"]] == list(res.layers)
    for entry in d["layers"]:
        m = entry["name"]
        labels = res.node(m, "label")
        assert entry["steps"] == res.steps.tolist() and entry["nodes"] == res.layers[m]
        for code, name in enumerate(res.label_names):
            np.testing.assert_allclose(entry["fractions"][name], (labels == code).mean(axis=1))
            np.testing.assert_allclose(
                entry["fractions"][name], [e.value for e in events.Scalars(f"trajscope/{m}/frac/{name}")], rtol=1e-6
            )
        r = res.node(m, "spectral_radius").astype(np.float64)
        assert entry["max_spectral_radius"]["steps"] == res.steps.tolist()
        np.testing.assert_allclose(entry["max_spectral_radius"]["values"], np.nanmax(r, axis=1), rtol=1e-6)


def test_run_with_only_events_or_only_store(tmp_path, real, res):
    """Fallbacks on real output: labels and global series from the event files, or nothing without them."""
    d = tmp_path / "logs"
    copy_run(real / REAL_RUN, d / "events_only", store=False)
    copy_run(real / REAL_RUN, d / "store_only", events=False)
    c = make_client(d)
    runs = {r["name"]: r for r in get_json(c, f"{P}/runs")["runs"]}
    assert list(runs) == ["events_only"]  # no event files: TensorBoard does not know the run
    assert runs["events_only"]["results"] is False and runs["events_only"]["steps"] is None
    assert [(l["name"], l["nodes"], l["metrics"]) for l in runs["events_only"]["layers"]] == [
        (m, n, False) for m, n in sorted(res.layers.items())
    ]
    lab = get_json(c, f"{P}/labels?run=events_only&layer=0")
    assert lab["source"] == "events" and lab["steps"] == res.steps.tolist()
    np.testing.assert_array_equal(unpack(lab["labels"]).T, res.node("0", "label"))
    assert "analysis.zarr" in get_json(c, f"{P}/node?run=events_only&layer=0&node=0", 404)["error"]
    assert "analysis.zarr" in get_json(c, f"{P}/step?run=events_only&layer=0", 404)["error"]
    stab = get_json(c, f"{P}/stability?run=events_only")
    assert stab["global"]["source"] == "events" and stab["global"]["steps"] == res.steps.tolist()
    for name in res.global_names:
        np.testing.assert_allclose(stab["global"]["series"][name], res.global_series(name), rtol=1e-6)
    assert all(l["max_spectral_radius"] is None for l in stab["layers"])
    assert "unknown run" in get_json(c, f"{P}/labels?run=store_only&layer=0", 404)["error"]


def test_labels_fall_back_to_store(client, res, monkeypatch):
    from trajscope_tensorboard import plugin as plugin_mod

    monkeypatch.setattr(plugin_mod.TrajscopePlugin, "_label_series", lambda self, request: {})
    d = get_json(client, f"{P}/labels?run={REAL_RUN}&layer=2")
    assert d["source"] == "analysis.zarr" and d["steps"] == res.steps.tolist()
    np.testing.assert_array_equal(unpack(d["labels"]).T, res.node("2", "label"))


def test_other_format_version_is_409(tmp_path, real):
    d = tmp_path / "logs"
    copy_run(real / REAL_RUN, d / REAL_RUN)
    root = zarr.open_group(str(d / REAL_RUN / "analysis.zarr"), mode="r+")
    root.attrs["trajscope_format"] = {"name": "trajscope.analysis", "version": 99}
    c = make_client(d)
    run = get_json(c, f"{P}/runs")["runs"][0]
    assert run["results"] is False and "version 99" in run["results_error"]
    err = get_json(c, f"{P}/node?run={REAL_RUN}&layer=0&node=0", 409)
    assert "version 99" in err["error"]


# -- what only the synthetic logdir shows --------------------------------------------------------


def test_synthetic_every_label_dotted_names_and_nan(synth_client, logdir):
    """Every label in one layer, dotted module names, and a zero-norm node whose ρ/drift are NaN."""
    runs = get_json(synth_client, f"{P}/runs")["runs"]
    assert [r["name"] for r in runs] == list(RUNS)
    assert all(r["warnings"] == [SYNTH_WARNING] for r in runs)  # the analysis' WARNING lines, for the banner
    d = get_json(synth_client, f"{P}/labels?run=alpha&layer=net.2")
    assert set(np.unique(unpack(d["labels"]))) == {0, 1, 2, 3}
    for run in RUNS:
        res = open_results(logdir / run)
        for layer, n in LAYERS.items():
            d = get_json(synth_client, f"{P}/labels?run={run}&layer={layer}")
            assert d["source"] == "events" and unpack(d["labels"]).shape == (n, N_STEPS)
            np.testing.assert_array_equal(unpack(d["labels"]).T, res.node(layer, "label"))
    res = open_results(logdir / "alpha")
    dead = get_json(synth_client, f"{P}/node?run=alpha&layer=net.0&node=7")  # NaN comes back as null
    assert all(v is None for v in dead["series"]["rho"]) and all(v is None for v in dead["series"]["drift"])
    assert dead["series"]["hess_max"] == nan_to_none(res.node_series("net.0", "hess_max", 7))
    stab = get_json(synth_client, f"{P}/stability?run=alpha")
    np.testing.assert_allclose(
        stab["layers"][0]["max_spectral_radius"]["values"],
        np.nanmax(res.node("net.0", "spectral_radius"), axis=1),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "url, status, needle",
    [
        (f"{P}/labels?run=nope&layer=0", 404, "unknown run 'nope'"),
        (f"{P}/labels?run={REAL_RUN}&layer=9", 404, "unknown layer '9'"),
        (f"{P}/node?run={REAL_RUN}&layer=nope&node=0", 404, "unknown layer"),
        (f"{P}/step?run=nope&layer=0", 404, "unknown run"),
        (f"{P}/stability?run=nope", 404, "unknown run"),
        (f"{P}/labels?layer=0", 400, "missing query parameter 'run'"),
        (f"{P}/node?run={REAL_RUN}&layer=0", 400, "missing query parameter 'node'"),
        (f"{P}/node?run={REAL_RUN}&layer=0&node=x", 400, "must be an integer"),
        (f"{P}/node?run={REAL_RUN}&layer=0&node={REAL_LAYERS['0']}", 400, "out of range"),
        (f"{P}/step?run={REAL_RUN}&layer=0&index=99", 400, "out of range"),
        (f"{P}/step?run={REAL_RUN}&layer=0&step={REAL_STEPS - 1}", 404, f"step {REAL_STEPS - 1} was not analysed"),
        (f"{P}/labels?run={REAL_RUN}&layer=0&kind=bogus", 400, "kind must be"),
        (f"{P}/labels?run=..%2F..&layer=0", 404, "unknown run"),
    ],
)
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


@pytest.mark.parametrize(
    "path",
    [
        "/static/../plugin.py",
        "/static/%2e%2e/plugin.py",
        "/static/..%2Fplugin.py",
        "/static/%2e%2e%2f__init__.py",
        "/static//etc/passwd",
        "/static/",
        "/static/nope.js",
        "/static/./index.js/../../loader.py",
    ],
)
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


def test_internal_error_is_json_500_without_trace(client, monkeypatch):
    from trajscope_tensorboard import plugin as plugin_mod

    def boom(self, request):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(plugin_mod.TrajscopePlugin, "_label_series", boom)
    d = get_json(client, f"{P}/runs", 500)
    assert d["error"] == "internal error in the trajscope plugin: RuntimeError: kaput"


def test_loader_keeps_every_step():
    loader = TrajscopeLoader()
    for given, want in (
        ({}, {"trajscope": 0}),
        ("images=5", {"images": 5, "trajscope": 0}),
        ({"trajscope": 7}, {"trajscope": 7}),
    ):
        flags = argparse.Namespace(samples_per_plugin=given)
        loader.fix_flags(flags)
        assert flags.samples_per_plugin == want
    loader.fix_flags(argparse.Namespace())  # no such flag: nothing to do


def test_plugin_imports_no_torch():
    run_script(Path(__file__).parent / "no_torch_plugin.py", check=True, timeout=60, capture_output=False)


def test_model_that_is_one_layer_with_uncomputed_labels(tmp_path):
    from tests.helpers.plugin import synthetic_run, write_run

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
