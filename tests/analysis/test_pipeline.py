"""End-to-end tests of ``trajscope.analyze``: record a real run with trajscope.Recorder, analyse it,
and check the results against closed forms and independent references (docs/spec.md §3–§9).

Every reference here is computed independently of the analysis code: closed-form linear
regression spectra, ``torch.func.hessian`` / ``jacrev`` of the loss over the recorded
parameters, norms of the recorded parameters. Exact comparisons use float64 runs and
``dtype="float64"`` analyses; node metrics are stored as float32 (docs/spec.md §9), hence the
relative tolerances of ~1e-6 on them.
"""

from __future__ import annotations

import math
import re
import shutil

import numpy as np
import pytest
import torch
import zarr
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util
from torch import nn
from torch.func import functional_call, hessian, jacrev

import trajscope
from tests.helpers.analysis import (
    F64,
    batches,
    event_files,
    flat_index,
    linear_spec,
    make_linear,
    make_mlp,
    mlp_spec,
    node_rows,
    reason_code,
    record,
    simple_run,
    store_arrays,
    store_snapshot,
    tree_digest,
)

LABEL = {"healthy_sink": 0, "degenerate_sink": 1, "plateau": 2, "source": 3}


def only(results: dict):
    assert len(results) == 1, results
    return next(iter(results.values()))


def loss_of_flat(model: nn.Module, params: dict[str, torch.Tensor], names: list[str], x, y, loss_fn):
    """L as a function of the flattened parameters ``names`` (the others fixed)."""
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def f(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        p = {**params, **{n: t.reshape(s) for n, t, s in zip(names, pieces, shapes)}}
        return loss_fn(functional_call(model, p, (x,)), y)

    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    return f, flat0


# =========================================================================== 1. closed-form linear regression
# Linear regression y ≈ Ã θ on B = 8 samples with orthogonal, zero-mean columns: the loss Hessian
# H = (2/B) ÃᵀÃ of MSELoss (mean over B samples, one output) is diagonal with eigenvalues
# 2 s_k² / B = (4, 2.25, 1.5625) for the weights and 2 for the bias. The single node of the
# layer is the whole parameter vector, so H_i = H, sharpness = λ_max = 4, threshold 2/α, and the
# update map of plain SGD is I − αH with μ_k = 1 − αλ_k.
B_LIN = 8
S_LIN = (4.0, 3.0, 2.5)
EIG_LIN = np.array([2 * s * s / B_LIN for s in S_LIN] + [2.0])  # weights then bias (axis-aligned)
LAM_MAX = float(EIG_LIN.max())  # 4.0 (the first weight)
DELTA_LIN = 0.05


def regression_problem():
    g = torch.Generator().manual_seed(3)
    ones = torch.ones(B_LIN, 1, dtype=F64)
    q, _ = torch.linalg.qr(torch.cat([ones, torch.randn(B_LIN, 3, generator=g, dtype=F64)], dim=1))
    X = q[:, 1:] * torch.tensor(S_LIN, dtype=F64)  # columns orthogonal to each other and to 1
    # θ* has a zero along the top eigendirection (first weight): at α = 2/λ_max the iterate then
    # oscillates ±c along that axis around θ*, so ‖θ_t‖ tends to a constant and ρ → |μ_max| = 1.
    theta_star = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=F64)
    y = (X @ theta_star[:3] + theta_star[3])[:, None]
    A = torch.cat([X, ones], dim=1)
    return X, y, A


def record_regression(path, lr: float, steps: int) -> None:
    """Full-batch GD on :func:`regression_problem` from a fixed start, every step recorded."""
    X, y, _ = regression_problem()
    model = make_linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.3, 0.2]], dtype=F64))
        model.bias.fill_(-0.3)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    record(path, model, opt, nn.MSELoss(), [(X, y)] * steps, **linear_spec(3))


