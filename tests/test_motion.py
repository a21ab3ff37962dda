"""The curvature a node's motion feels: u_iᵀ H_i u_i from the layer factor, against dense blocks
(themselves checked against torch.func.hessian in test_curvature.py) and against hessian directly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trajscope.analysis.curvature import block_quadratic_forms, dense_blocks, node_curvature
from trajscope.analysis.nodes import find_node_layers, node_matrix

from test_curvature import DT, SeqMLP, _params, mlp, mlp_data, ref_exact, small_cnn


def _check_all_forms(res, layers, seen):
    g = torch.Generator().manual_seed(7)
    for l in layers:
        fac = res.factors[l.name]
        seen.add((fac.form, fac.G is not None))
        U = torch.randn(l.n_nodes, l.node_dim, generator=g, dtype=DT)
        D = dense_blocks(fac)
        want = torch.einsum("np,npq,nq->n", U, D, U)
        got = block_quadratic_forms(fac, U)
        assert got.dtype == torch.float64 and got.shape == (l.n_nodes,)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["ggn", "exact"])
def test_quadratic_forms_equal_dense_blocks_for_every_factor_form(kind):
    seen: set = set()
    model = mlp(nn.Tanh)
    x, y, loss_fn = mlp_data("ce")
    layers = find_node_layers(model)
    _check_all_forms(node_curvature(model, _params(model), {}, x, y, loss_fn, layers, kind=kind), layers, seen)
    for act in (nn.ReLU, nn.Tanh):
        model, x, y, loss_fn = small_cnn(act, True)
        layers = find_node_layers(model)
        _check_all_forms(node_curvature(model, _params(model), {}, x, y, loss_fn, layers, kind=kind), layers, seen)
    model = SeqMLP(nn.Tanh).to(DT)
    layers = find_node_layers(model)
    x3, y3 = torch.randn(3, 4, 4, dtype=DT), torch.randn(3, 3, dtype=DT)
    _check_all_forms(node_curvature(model, _params(model), {}, x3, y3, nn.MSELoss(), layers, kind=kind), layers, seen)
    forms = {f for f, _ in seen}
    assert forms >= ({"diag", "sqrt"} if kind == "ggn" else {"diag", "block"})
    if kind == "ggn":  # both storages of the sqrt form
        assert ("sqrt", True) in seen and ("sqrt", False) in seen


def test_quadratic_form_of_a_node_equals_its_hessian():
    model = mlp(nn.Tanh)
    x, y, loss_fn = mlp_data("mse")
    params = _params(model)
    layers = find_node_layers(model)
    res = node_curvature(model, params, {}, x, y, loss_fn, layers, kind="exact")
    l = layers[0]
    U = node_matrix(res.grads, l)           # the gradient direction, as the motion of GD
    q = block_quadratic_forms(res.factors[l.name], U)
    for i in range(l.n_nodes):
        H = ref_exact(model, params, x, y, loss_fn, l, i)
        assert abs(float(q[i]) - float(U[i] @ H @ U[i])) <= 1e-10 * (1 + abs(float(q[i])))


def test_zero_and_nan_factors():
    model = mlp(nn.Tanh)
    x, y, loss_fn = mlp_data("mse")
    params = _params(model)
    params["0.weight"] = params["0.weight"] * float("nan")
    layers = find_node_layers(model)
    res = node_curvature(model, params, {}, x, y, loss_fn, layers)
    q = block_quadratic_forms(res.factors["0"], torch.ones(6, 9, dtype=DT))
    assert torch.isnan(q).all()
