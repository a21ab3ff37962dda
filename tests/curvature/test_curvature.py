"""Per-node curvature blocks against float64 references (docs/spec.md §3, §4).

Reference for every block: ``torch.func.hessian`` of the loss restricted to θ_i (exact), and
J_iᵀ (∂²L/∂f²) J_i from ``torch.func.jacrev`` (GGN), all in float64.
"""

from __future__ import annotations

# imports of the cases folded from test_review_device_timer_probe (below)
import math
import warnings

import pytest
import torch
from torch import nn

from tests.helpers.analysis import F64
from tests.helpers.calls import node_curvature
from tests.helpers.references import (
    DT,
    RTOL,
    SeqMLP,
    _params,
    check_layer,
    mlp,
    mlp_data,
    ref_exact,
    ref_ggn,
    small_cnn,
    spectrum_close,
)
from trajscope.curvature.blocks import dense_blocks
from trajscope.curvature.spectra import node_hessian_extremes, preconditioned_eigvals
from trajscope.nodes import find_node_layers, node_matrix

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning"),
]


# ----------------------------------------------------------------------------- nodes
def test_find_node_layers_and_node_matrix():
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same", groups=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
        nn.LayerNorm(3),
    )
    layers = find_node_layers(m)
    assert [l.name for l in layers] == ["0", "3"]
    c, lin = layers
    assert (c.kind, c.bias, c.n_nodes, c.node_dim) == ("conv", None, 4, 9)
    assert c.conv["padding"] == (1, 1) and c.conv["groups"] == 2 and c.conv["dims"] == 2
    assert (lin.kind, lin.weight, lin.bias, lin.node_dim) == ("linear", "3.weight", "3.bias", 101)
    assert [l.name for l in find_node_layers(m, include=["3"])] == ["3"]
    assert [l.name for l in find_node_layers(m, include=["*"])] == ["0", "3"]
    P = dict(m.named_parameters())
    M = node_matrix(P, lin)
    assert torch.equal(M[1, :100], P["3.weight"][1]) and M[1, 100] == P["3.bias"][1]
    assert torch.equal(node_matrix(P, c)[2], P["0.weight"][2].flatten())
    # even kernel under padding="same": PyTorch pads the extra one on the right
    c2 = find_node_layers(nn.Conv1d(1, 1, 4, padding="same"))[0]
    assert c2.conv["pad"] == ((1, 2),)
    # MultiheadAttention's projections are used by its functional kernel, not called as modules: the
    # parameter route (tests/curvature/test_node_layers.py checks their blocks)
    assert [(l.name, l.route) for l in find_node_layers(nn.MultiheadAttention(4, 2))] == [
        ("in_proj", "param"),
        ("out_proj", "param"),
    ]