@pytest.mark.parametrize(
    "case, lr_factor, label, reason",
    [
        ("below", 1.0, "healthy_sink", "contracting"),  # α = 1/λ_max: max|μ| = 1 − λ_min/λ_max ≈ 0.61
        ("at", 2.0, "plateau", "neutral_direction"),  # α = 2/λ_max: μ_max = −1 exactly, |μ| within δ of 1
        ("above", 2.4, "source", "expanding"),  # α = 2.4/λ_max: μ_max = −1.4 (well above 1 + δ)
    ],
)
def test_linear_regression_closed_form(tmp_path, case, lr_factor, label, reason):
    X, y, A = regression_problem()
    lr, steps = lr_factor / LAM_MAX, 30
    record_regression(tmp_path / "run", lr, steps)

    res = only(trajscope.analyze(tmp_path / "run", dtype="float64", delta=DELTA_LIN, preset="acted"))
    assert list(res.steps) == list(range(steps - 1))  # the last step has no recorded successor
    assert res.attrs["delta"] == DELTA_LIN
    assert list(res.layers) == [""] and res.layers[""] == 1

    mu = 1.0 - lr * EIG_LIN
    radius = float(np.abs(mu).max())
    lab = res.node("", "label")[:, 0]
    assert (lab == LABEL[label]).all(), lab
    assert (res.node("", "reason")[:, 0] == reason_code(res, reason)).all()
    np.testing.assert_allclose(res.node("", "spectral_radius")[:, 0], radius, rtol=1e-6)
    np.testing.assert_allclose(res.node("", "hess_max")[:, 0], EIG_LIN.max(), rtol=1e-6)
    np.testing.assert_allclose(res.node("", "hess_min")[:, 0], EIG_LIN.min(), rtol=1e-6)
    np.testing.assert_allclose(res.global_series("sharpness"), LAM_MAX, rtol=1e-4)
    np.testing.assert_allclose(res.global_series("threshold"), 2.0 / lr, rtol=1e-12)
    assert (res.node("", "null_dims") == 0).all()
    assert (res.node("", "neutral_dims")[:, 0] == (1 if case == "at" else 0)).all()

    # gradient norm and loss against the closed form on the recorded parameters
    run = trajscope.open_run(tmp_path / "run")
    for k, t in enumerate(res.steps):
        theta = node_rows(run.params(int(t)), "")[0]
        r = A @ theta - y[:, 0]
        assert res.node("", "grad_norm", k)[0] == pytest.approx(float((2 / B_LIN * A.T @ r).norm()), rel=1e-6)
        assert res.global_series("loss")[k] == pytest.approx(float((r * r).mean()), rel=1e-10)

    rho = res.node("", "rho")[:, 0]
    if case == "above":
        # the error grows like 1.4^t along the top eigenvector, so ‖θ_{t+1}‖/‖θ_t‖ → 1.4;
        # the offset θ* contributes O(‖θ*‖/‖θ_t‖) ≈ 1e-4 after 25 steps: tolerance 1e-4 relative.
        np.testing.assert_allclose(rho[-4:], radius, rtol=1e-4)
        assert abs(rho[0] - radius) > abs(rho[-1] - radius)  # it tends there
    elif case == "at":
        # μ_max = −1 and θ* ⟂ top eigenvector: the other directions contract (|μ| ≤ 0.22) so
        # ‖θ_t‖ becomes constant and ρ → 1 = |1 − αλ_max| to float32 storage precision.
        np.testing.assert_allclose(rho[-4:], radius, rtol=1e-6)


