"""analysis.zarr (docs/spec.md §9): schema, round trip, append-only commits, interruption, versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.helpers.plugin import LAYERS, N_STEPS, synthetic_run, write_run
from tests.helpers.scripts import run_script
from trajscope.errors import TrajscopeError
from trajscope.io.results import GLOBAL, LABELS, NODE_FLOAT, NODE_INT, NODE_U8, UNSET_U8, group_name, open_results
from trajscope.io.resultswriter import ResultsWriter


@pytest.fixture(scope="module")
def data():
    return synthetic_run(seed=3)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    return write_run(tmp_path_factory.mktemp("res") / "run", data)


def test_schema_with_plain_zarr(run):
    root = zarr.open_group(str(run / "analysis.zarr"), mode="r")
    assert root.metadata.zarr_format == 3
    k = N_STEPS
    assert root["steps"].shape == (k,) and root["steps"].dtype == np.int64
    for name in GLOBAL:
        a = root[f"global/{name}"]
        assert a.shape == (k,) and a.dtype.kind == "f"
    for module, n in LAYERS.items():
        g = root[f"nodes/{module}"]  # dotted module names are group names as they are
        for m in NODE_FLOAT:
            assert g[m].shape == (k, n) and g[m].dtype == np.float32, m
        for m in NODE_INT:
            assert g[m].shape == (k, n) and g[m].dtype == np.int32, m
        for m in ("label", "stable_label"):
            assert g[m].shape == (k, n) and g[m].dtype == np.uint8, m
        assert tuple(g["label"].metadata.dimension_names) == ("step", "node")
    attrs = dict(root.attrs)
    assert attrs["labels"] == list(LABELS)
    for key in ("thresholds", "semantics", "curvature", "optimizer", "trajscope_version"):
        assert key in attrs
    assert attrs["trajscope_format"]["version"] == 1
    assert attrs["committed"] == k


def test_round_trip(run, data):
    res = open_results(run)
    assert res.steps.tolist() == data["steps"]
    assert res.layers == LAYERS
    assert res.label_names == LABELS
    for name in GLOBAL + ("n_hvp",):
        want = [g[name] for g in data["global"]]
        np.testing.assert_allclose(res.global_series(name), want)
    for module in LAYERS:
        for m in NODE_FLOAT + NODE_INT + NODE_U8:
            want = np.stack([step[module][m] for step in data["nodes"]])
            np.testing.assert_array_equal(res.node(module, m), want, err_msg=m)
        np.testing.assert_array_equal(res.node(module, "rho", 4), data["nodes"][4][module]["rho"])
        np.testing.assert_array_equal(
            res.node(module, "label", slice(2, 5)), np.stack([s[module]["label"] for s in data["nodes"][2:5]])
        )
        np.testing.assert_array_equal(res.node(module, "label", -1), data["nodes"][-1][module]["label"])
    with pytest.raises(KeyError, match="unknown layer"):
        res.node("nope", "rho")
    with pytest.raises(IndexError):
        res.node("net.0", "rho", N_STEPS)


def _nodes(n_by_layer, k, **over):
    return {
        m: {"label": np.full(n, k % 4, np.uint8), "rho": np.full(n, 1.0 + k, np.float32), **over}
        for m, n in n_by_layer.items()
    }


def test_append_only_incremental(tmp_path):
    layers = {"fc1": 3, "fc2": 2}
    with ResultsWriter(tmp_path, {"labels": list(LABELS)}, layers) as w:
        for k in range(40):  # crosses the capacity block
            w.append(10 * k, {"loss": float(k)}, _nodes(layers, k))
        with pytest.raises(ValueError, match="append-only"):
            w.append(390, {"loss": 0.0}, _nodes(layers, 0))
        with pytest.raises(ValueError, match="shape"):
            w.append(400, {"loss": 0.0}, {"fc1": {"rho": np.zeros(4)}, "fc2": {}})
    assert open_results(tmp_path).steps.tolist() == [10 * k for k in range(40)]
    # Reopen and continue: the committed rows stay, new ones append; an extra global appears.
    w = ResultsWriter(tmp_path, {"labels": list(LABELS), "note": "second"}, layers)
    assert w.steps == [10 * k for k in range(40)]
    w.append(400, {"loss": 40.0, "precond_sharpness": 3.0}, _nodes(layers, 40))
    w.close()
    res = open_results(tmp_path)
    assert len(res) == 41 and res.steps[-1] == 400
    assert res.attrs["note"] == "second"
    np.testing.assert_array_equal(res.global_series("loss"), np.arange(41.0))
    ps = res.global_series("precond_sharpness")
    assert np.isnan(ps[:40]).all() and ps[40] == 3.0
    assert res.node("fc1", "rho")[:, 0].tolist() == [1.0 + k for k in range(41)]
    # Missing metrics read as "not computed".
    assert np.isnan(res.node("fc2", "hess_max")).all()
    assert (res.node("fc2", "stable_label") == UNSET_U8).all()
    assert (res.node("fc2", "null_dims") == -1).all()
    # Plain zarr sees exact shapes after close.
    root = zarr.open_group(str(tmp_path / "analysis.zarr"), mode="r")
    assert root["nodes/fc1/rho"].shape == (41, 3)


@pytest.mark.parametrize("expected,appended", [(5, 5), (5, 3), (2, 7)])
def test_expected_rows_size_the_arrays_once(tmp_path, expected, appended):
    """Arrays made ``expected`` long at creation (and on reopening) end exactly as long as the
    committed rows, whether fewer or more checkpoints arrive."""
    layers = {"fc": 3}
    for start in (0, appended):  # create, then reopen and append again
        with ResultsWriter(tmp_path, {}, layers, expected=expected) as w:
            for k in range(start, start + appended):
                w.append(k, {"loss": float(k)}, _nodes(layers, k))
    res = open_results(tmp_path)
    assert res.steps.tolist() == list(range(2 * appended))
    np.testing.assert_array_equal(res.global_series("loss"), np.arange(2.0 * appended))
    root = zarr.open_group(str(tmp_path / "analysis.zarr"), mode="r")
    assert root["nodes/fc/rho"].shape == (2 * appended, 3) and root["steps"].shape == (2 * appended,)


def test_interrupted_write_is_invisible(tmp_path, monkeypatch):
    layers = {"fc": 4}
    w = ResultsWriter(tmp_path, {}, layers)
    w.flush_every = 1  # commit every row, so the marker is exercised per row
    for k in range(3):
        w.append(k, {"loss": 1.0}, _nodes(layers, k))

    def killed(self, n):  # every chunk of the row is written, the marker is not
        raise KeyboardInterrupt

    monkeypatch.setattr(ResultsWriter, "_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        w.append(3, {"loss": 99.0}, _nodes(layers, 3))
    monkeypatch.undo()
    res = open_results(tmp_path)  # a reader while (or after) the analysis died
    assert res.steps.tolist() == [0, 1, 2]
    assert res.node("fc", "rho").shape == (3, 4)
    assert res.global_series("loss").tolist() == [1.0, 1.0, 1.0]
    # A new analysis resumes after the last committed row and overwrites the half row.
    w2 = ResultsWriter(tmp_path, {}, layers)
    assert w2.steps == [0, 1, 2]
    w2.append(3, {"loss": 2.0}, _nodes(layers, 3))
    w2.close()
    assert open_results(tmp_path).global_series("loss").tolist() == [1.0, 1.0, 1.0, 2.0]


def test_killed_process_leaves_committed_rows(tmp_path):
    run_script(Path(__file__).parent / "killed_writer.py", str(tmp_path), check=True, timeout=60, capture_output=False)
    res = open_results(tmp_path)
    assert res.steps.tolist() == [0, 1, 2, 3, 4]
    assert res.node("fc", "rho").shape == (5, 4)


def test_refuses_other_version_and_layers(tmp_path):
    w = ResultsWriter(tmp_path, {}, {"fc": 4})
    w.append(0, {"loss": 1.0}, _nodes({"fc": 4}, 0))
    w.close()
    with pytest.raises(TrajscopeError, match="layers"):
        ResultsWriter(tmp_path, {}, {"fc": 5})
    root = zarr.open_group(str(tmp_path / "analysis.zarr"), mode="r+")
    root.attrs["trajscope_format"] = {"name": "trajscope.analysis", "version": 99}
    for attempt in (lambda: ResultsWriter(tmp_path, {}, {"fc": 4}), lambda: open_results(tmp_path)):
        with pytest.raises(TrajscopeError, match="version 99") as err:
            attempt()
        assert "\n" not in str(err.value)


def test_missing_store_is_one_line_error(tmp_path):
    with pytest.raises(TrajscopeError, match="trajscope analyze"):
        open_results(tmp_path / "nothing")


def test_no_torch_import():
    run_script(Path(__file__).parent / "no_torch_results.py", check=True, timeout=60, capture_output=False)


def test_the_public_path_keeps_its_names(run):
    """``trajscope.results`` (documented) names what it named before the layout moved, and reads a run."""
    import trajscope.results as public
    from trajscope.io import results as fmt
    from trajscope.io import resultswriter

    assert set(public.__all__) == {
        "LABELS", "NODE_FLOAT", "NODE_INT", "NODE_U8", "NODE_METRICS", "GLOBAL", "FORMAT_NAME", "FORMAT_VERSION",
        "STORE_NAME", "UNSET_U8", "UNSET_INT", "ResultsWriter", "Results", "open_results", "results_exist",
        "discard_partial_stores", "group_name",
    }  # fmt: skip
    for name in public.__all__:
        assert getattr(public, name) is getattr(resultswriter if name == "ResultsWriter" else fmt, name), name
    res = public.open_results(run)
    assert isinstance(res, public.Results) and public.results_exist(run)
    assert list(res.steps) == list(fmt.open_results(run).steps)


def test_xarray_style_dimension_names(run):
    root = zarr.open_group(str(run / "analysis.zarr"), mode="r")
    assert tuple(root["steps"].metadata.dimension_names) == ("step",)
    assert tuple(root["global/loss"].metadata.dimension_names) == ("step",)


def test_module_names_zarr_cannot_hold(tmp_path):
    layers = {"": 2, "blocks.0.fc": 1, "odd/name%": 1}  # "" = the model itself is one layer
    assert [group_name(m) for m in layers] == ["%root", "blocks.0.fc", "odd%2Fname%25"]
    with ResultsWriter(tmp_path, {}, layers) as w:
        w.append(0, {"loss": 1.0}, _nodes(layers, 2))
    res = open_results(tmp_path)
    assert res.layers == layers
    assert res.node("", "label").tolist() == [[2, 2]]
    assert res.node("odd/name%", "rho").tolist() == [[3.0]]
    assert (tmp_path / "analysis.zarr" / "nodes" / "%root" / "label").is_dir()