# ----------------------------------------------------------------------------- Linear, 2-D
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh], ids=["relu", "tanh"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("kind", ["ggn", "exact"])
def test_mlp_blocks(act, loss, kind):
    model = mlp(act)
    params = _params(model)
    x, y, loss_fn = mlp_data(loss)
    layers = find_node_layers(model)
    res = node_curvature(model, params, {}, x, y, loss_fn, layers, kind=kind)
    assert res.kind == kind
    assert [res.factors[l.name].method for l in layers] == ["gram", "gram", "dense"]
    assert res.eigvals["0"].shape == (6, 5) and res.eigvals["4"].shape == (3, 4)
    assert torch.allclose(res.loss, loss_fn(model(x), y))
    ref = ref_exact if (kind == "exact" or act is nn.ReLU) else ref_ggn
    for l in layers:
        check_layer(res, model, params, x, y, loss_fn, l, ref)
    g = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    for (k, _), gk in zip(model.named_parameters(), g):
        assert torch.allclose(res.grads[k], gk, rtol=1e-10, atol=1e-14)


def test_relu_ggn_equals_exact_tanh_differs():
    x, y, loss_fn = mlp_data("ce")
    for act, same in [(nn.ReLU, True), (nn.Tanh, False)]:
        model = mlp(act)
        params = _params(model)
        layers = find_node_layers(model)
        g = node_curvature(model, params, {}, x, y, loss_fn, layers, kind="ggn")
        e = node_curvature(model, params, {}, x, y, loss_fn, layers, kind="exact")
        for l in layers[:2]:
            diff = float((g.eigvals[l.name] - e.eigvals[l.name]).abs().max())
            scale = float(e.eigvals[l.name].abs().max())
            assert (diff <= 1e-10 * scale) == same, (act, l.name, diff / scale)
        if not same:  # the exact block of a smooth net is indefinite somewhere, the GGN never is
            assert any(float(e.eigvals[l.name].min()) < 0 for l in layers)
            assert all(float(g.eigvals[l.name].min()) >= 0 for l in layers)
            # ... and only the exact block is torch.func.hessian's
            H = ref_exact(model, params, x, y, loss_fn, layers[0], 0)
            Dg, De = dense_blocks(g.factors["0"], [0])[0], dense_blocks(e.factors["0"], [0])[0]
            assert torch.allclose(De, H, rtol=1e-9, atol=1e-12)
            assert float((Dg - H).abs().max()) > 1e-3 * float(H.abs().max())


@pytest.mark.parametrize("kind", ["ggn", "exact"])
def test_gram_and_dense_agree(kind):
    x, y, loss_fn = mlp_data("ce", B=4)
    cnn, xc, yc, lc = small_cnn(nn.Tanh, bias=True)
    seq = SeqMLP(nn.Tanh).to(DT)
    xs = torch.randn(2, 3, 4, dtype=DT)
    ys = torch.randn(2, 3, dtype=DT)
    for model, xx, yy, lf in [(mlp(nn.Tanh), x, y, loss_fn), (cnn, xc, yc, lc), (seq, xs, ys, nn.MSELoss())]:
        params = _params(model)
        layers = find_node_layers(model)
        a = node_curvature(model, params, {}, xx, yy, lf, layers, kind=kind, method="gram")
        b = node_curvature(model, params, {}, xx, yy, lf, layers, kind=kind, method="dense")
        for l in layers:
            ea, eb = a.eigvals[l.name], b.eigvals[l.name]
            assert ea.shape == eb.shape
            assert torch.allclose(ea, eb, rtol=1e-8, atol=1e-10 * float(eb.abs().max())), l.name


def test_tiles_and_rank_tolerance():
    model = mlp(nn.ReLU)
    params = _params(model)
    x, y, loss_fn = mlp_data("mse", B=3)
    layers = find_node_layers(model)
    big = node_curvature(model, params, {}, x, y, loss_fn, layers)
    small = node_curvature(model, params, {}, x, y, loss_fn, layers, max_tile_bytes=1)
    for l in layers:
        assert torch.allclose(big.eigvals[l.name], small.eigvals[l.name], rtol=1e-12, atol=0)
    # B = 3 < p: r = 3 eigenvalues; a node dead on 2 of 3 samples has exactly 2 zeros
    ev = big.eigvals["0"]
    assert ev.shape == (6, 3)
    live = (big.factors["0"].e != 0).sum(1)
    assert torch.equal((ev != 0).sum(1), live)


# ----------------------------------------------------------------------------- Conv, 3-D Linear


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["ggn", "exact"])
def test_conv2d_blocks(kind, bias):
    for act in (nn.ReLU, nn.Tanh):
        model, x, y, loss_fn = small_cnn(act, bias)
        params = _params(model)
        layers = find_node_layers(model)
        res = node_curvature(model, params, {}, x, y, loss_fn, layers, kind=kind)
        ref = ref_exact if (kind == "exact" or act is nn.ReLU) else ref_ggn
        for l in layers[:2]:
            assert res.factors[l.name].form == ("sqrt" if kind == "ggn" else "block")
            check_layer(res, model, params, x, y, loss_fn, l, ref)
        if kind == "ggn":
            assert res.factors["0"].G is not None and res.factors["2"].delta is not None


def test_conv_geometries():
    """Conv1d (even kernel, padding='same', reflect), grouped dilated Conv2d, Conv3d."""
    torch.manual_seed(3)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 4, padding="same", padding_mode="reflect")
            self.c2 = nn.Conv2d(4, 4, 2, dilation=2, groups=2, padding=1)
            self.c3 = nn.Conv3d(1, 2, (1, 2, 2), stride=(1, 2, 1))
            self.out = nn.Linear(2 * 4 * 1 * 2, 2)

        def forward(self, x):
            h = torch.tanh(self.c1(x))  # (B, 4, 6)
            h = torch.tanh(self.c2(h.reshape(-1, 4, 2, 3)))  # (B, 4, 2, 3)
            h = torch.tanh(self.c3(h.reshape(-1, 1, 4, 2, 3)))  # (B, 2, 4, 1, 2)
            return self.out(h.flatten(1))

    model = M().to(DT)
    params = _params(model)
    x = torch.randn(2, 2, 6, dtype=DT)
    y = torch.randn(2, 2, dtype=DT)
    loss_fn = nn.MSELoss()
    layers = find_node_layers(model)
    assert [l.name for l in layers] == ["c1", "c2", "c3", "out"]
    for kind, ref in [("ggn", ref_ggn), ("exact", ref_exact)]:
        res = node_curvature(model, params, {}, x, y, loss_fn, layers, kind=kind)
        for l in layers[:3]:
            check_layer(res, model, params, x, y, loss_fn, l, ref, nodes=[0, l.n_nodes - 1])