@pytest.mark.parametrize("lr_factor", [1.0, 2.0, 2.4])
def test_linear_regression_excited_preset_follows_the_motion(tmp_path, lr_factor):
    """The default preset on the same closed form: λ_u = uᵀHu/uᵀu of the recorded motion
    u = θ_{t+1} − θ_t with H = (2/B)AᵀA, μ_u = 1 − αλ_u. At α = 2/λ_max the motion becomes the
    period-2 oscillation along the top direction (μ_u → −1): a sink, not a plateau; above it the
    motion expands (μ_u → −1.4): a source once it dominates."""
    X, y, A = regression_problem()
    lr, steps = lr_factor / LAM_MAX, 30
    record_regression(tmp_path / "run", lr, steps)
    res = only(trajscope.analyze(tmp_path / "run", dtype="float64", delta=DELTA_LIN))
    assert res.attrs["label_config"]["preset"] == "excited"
    run = trajscope.open_run(tmp_path / "run")
    H = 2 / B_LIN * A.T @ A
    want_label, want_radius = [], []
    for t in res.steps:
        u = node_rows(run.params(int(t) + 1), "")[0] - node_rows(run.params(int(t)), "")[0]
        mu = 1 - lr * float(u @ H @ u) / float(u @ u)
        want_radius.append(abs(mu))
        want_label.append(LABEL["source"] if abs(mu) > 1 + DELTA_LIN else LABEL["healthy_sink"])
    np.testing.assert_allclose(res.node("", "motion_radius")[:, 0], want_radius, rtol=1e-6)
    np.testing.assert_array_equal(res.node("", "label")[:, 0], want_label)
    assert res.node("", "loss_share")[:, 0] == pytest.approx(1.0)  # the only node: the whole decrease
    if lr_factor == 2.4:
        assert (res.node("", "label")[-10:, 0] == LABEL["source"]).all()
    else:
        assert (res.node("", "label")[:, 0] == LABEL["healthy_sink"]).all()  # acted: plateau at 2.0
    if lr_factor == 2.0:
        np.testing.assert_allclose(want_radius[-3:], 1.0, atol=1e-6)


# =========================================================================== 2. dead ReLU node
@pytest.mark.parametrize("curvature", ["ggn", "exact"])
def test_dead_relu_node_is_plateau(tmp_path, curvature):
    sizes = (3, 4, 2)
    model = make_mlp(sizes)
    with torch.no_grad():
        model[0].bias[1] = -100.0  # |w·x| << 100 on the data: unit 1 never fires
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record(tmp_path / "run", model, opt, nn.MSELoss(), batches(5, 3, 2), **mlp_spec(sizes))

    res = only(trajscope.analyze(tmp_path / "run", dtype="float64", curvature=curvature))
    assert res.attrs["curvature"] == curvature
    p = sizes[0] + 1
    dead = {m: res.node("0", m)[:, 1] for m in res.metrics("0")}
    assert (dead["label"] == LABEL["plateau"]).all()
    assert (dead["reason"] == reason_code(res, "dead")).all()
    assert (dead["grad_norm"] == 0.0).all()
    assert (dead["hess_max"] == 0.0).all() and (dead["hess_min"] == 0.0).all()
    assert (dead["null_dims"] == p).all()
    assert (dead["neutral_dims"] == 0).all()
    assert (dead["spectral_radius"] == 1.0).all()
    assert (dead["rho"] == 1.0).all() and (dead["drift"] == 0.0).all()  # it never moves
    # the other units of the layer are not dead (a unit may miss a whole small batch now and then)
    live = np.delete(res.node("0", "grad_norm"), 1, axis=1)
    assert (live > 0).any(axis=0).all()


# =========================================================================== 3. weight decay collapses a node
@pytest.mark.parametrize("preset", ["excited", "acted"])
def test_weight_decay_collapses_a_gradient_free_node(tmp_path, preset):
    sizes = (3, 4, 2)
    lr, wd, steps = 0.1, 1.0, 30
    model = make_mlp(sizes)
    with torch.no_grad():
        model[0].bias[2] = -100.0  # dead unit: zero loss gradient, only decay moves it
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    record(tmp_path / "run", model, opt, nn.MSELoss(), batches(steps, 3, 2), **mlp_spec(sizes))

    res = only(trajscope.analyze(tmp_path / "run", dtype="float64", preset=preset))
    c = 1.0 - lr * wd  # 0.9
    node = {m: res.node("0", m)[:, 2] for m in res.metrics("0")}
    steps_an = res.steps
    assert list(steps_an) == list(range(steps - 1))
    np.testing.assert_allclose(node["rho"], c, rtol=0, atol=1e-6)
    np.testing.assert_allclose(node["spectral_radius"], c, rtol=0, atol=1e-6)
    assert (node["grad_norm"] == 0.0).all() and (node["hess_max"] == 0.0).all()
    assert (node["null_dims"] == 0).all()  # decay acts on every direction (μ = 1 − α·wd)
    np.testing.assert_allclose(node["param_norm"] / node["param_norm"][0], c ** steps_an.astype(float), rtol=1e-6)
    # collapsed once ‖θ_t‖ <= 0.1 · ‖θ_0‖: 0.9^21 = 0.109, 0.9^22 = 0.098 → from step 22 on;
    # before that the excited preset calls it dead (no curvature, no gradient: decay alone moves it),
    # the acted one a healthy sink (decay contracts every direction)
    before = LABEL["plateau"] if preset == "excited" else LABEL["healthy_sink"]
    want = np.where(steps_an >= 22, LABEL["degenerate_sink"], before)
    np.testing.assert_array_equal(node["label"], want)
    assert (node["reason"][steps_an >= 22] == reason_code(res, "collapsed")).all()
    # the stable label follows after the label has held 3 checkpoints (22, 23, 24)
    want_stable = np.where(steps_an >= 24, LABEL["degenerate_sink"], before)
    np.testing.assert_array_equal(node["stable_label"], want_stable)


