"""The curvature a node's motion feels: u_iᵀ H_i u_i from the layer factor, against dense blocks
(themselves checked against torch.func.hessian in tests/curvature/test_curvature.py) and against hessian directly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.calls import node_curvature
from tests.helpers.references import DT, SeqMLP, _params, mlp, mlp_data, ref_exact, small_cnn
from trajscope.curvature.blocks import block_quadratic_forms, dense_blocks
from trajscope.nodes import find_node_layers, node_matrix


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
    U = node_matrix(res.grads, l)  # the gradient direction, as the motion of GD
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


# ----------------------------------------------------------------------------- fractions of the motion
def test_motion_fractions_split_the_motion_over_the_map_directions():
    """A block with known eigenvectors (a rotation Q of diag(a)); GD with lr 1: μ = 1 − a."""
    from trajscope.curvature.factors import LayerFactor
    from trajscope.dynamics.motion import motion_fractions
    from trajscope.dynamics.optimizers import node_map, update_rule
    from trajscope.nodes import NodeLayer

    a = torch.tensor([0.5, 1e-4, 2.3], dtype=DT)  # contracting, neutral (δ = 1e-3), unstable (μ = −1.3)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=DT))
    # a "sqrt" factor with G_i = diag(√a) Qᵀ: H_i = Q diag(a) Qᵀ; two identical nodes
    layer = NodeLayer(name="l", kind="linear", weight="w", bias=None, n_nodes=2, node_dim=3)
    G = (a.sqrt()[:, None] * Q.T).expand(2, 3, 3).contiguous()
    fac = LayerFactor(layer, "sqrt", "ggn", X=torch.zeros(1, 1, 1, 3, dtype=DT), G=G, rank_bound=3)
    rule = update_rule("SGD", {"lr": 1.0}, None)
    nm = node_map(rule, None, 3)
    c = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]], dtype=DT)  # components along Q's columns
    u = c @ Q.T
    neutral, unstable = motion_fractions(fac, nm, nm.rule, u, None, 1e-3)
    torch.testing.assert_close(neutral, torch.tensor([0.64, 0.36], dtype=DT))
    torch.testing.assert_close(unstable, torch.tensor([0.0, 0.64], dtype=DT))
    # preconditioned coordinates: A = D^{1/2} H D^{1/2} with ũ = D^{-1/2} u (D = 4: a → 4a)
    adam_like = type(nm)(rule=rule, transformed=True, sign=1.0, shift=0.0)
    neutral, unstable = motion_fractions(fac, adam_like, rule, u, torch.full((2, 3), 4.0, dtype=DT), 1e-3)
    # 4a = [2, 4e-4, 9.2]: μ = [−1, 1 − 4e-4, −8.2]: the first is not unstable (|μ| = 1), the second neutral
    torch.testing.assert_close(neutral, torch.tensor([0.64, 0.36], dtype=DT))
    torch.testing.assert_close(unstable, torch.tensor([0.0, 0.64], dtype=DT))


def test_motion_fractions_end_to_end_against_dense_hessians(tmp_path):
    """SGD with momentum (two roots per direction) on a tanh MLP, analysed with motion_fractions:
    against torch.func.hessian blocks, their eigenvectors and the heavy-ball roots by hand."""
    import numpy as np

    import trajscope
    from tests.helpers.analysis import batches, make_mlp, mlp_spec, node_rows, record

    sizes = (3, 5, 2)
    model = make_mlp(sizes, activation="tanh")
    lr, beta = 0.3, 0.9
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    data = batches(6, 3, 2, b=8)
    record(tmp_path / "run", model, opt, nn.MSELoss(), data, **mlp_spec(sizes, "tanh"))
    res = trajscope.analyze(
        tmp_path / "run", dtype="float64", curvature="exact", motion_fractions=True, sharpness=False
    )[tmp_path / "run"]
    delta = res.attrs["delta"]
    run = trajscope.open_run(tmp_path / "run")
    ref_model = make_mlp(sizes, activation="tanh")
    layer = find_node_layers(ref_model)[0]
    k = 2  # a step with a full momentum buffer
    t = int(res.steps[k])
    params = {n: v.to(DT) for n, v in run.params(t).items()}
    x, y = data[t]
    u = node_rows(run.params(t + 1), "0") - node_rows(run.params(t), "0")
    for i in range(layer.n_nodes):
        H = ref_exact(ref_model, params, x, y, nn.MSELoss(), layer, i)
        w, V = torch.linalg.eigh(H)
        share = (V.T @ u[i].to(DT)) ** 2 / float(u[i].to(DT) @ u[i].to(DT))
        neutral = unstable = 0.0
        for a, s in zip(w.tolist(), share.tolist()):
            roots = np.roots([1.0, -(1 + beta - lr * a), beta])
            neutral += s * bool((np.abs(roots - 1) <= delta).any())
            unstable += s * bool((np.abs(roots) - 1 > delta).any())
        assert res.node("0", "neutral_fraction")[k, i] == pytest.approx(neutral, abs=1e-6)
        assert res.node("0", "unstable_fraction")[k, i] == pytest.approx(unstable, abs=1e-6)