@pytest.mark.parametrize("kind", ["ggn", "exact"])
def test_linear_3d_input(kind):
    torch.manual_seed(0)
    model = SeqMLP(nn.Tanh).to(DT)
    params = _params(model)
    x = torch.randn(3, 4, 4, dtype=DT)  # (B, T, F): p = 5 > B = 3 for the GGN Gram route
    y = torch.randn(3, 3, dtype=DT)
    layers = find_node_layers(model)
    res = node_curvature(model, params, {}, x, y, nn.MSELoss(), layers, kind=kind)
    assert res.factors["inp"].form == ("sqrt" if kind == "ggn" else "block")
    ref = ref_ggn if kind == "ggn" else ref_exact
    for l in layers:
        check_layer(res, model, params, x, y, nn.MSELoss(), l, ref)


def test_tuple_and_dict_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x, scale):
            return self.b(torch.tanh(self.a(x) * scale))

    torch.manual_seed(0)
    model = Two().to(DT)
    params = _params(model)
    x, s = torch.randn(5, 3, dtype=DT), torch.rand(5, 1, dtype=DT) + 0.5
    y = torch.randn(5, 2, dtype=DT)
    layers = find_node_layers(model)
    for inp in [(x, s), {"x": x, "scale": s}]:
        res = node_curvature(model, params, {}, inp, y, nn.MSELoss(), layers, kind="exact")
        check_layer(res, model, params, inp, y, nn.MSELoss(), layers[0], ref_exact)


# ----------------------------------------------------------------------------- preconditioned
@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_preconditioned_eigvals(shift):
    x, y, loss_fn = mlp_data("ce")
    cnn, xc, yc, lc = small_cnn(nn.Tanh, bias=True)
    for model, xx, yy, lf, kind in [
        (mlp(nn.Tanh), x, y, loss_fn, "ggn"),
        (mlp(nn.Tanh), x, y, loss_fn, "exact"),
        (cnn, xc, yc, lc, "ggn"),
        (cnn, xc, yc, lc, "exact"),
    ]:
        params = _params(model)
        layers = find_node_layers(model)
        res = node_curvature(model, params, {}, xx, yy, lf, layers, kind=kind)
        for l in layers[:2]:
            fac = res.factors[l.name]
            g = torch.Generator().manual_seed(7)
            d = torch.rand(l.n_nodes, l.node_dim, generator=g, dtype=DT) * 3 + 0.1
            ev = preconditioned_eigvals(fac, d, shift=shift)
            H = dense_blocks(fac)
            sd = d.sqrt()
            M = sd[:, :, None] * (H + shift * torch.eye(l.node_dim, dtype=DT)) * sd[:, None, :]
            assert ev.shape[1] == (l.node_dim if shift else fac.r)
            for i in range(l.n_nodes):
                spectrum_close(ev[i], M[i], l.node_dim)


# ----------------------------------------------------------------------------- misc
def test_node_hessian_extremes():
    ev = torch.tensor([[3.0, 1.0], [2.0, -1.0], [-0.5, -2.0]], dtype=DT)
    hmax, hmin = node_hessian_extremes(ev, p=2)
    assert hmax.tolist() == [3.0, 2.0, -0.5] and hmin.tolist() == [1.0, -1.0, -2.0]
    hmax, hmin = node_hessian_extremes(ev, p=5)  # three extra zero eigenvalues
    assert hmax.tolist() == [3.0, 2.0, 0.0] and hmin.tolist() == [0.0, -1.0, -2.0]


def test_nonfinite_params_give_nan():
    model = mlp(nn.Tanh)
    params = _params(model)
    params["2.weight"] = params["2.weight"].clone()
    params["2.weight"][0, 0] = math.nan
    x, y, loss_fn = mlp_data("ce")
    layers = find_node_layers(model)
    for kind in ("ggn", "exact"):
        res = node_curvature(model, params, {}, x, y, loss_fn, layers, kind=kind)
        assert torch.isnan(res.loss)
        for l in layers:
            assert torch.isnan(res.eigvals[l.name]).all()