# =========================================================================== 4. sharpness vs the dense Hessian
def test_sharpness_and_node_blocks_vs_dense_hessian(tmp_path):
    sizes = (4, 6, 3)  # 51 parameters: Lanczos route (> 32)
    model = make_mlp(sizes, "tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    record(tmp_path / "exact", model, opt, nn.MSELoss(), batches(3, 4, 3, b=10), **mlp_spec(sizes, "tanh"))
    shutil.copytree(tmp_path / "exact", tmp_path / "ggn")

    ex = only(trajscope.analyze(tmp_path / "exact", dtype="float64", curvature="exact"))
    gg = only(trajscope.analyze(tmp_path / "ggn", dtype="float64", curvature="ggn"))
    assert ex.attrs["curvature"] == "exact" and gg.attrs["curvature"] == "ggn"
    assert list(ex.steps) == list(gg.steps) == [0, 1]

    run = trajscope.open_run(tmp_path / "exact")
    ref_model = make_mlp(sizes, "tanh")
    loss_fn = nn.MSELoss()
    for k, step in enumerate(ex.steps):
        ck = run.checkpoint(int(step))
        params = {n: t.to(F64) for n, t in ck.params.items()}
        names = list(params)
        x, y = ck.batch
        f, flat0 = loss_of_flat(ref_model, params, names, x, y, loss_fn)
        H = hessian(f)(flat0)
        lam_max = float(torch.linalg.eigvalsh(H)[-1])
        assert ex.global_series("sharpness")[k] == pytest.approx(lam_max, rel=1e-4)
        assert gg.global_series("sharpness")[k] == pytest.approx(lam_max, rel=1e-4)

        # GGN reference: (2/(B·C)) JᵀJ with J = ∂f/∂θ (MSELoss mean over B·C entries)
        def out(flat):
            pieces = torch.split(flat, [params[n].numel() for n in names])
            p = {n: t.reshape(params[n].shape) for n, t in zip(names, pieces)}
            return functional_call(ref_model, p, (x,)).reshape(-1)

        J = jacrev(out)(flat0)
        G = 2.0 / J.shape[0] * J.T @ J

        for layer in ("0", "2"):
            n_nodes = ex.layers[layer]
            for i in range(n_nodes):
                idx = flat_index(params, names, layer, i)
                ev = torch.linalg.eigvalsh(H[idx][:, idx])
                ev_g = torch.linalg.eigvalsh(G[idx][:, idx])
                hmax, hmin = ex.node(layer, "hess_max", k)[i], ex.node(layer, "hess_min", k)[i]
                assert hmax == pytest.approx(float(ev[-1]), rel=1e-5, abs=1e-9), (layer, i)
                assert hmin == pytest.approx(float(ev[0]), rel=1e-5, abs=1e-9), (layer, i)
                # every node block is a principal submatrix of H: λ_max(H_i) <= sharpness
                assert hmax <= ex.global_series("sharpness")[k] * (1 + 1e-4) + 1e-9
                assert gg.node(layer, "hess_max", k)[i] == pytest.approx(float(ev_g[-1]), rel=1e-5, abs=1e-9)
                assert gg.node(layer, "hess_min", k)[i] == pytest.approx(float(ev_g[0]), rel=1e-5, abs=1e-9)
                # plain SGD: r_i = max|1 − αλ| over the block's eigenvalues (all p directions)
                want_r = float((1 - 0.05 * ev).abs().max())
                assert ex.node(layer, "spectral_radius", k)[i] == pytest.approx(want_r, rel=1e-6)
        # the output layer is linear in its own parameters: exact = GGN there; tanh makes them
        # differ in the hidden layer, where the exact block can be indefinite
        np.testing.assert_allclose(ex.node("2", "hess_max", k), gg.node("2", "hess_max", k), rtol=1e-6)
        assert np.abs(ex.node("0", "hess_max", k) - gg.node("0", "hess_max", k)).max() > 1e-6
        assert (gg.node("0", "hess_min", k) >= -1e-9).all()


# =========================================================================== 5. output contract
def test_output_contract_zarr_and_events(tmp_path):
    sizes = (3, 5, 2)
    simple_run(tmp_path / "run", sizes, steps=6, dtype=torch.float32)
    res = only(trajscope.analyze(tmp_path / "run"))
    K = 5
    layers = {"0": 5, "2": 2}

    # --- analysis.zarr with plain zarr (docs/spec.md §9)
    root = zarr.open_group(str(tmp_path / "run" / "analysis.zarr"), mode="r")
    assert root["steps"].dtype == np.int64 and root["steps"].shape == (K,)
    np.testing.assert_array_equal(root["steps"][...], np.arange(K))
    for name in ("loss", "sharpness", "threshold"):
        arr = root[f"global/{name}"]
        assert arr.shape == (K,) and arr.dtype.kind == "f", name
        assert np.isfinite(arr[...]).all(), name
    for module, n in layers.items():
        g = root[f"nodes/{module}"]
        for m in ("label", "stable_label"):
            assert g[m].dtype == np.uint8 and g[m].shape == (K, n), (module, m)
            assert set(np.unique(g[m][...])) <= {0, 1, 2, 3}
        for m in ("hess_max", "hess_min", "spectral_radius", "grad_norm", "param_norm", "rho", "drift"):
            assert g[m].dtype == np.float32 and g[m].shape == (K, n), (module, m)
            assert np.isfinite(g[m][...]).all(), (module, m)
        for m in ("null_dims", "neutral_dims"):
            assert g[m].dtype == np.int32 and g[m].shape == (K, n), (module, m)
    attrs = dict(root.attrs)
    assert list(attrs["labels"]) == ["healthy_sink", "degenerate_sink", "plateau", "source"]
    assert attrs["curvature"] == "ggn"
    assert attrs["delta"] == pytest.approx(min(1 / 6, 0.01))
    assert attrs["trajscope_version"] == trajscope.__version__
    assert "semantics" in attrs and "optimizer_map" in attrs
    assert attrs["optimizer_map"][0]["kind"] == "sgd"
    # the same numbers through trajscope.io.results
    np.testing.assert_array_equal(res.steps, root["steps"][...])
    np.testing.assert_array_equal(res.node("0", "label"), root["nodes/0/label"][...])
    threshold = root["global/threshold"][...]
    np.testing.assert_allclose(threshold, 2 / 0.1, rtol=1e-12)

    # --- TensorBoard events
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "run"), size_guidance=event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE
    )
    acc.Reload()
    tags = acc.Tags()
    for name in ("loss", "sharpness", "threshold"):
        tag = f"trajscope/global/{name}"
        assert tag in tags["scalars"], tag
        ev = acc.Scalars(tag)
        assert [e.step for e in ev] == list(range(K))
        np.testing.assert_allclose([e.value for e in ev], root[f"global/{name}"][...], rtol=1e-6)
    for module, n in layers.items():
        lab = root[f"nodes/{module}/label"][...]
        for code, name in enumerate(attrs["labels"]):
            tag = f"trajscope/{module}/frac/{name}"
            assert tag in tags["scalars"], tag
            ev = acc.Scalars(tag)
            assert [e.step for e in ev] == list(range(K))
            np.testing.assert_allclose([e.value for e in ev], (lab == code).sum(axis=1) / n, rtol=1e-6)
        for metric in ("hess_max", "spectral_radius", "rho", "drift", "grad_norm", "param_norm"):
            tag = f"trajscope/{module}/{metric}"
            assert tag in tags["histograms"], tag
            ev = acc.Histograms(tag)
            assert [e.step for e in ev] == list(range(K))
            vals = root[f"nodes/{module}/{metric}"][...]
            for k, e in enumerate(ev):
                h = e.histogram_value
                assert h.num == n
                assert h.min == pytest.approx(float(vals[k].min()), rel=1e-6)
                assert h.max == pytest.approx(float(vals[k].max()), rel=1e-6)
        tag = f"trajscope/{module}/labels"
        assert tag in tags["tensors"], tag
        meta = acc.SummaryMetadata(tag)
        assert meta.plugin_data.plugin_name == "trajscope"
        assert meta.data_class == summary_pb2.DATA_CLASS_TENSOR
        ev = acc.Tensors(tag)
        assert [e.step for e in ev] == list(range(K))
        for k, e in enumerate(ev):
            arr = tensor_util.make_ndarray(e.tensor_proto)
            assert arr.dtype == np.uint8
            np.testing.assert_array_equal(arr, lab[k])
    # a custom-scalars layout that overlays sharpness and threshold in one chart
    assert "custom_scalars__config__" in tags["tensors"]
    layout = layout_pb2.Layout()
    layout.ParseFromString(tensor_util.make_ndarray(acc.Tensors("custom_scalars__config__")[0].tensor_proto).item())
    charts = [c for cat in layout.category for c in cat.chart]

    def overlays(chart) -> bool:
        tags_ = list(chart.multiline.tag)
        return any(re.search(t, "trajscope/global/sharpness") for t in tags_) and any(
            re.search(t, "trajscope/global/threshold") for t in tags_
        )

    assert any(overlays(c) for c in charts)


