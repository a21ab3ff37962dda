"""TensorBoard event files (docs/spec.md §9) read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from tests.helpers.plugin import LAYERS, N_STEPS, synthetic_run, write_run
from trajscope.io.results import LABELS
from trajscope.io.tbevents import HIST_METRICS, EventWriter, histogram_bins


@pytest.fixture(scope="module")
def data():
    return synthetic_run(seed=1)


@pytest.fixture(scope="module")
def acc(tmp_path_factory, data):
    run = write_run(tmp_path_factory.mktemp("ev") / "run", data)
    a = ea.EventAccumulator(str(run), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    a.Reload()
    return a


def test_every_tag_present(acc):
    tags = acc.Tags()
    want_scalars = {f"trajscope/global/{n}" for n in ("loss", "sharpness", "threshold")}
    want_scalars |= {f"trajscope/{m}/frac/{lab}" for m in LAYERS for lab in LABELS}
    assert want_scalars <= set(tags["scalars"])
    assert {f"trajscope/{m}/{h}" for m in LAYERS for h in HIST_METRICS} == set(tags["histograms"])
    assert {f"trajscope/{m}/labels" for m in LAYERS} <= set(tags["tensors"])
    assert "custom_scalars__config__" in tags["tensors"]


def test_scalars(acc, data):
    for name in ("loss", "sharpness", "threshold", "n_hvp"):
        ev = acc.Scalars(f"trajscope/global/{name}")
        assert [e.step for e in ev] == data["steps"]
        np.testing.assert_allclose([e.value for e in ev], [g[name] for g in data["global"]], rtol=1e-6)
    for module, n in LAYERS.items():
        for code, lab in enumerate(LABELS):
            ev = acc.Scalars(f"trajscope/{module}/frac/{lab}")
            want = [float((s[module]["label"] == code).sum()) / n for s in data["nodes"]]
            np.testing.assert_allclose([e.value for e in ev], want, rtol=1e-6)


def test_histograms(acc, data):
    for module in LAYERS:
        for metric in HIST_METRICS:
            ev = acc.Histograms(f"trajscope/{module}/{metric}")
            assert [e.step for e in ev] == data["steps"], (module, metric)
            for e, s in zip(ev, data["nodes"]):
                v = s[module][metric].astype(np.float64)
                f = v[np.isfinite(v)]  # the dead node's NaN ρ/drift are skipped
                h = e.histogram_value
                limits, counts = histogram_bins(v)
                assert h.num == f.size and sum(h.bucket) == f.size
                assert list(h.bucket) == counts.tolist()
                np.testing.assert_allclose(h.bucket_limit, limits)
                assert h.min == pytest.approx(f.min()) and h.max == pytest.approx(f.max())
                assert h.sum == pytest.approx(f.sum(), rel=1e-6)


def test_label_tensors(acc, data):
    for module, n in LAYERS.items():
        tag = f"trajscope/{module}/labels"
        ev = acc.Tensors(tag)
        assert [e.step for e in ev] == data["steps"]
        for e, s in zip(ev, data["nodes"]):
            arr = tensor_util.make_ndarray(e.tensor_proto)
            assert arr.dtype == np.uint8 and arr.shape == (n,)
            np.testing.assert_array_equal(arr, s[module]["label"])
        meta = acc.SummaryMetadata(tag)
        assert meta.plugin_data.plugin_name == "trajscope"
        assert meta.data_class == summary_pb2.DATA_CLASS_TENSOR
        content = json.loads(meta.plugin_data.content)
        assert content["version"] == 1 and content["labels"] == list(LABELS) and content["nodes"] == n


def test_custom_scalars_layout(acc):
    ev = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(ev[0].tensor_proto).item())
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    overlay = charts["sharpness vs stability threshold"].multiline.tag
    for tag in ("trajscope/global/sharpness", "trajscope/global/threshold"):
        assert any(re.match(rx, tag) for rx in overlay), tag
    assert not any(re.match(rx, "trajscope/global/loss") for rx in overlay)
    frac = charts["net.0 label fractions"].multiline.tag
    assert any(re.match(rx, "trajscope/net.0/frac/plateau") for rx in frac)
    assert not any(re.match(rx, "trajscope/netX0/frac/plateau") for rx in frac)  # dots escaped


def test_nan_safe(tmp_path):
    w = EventWriter(tmp_path, ["fc"])
    nan = np.full(4, np.nan, np.float32)
    w.write(
        0,
        {"loss": float("nan"), "sharpness": 1.0, "threshold": 2.0},
        {
            "fc": {
                "label": np.array([0, 1, 2, 3], np.uint8),
                "rho": nan,
                "drift": np.array([np.nan, np.inf, 0.5, 0.5], np.float32),
                "param_norm": np.full(4, 2.0, np.float32),
            }
        },
    )
    w.close()
    a = ea.EventAccumulator(str(tmp_path), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    a.Reload()
    tags = a.Tags()
    assert "trajscope/fc/rho" not in tags["histograms"]  # all-NaN: no histogram
    assert "trajscope/global/loss" not in tags["scalars"]  # non-finite scalar skipped
    d = a.Histograms("trajscope/fc/drift")[0].histogram_value
    assert d.num == 2 and sum(d.bucket) == 2
    p = a.Histograms("trajscope/fc/param_norm")[0].histogram_value  # constant values
    assert p.num == 4 and p.min == p.max == 2.0
    assert [e.value for e in a.Scalars("trajscope/fc/frac/source")] == [0.25]


def test_diverging_values(tmp_path):
    w = EventWriter(tmp_path, ["fc"])
    huge = np.array([-1.7e308, 1.7e308, 3.0, np.inf], np.float64)  # max - min overflows
    tiny = np.array([1e30, 1e30 * (1 + 1e-16), 1e30], np.float64)  # range below float resolution
    w.write(0, {}, {"fc": {"hess_max": huge, "param_norm": tiny}})
    w.close()
    a = ea.EventAccumulator(str(tmp_path), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    a.Reload()
    h = a.Histograms("trajscope/fc/hess_max")[0].histogram_value
    assert h.num == 3 and sum(h.bucket) == 3 and h.max == 1.7e308
    assert sum(a.Histograms("trajscope/fc/param_norm")[0].histogram_value.bucket) == 3


def test_all_steps_kept(acc):
    assert len(acc.Tensors("trajscope/net.2/labels")) == N_STEPS


def _write_labels(run_dir, steps, code: int) -> None:
    with EventWriter(run_dir, ["fc"]) as w:
        for s in steps:
            w.write(s, {"loss": float(code)}, {"fc": {"label": np.full(3, code, np.uint8)}})


def test_reanalysis_event_files_sort_in_creation_order(tmp_path, monkeypatch):
    """Regression: two analyses of one run in one second, the writer counter going from 9 to 10.

    TensorBoard reads a run's event files in name order and the later value of a step wins. The
    names differ only in that counter, compared as text ("….10" < "….9"), so the re-analysis
    (all 3s) sorted first and TensorBoard showed the stale first analysis (all 0s) for steps 0-2.
    """
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer._global_uid, "_value", 9)
    _write_labels(tmp_path, [0, 1, 2], code=0)
    first = {p.name for p in tmp_path.iterdir()}
    _write_labels(tmp_path, [0, 1, 2, 3], code=3)  # analysis.zarr deleted, the run analysed again
    second = {p.name for p in tmp_path.iterdir()} - first
    assert sorted(first | second) == sorted(first) + sorted(second), (first, second)
    a = ea.EventAccumulator(str(tmp_path), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    a.Reload()
    ev = a.Tensors("trajscope/fc/labels")
    assert [e.step for e in ev] == [0, 1, 2, 0, 1, 2, 3]  # files read in creation order
    last = {e.step: tensor_util.make_ndarray(e.tensor_proto).tolist() for e in ev}  # the plugin: last wins
    assert last == {s: [3, 3, 3] for s in range(4)}
    assert [(e.step, e.value) for e in a.Scalars("trajscope/global/loss")][-4:] == [(s, 3.0) for s in range(4)]


def test_event_file_from_the_future_warns_instead_of_waiting(tmp_path):
    import time

    (tmp_path / f"events.out.tfevents.{int(time.time()) + 3600:010d}.host.1.0").write_bytes(b"")
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="clock skew"):
        EventWriter(tmp_path, ["fc"]).close()
    assert time.monotonic() - t0 < 10.0  # not the hour the file name asks for