@pytest.mark.parametrize("kind", ["ggn", "exact"])
def test_shared_module_blocks_cover_every_call(kind):
    """A module called twice per forward pass: its blocks (parameter route) cover both calls."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Shared().to(DT)
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    layers = find_node_layers(model)
    params = _params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = node_curvature(model, params, {}, x, y, nn.MSELoss(), layers, kind=kind)
    ref = ref_exact if kind == "exact" else ref_ggn
    for name in ("a", "b"):
        layer = next(l for l in layers if l.name == name)
        blocks = dense_blocks(res.factors[name])
        for i in range(layer.n_nodes):
            H = ref(model, params, x, y, nn.MSELoss(), layer, i)
            assert torch.allclose(blocks[i], H, rtol=0, atol=RTOL * float(H.abs().max())), (name, i)


def test_unflattened_export_program():
    """Node layers are found by name in an unflattened torch.export program and give the same
    spectra as the eager module (reflect padding appears there as an aten.pad)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
            self.d = nn.Conv1d(3, 2, 2, padding="same")
            self.out = nn.Linear(2 * 16, 2)

        def forward(self, x):
            h = torch.tanh(self.c(x)).flatten(2)  # (B, 3, 16)
            return self.out(torch.tanh(self.d(h)).flatten(1))

    torch.manual_seed(0)
    model = Net().to(DT)
    x, y = torch.randn(3, 2, 4, 4, dtype=DT), torch.randn(3, 2, dtype=DT)
    prog = torch.export.unflatten(torch.export.export(model, (x,)))
    layers = find_node_layers(model)
    assert find_node_layers(prog) == layers
    params = _params(model)
    a = node_curvature(model, params, {}, x, y, nn.MSELoss(), layers, kind="exact")
    b = node_curvature(prog, params, {}, x, y, nn.MSELoss(), layers, kind="exact")
    for l in layers:
        assert torch.allclose(a.eigvals[l.name], b.eigvals[l.name], rtol=1e-10, atol=1e-14)
    check_layer(a, model, params, x, y, nn.MSELoss(), layers[0], ref_exact, nodes=[0])


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("kind", ["ggn", "exact"])
def test_float32_analysis_matches_float64_reference(act, kind):
    """A float32 run: blocks assembled and solved in float32, spectra within float32 accuracy
    of the float64 references (Gram and dense routes, PSD and indefinite)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(40, 30), act(), nn.Linear(30, 20), act(), nn.Linear(20, 5))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(24, 40, generator=g)
    y = torch.randint(0, 5, (24,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    layers = find_node_layers(model)
    res = node_curvature(model, _params(model), {}, x, y, loss_fn, layers, kind=kind)
    assert [res.factors[l.name].method for l in layers] == ["gram", "gram", "dense"]
    m64 = model.to(DT)
    p64 = _params(m64)
    ref = ref_exact if (kind == "exact" or act is nn.ReLU) else ref_ggn
    for l in layers:
        for i in (0, l.n_nodes // 2, l.n_nodes - 1):
            H = ref(m64, p64, x.to(DT), y, loss_fn, l, i)
            spectrum_close(res.eigvals[l.name][i], H, l.node_dim, tol=2e-5)


# ==============================================================================================
# folded from test_review_device_timer_probe (adversarial review of device handling, the
# commit timer and the plain-Zarr probe writer): the part about this module
# ==============================================================================================


# --------------------------------------------------------------------------------------------
# non-finite parameters: the documented contract of node_curvature
# --------------------------------------------------------------------------------------------
def test_node_curvature_infinite_parameter_gives_nan_spectra():
    """node_curvature's docstring: "Non-finite parameters or loss give NaN spectra, never an error".
    An infinite weight feeding a saturating tanh leaves the loss finite, and the spectra come out
    finite numbers (the Hessian at a parameter vector with an infinite entry is not defined)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    params["0.weight"][1, 2] = math.inf
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    layers = find_node_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = node_curvature(model, params, {}, x, y, nn.CrossEntropyLoss(), layers, kind="exact")
    for l in layers:
        assert torch.isnan(res.eigvals[l.name]).all(), (l.name, res.eigvals[l.name][:2])