# =========================================================================== 6. incremental re-analysis
def test_incremental_reanalysis_appends_only_new_checkpoints(tmp_path):
    sizes = (3, 4, 2)
    run_dir = tmp_path / "run"
    model = make_mlp(sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(7, 3, 2)
    record(run_dir, model, opt, nn.MSELoss(), data[:4], **mlp_spec(sizes))
    first = only(trajscope.analyze(run_dir, dtype="float64"))
    assert list(first.steps) == [0, 1, 2]
    before = store_snapshot(run_dir)
    before_arrays = store_arrays(run_dir)
    delta = first.attrs["delta"]

    # resume the recording in the same process (same model and optimizer) for 3 more steps
    record(run_dir, model, opt, nn.MSELoss(), data[4:], resume=True, **mlp_spec(sizes))
    assert list(trajscope.open_run(run_dir).steps) == list(range(7))
    second = only(trajscope.analyze(run_dir, dtype="float64"))
    steps = list(second.steps)
    assert steps == [0, 1, 2, 3, 4, 5]
    assert all(a < b for a, b in zip(steps, steps[1:]))
    assert second.attrs["delta"] == delta
    after = store_arrays(run_dir)
    assert set(after) == set(before_arrays)
    for name, old in before_arrays.items():
        new = after[name]
        assert new.shape[0] == 6 and new.shape[1:] == old.shape[1:], name
        assert new[:3].tobytes() == old.tobytes(), f"{name}: earlier rows changed"
    # the new row of step 3 uses θ_4 from the resumed session
    run = trajscope.open_run(run_dir)
    want = node_rows(run.params(4), "0").norm(dim=1) / node_rows(run.params(3), "0").norm(dim=1)
    np.testing.assert_allclose(second.node("0", "rho", 3), want.numpy(), rtol=1e-6)
    acc = event_accumulator.EventAccumulator(
        str(run_dir), size_guidance=event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE
    )
    acc.Reload()
    # two event files now; TensorBoard reads them in file-name order, which need not be time order
    # when both analyses ran within the same second: compare the set of steps, no duplicates
    assert sorted(e.step for e in acc.Scalars("trajscope/global/loss")) == steps

    # another label rule cannot append to these rows: one line, nothing written
    zdig, evs = tree_digest(run_dir / "analysis.zarr"), event_files(run_dir)
    with pytest.raises(trajscope.TrajscopeError, match="was analysed with label preset 'excited'.*--preset excited"):
        trajscope.analyze(run_dir, dtype="float64", preset="acted")
    assert tree_digest(run_dir / "analysis.zarr") == zdig and event_files(run_dir) == evs

    # nothing new: nothing changes (no new row, no rewritten file, no new event file)
    third = only(trajscope.analyze(run_dir, dtype="float64"))
    assert list(third.steps) == steps
    assert tree_digest(run_dir / "analysis.zarr") == zdig
    assert event_files(run_dir) == evs
    assert store_snapshot(run_dir).keys() == before.keys()


# =========================================================================== 7. sparse cadence
def test_sparse_cadence_one_step_kinematics(tmp_path):
    sizes = (3, 4, 2)
    run_dir = tmp_path / "run"
    simple_run(run_dir, sizes, steps=17, every=5, window=2)
    run = trajscope.open_run(run_dir)
    assert list(run.steps) == [0, 1, 5, 6, 10, 11, 15, 16]
    shutil.copytree(run_dir, tmp_path / "all")

    res = only(trajscope.analyze(run_dir, dtype="float64"))
    assert list(res.steps) == [0, 5, 10, 15]  # the steps with θ_{t+1} recorded
    for k, t in enumerate(res.steps):
        for layer in ("0", "2"):
            a, b = node_rows(run.params(int(t)), layer), node_rows(run.params(int(t) + 1), layer)
            na, nb = a.norm(dim=1), b.norm(dim=1)
            np.testing.assert_allclose(res.node(layer, "rho", k), (nb / na).numpy(), rtol=1e-6)
            drift = (b / nb[:, None] - a / na[:, None]).norm(dim=1)
            np.testing.assert_allclose(res.node(layer, "drift", k), drift.numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(res.node(layer, "param_norm", k), na.numpy(), rtol=1e-6)
        assert res.global_series("loss")[k] == pytest.approx(float(run.losses[list(run.steps).index(t)]), rel=1e-10)

    # --all-steps: every checkpoint; across a gap of k steps ρ is the per-step geometric mean
    res_all = only(trajscope.analyze(tmp_path / "all", dtype="float64", all_steps=True))
    assert list(res_all.steps) == [0, 1, 5, 6, 10, 11, 15, 16]
    a, b = node_rows(run.params(1), "0"), node_rows(run.params(5), "0")
    np.testing.assert_allclose(
        res_all.node("0", "rho", 1), ((b.norm(dim=1) / a.norm(dim=1)) ** 0.25).numpy(), rtol=1e-6
    )
    assert np.isnan(res_all.node("0", "rho", 7)).all()  # the last checkpoint has no successor
    # each row says over how many steps its ρ and drift were taken (docs/spec.md §6: a K-step drift)
    np.testing.assert_array_equal(res_all.global_series("step_gap"), [1, 4, 1, 4, 1, 4, 1, np.nan])
    np.testing.assert_array_equal(res.global_series("step_gap"), [1, 1, 1, 1])


# =========================================================================== 8. diverging run (NaN/Inf)
def test_diverging_run_is_data_not_an_error(tmp_path):
    run_dir = tmp_path / "run"
    model = make_linear(3, 1, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=50.0)  # μ ≈ −100 per step: float32 overflows
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    record(run_dir, model, opt, nn.MSELoss(), [(x, y)] * 25, **linear_spec(3))
    run = trajscope.open_run(run_dir)
    finite = [bool(all(torch.isfinite(t).all() for t in run.params(int(s)).values())) for s in run.steps]
    assert finite[0] and not finite[-2], finite  # it does diverge within the recorded steps

    res = only(trajscope.analyze(run_dir))  # must not raise
    assert list(res.steps) == list(range(24))
    lab, why = res.node("", "label")[:, 0], res.node("", "reason")[:, 0]
    assert (lab == LABEL["source"]).all(), lab
    for k in range(24):
        if not finite[k]:
            assert why[k] == reason_code(res, "nonfinite"), k
            for m in ("spectral_radius", "hess_max", "hess_min", "grad_norm"):
                assert np.isnan(res.node("", m, k)).all(), (k, m)
            assert math.isnan(res.global_series("sharpness")[k])
    assert why[0] == reason_code(res, "expanding")
    assert res.node("", "spectral_radius", 0)[0] > 1


# =========================================================================== 9. Adam / AdamW
@pytest.mark.parametrize("opt_name", ["Adam", "AdamW"])
def test_adam_threshold_and_preconditioned_sharpness(tmp_path, opt_name):
    sizes = (3, 4, 2)  # 26 parameters, ReLU: node blocks exact = GGN
    lr, wd, b1 = 0.01, (0.0 if opt_name == "Adam" else 0.1), 0.9
    model = make_mlp(sizes)
    opt = getattr(torch.optim, opt_name)(model.parameters(), lr=lr, weight_decay=wd)
    record(tmp_path / "run", model, opt, nn.MSELoss(), batches(5, 3, 2), **mlp_spec(sizes))
    res = only(trajscope.analyze(tmp_path / "run", dtype="float64"))
    assert list(res.steps) == [0, 1, 2, 3]
    assert res.attrs["optimizer_map"][0]["kind"] == opt_name.lower()
    assert "precond_sharpness" in res.global_names

    c = 1.0 - lr * wd if opt_name == "AdamW" else 1.0
    th = res.global_series("threshold")
    for k, t in enumerate(res.steps):
        a = lr / (1 - b1 ** (int(t) + 1))
        # updatemap.py: first step (no exp_avg) (1+c)/(a(1−β1)); then (1+c)(1+β1)/(a(1−β1)),
        # i.e. Adam's (2+2β1)/(a(1−β1)) when c = 1
        want = (1 + c) / (a * (1 - b1)) if t == 0 else (1 + c) * (1 + b1) / (a * (1 - b1))
        assert th[k] == pytest.approx(want, rel=1e-12), (t, th[k], want)

    # preconditioned sharpness λ_max(D^{1/2} H D^{1/2}) and node radii, from the recorded state
    run = trajscope.open_run(tmp_path / "run")
    ref_model = make_mlp(sizes)
    ps = res.global_series("precond_sharpness")
    for k, t in enumerate(res.steps):
        ck = run.checkpoint(int(t))
        params = {n: v.to(F64) for n, v in ck.params.items()}
        names = list(params)
        x, y = ck.batch
        f, flat0 = loss_of_flat(ref_model, params, names, x, y, nn.MSELoss())
        H = hessian(f)(flat0)
        g = torch.func.grad(f)(flat0)
        st = ck.optimizer_state
        v = torch.cat(
            [
                st[n]["exp_avg_sq"].to(F64).reshape(-1) if n in st else torch.zeros(params[n].numel(), dtype=F64)
                for n in names
            ]
        )
        step_before = int(float(st[names[0]]["step"])) if names[0] in st else 0
        v_used = 0.999 * v + 0.001 * g * g
        D = 1.0 / (torch.sqrt(v_used / (1 - 0.999 ** (step_before + 1))) + 1e-8)
        K = D.sqrt()[:, None] * H * D.sqrt()[None, :]
        assert ps[k] == pytest.approx(float(torch.linalg.eigvalsh(K)[-1]), rel=1e-5)
        assert res.global_series("sharpness")[k] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5)
        a = lr / (1 - b1 ** (step_before + 1))
        for layer in ("0", "2"):
            for i in range(res.layers[layer]):
                idx = flat_index(params, names, layer, i)
                lt = torch.linalg.eigvalsh(K[idx][:, idx])
                if t == 0:  # no exp_avg yet: μ = c − a(1−β1)λ̃
                    r = float((c - a * (1 - b1) * lt).abs().max())
                else:  # roots of μ² − (c + β1 − a(1−β1)λ̃)μ + β1·c
                    T = (c + b1 - a * (1 - b1) * lt).to(torch.complex128)
                    disc = torch.sqrt(T * T - 4 * b1 * c)
                    r = float(torch.maximum(((T + disc) / 2).abs(), ((T - disc) / 2).abs()).max())
                assert res.node(layer, "spectral_radius", k)[i] == pytest.approx(r, rel=1e-6), (t, layer, i)
