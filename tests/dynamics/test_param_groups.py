"""Nodes whose bias sits in another parameter group than their weight row (e.g. no weight decay
on biases): the node map against the Jacobian of the real multi-group optimizer step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import trajscope
from tests.helpers.analysis import linear_spec, make_linear, record
from tests.helpers.calls import node_curvature
from trajscope.dynamics.optimizers import node_map, update_rule
from trajscope.dynamics.updatemap import node_update_spectra

F64 = torch.float64


def real_step_jacobian(w, b, x, y, groups, state, keys):
    """Central differences of one real torch.optim.SGD step of Linear(w, b) under MSE over
    z = (w, b, state[key] of w, state[key] of b); exact for this quadratic loss."""
    n_w = w.numel()

    def step(z):
        wl = z[:n_w].reshape(w.shape).clone().requires_grad_(True)
        bl = z[n_w : n_w + 1].clone().requires_grad_(True)
        loss = nn.functional.mse_loss(x @ wl.T + bl, y)
        wl.grad, bl.grad = torch.autograd.grad(loss, [wl, bl])
        opt = torch.optim.SGD([{"params": [wl], **groups[0]}, {"params": [bl], **groups[1]}])
        off = n_w + 1
        for leaf in (wl, bl):
            st = {k: z[off : off + leaf.numel()].reshape(leaf.shape).clone() for k in keys}
            off += leaf.numel()
            if st:
                opt.state[leaf] = st
        opt.step()
        out = [wl.detach().reshape(-1), bl.detach().reshape(-1)]
        out += [opt.state[leaf][k].reshape(-1) for leaf in (wl, bl) for k in keys]
        return torch.cat(out)

    z0 = torch.cat([w.reshape(-1), b.reshape(-1)] + [state[n][k].reshape(-1) for n in ("weight", "bias") for k in keys])
    jac = torch.empty(z0.numel(), z0.numel(), dtype=F64)
    for c in range(z0.numel()):
        e = torch.zeros_like(z0)
        e[c] = 1e-4
        jac[:, c] = (step(z0 + e) - step(z0 - e)) / 2e-4
    return jac


GROUP_CASES = {
    "lr and wd differ": ({"lr": 0.2, "weight_decay": 0.3}, {"lr": 0.7, "weight_decay": 0.0}, {}),
    "momentum, no decay on bias": (
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.5},
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
        {},
    ),
    "nesterov, bias lr 3x": (
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.2},
        {"lr": 0.15, "momentum": 0.8, "nesterov": True},
        {},
    ),
    "maximize": (
        {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.4, "maximize": True},
        {"lr": 0.3, "momentum": 0.5, "maximize": True},
        {},
    ),
}


@pytest.mark.parametrize("d_in", [3, 12], ids=["p<B", "p>B"])  # dense and Gram routes
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_node_spanning_two_groups_matches_the_real_step(tmp_path, case, d_in):
    hw, hb, _ = GROUP_CASES[case]
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, d_in, generator=g, dtype=F64), torch.randn(7, 1, generator=g, dtype=F64)
    model = make_linear(d_in, 1)
    opt = torch.optim.SGD([{"params": [model.weight], **hw}, {"params": [model.bias], **hb}])
    record(tmp_path / "run", model, opt, nn.MSELoss(), [(x, y)] * 4, **linear_spec(d_in))
    res = next(iter(trajscope.analyze(tmp_path / "run", dtype="float64", sharpness=False).values()))
    run = trajscope.open_run(tmp_path / "run")
    keys = ["momentum_buffer"] if "momentum" in hw else []
    for t, step in enumerate(res.steps):
        ck = run.checkpoint(int(step))
        if keys and not all(ck.optimizer_state.get(n) for n in ("weight", "bias")):
            continue  # first step: no buffer yet
        jac = real_step_jacobian(ck.params["weight"], ck.params["bias"], x, y, [hw, hb], ck.optimizer_state, keys)
        want = np.abs(np.linalg.eigvals(jac.numpy())).max()
        got = float(res.node("", "spectral_radius")[t, 0])
        assert abs(got - want) <= 1e-5 * max(1.0, want), (case, step, got, want)
    assert "map_note" not in res.attrs["layer_info"][""]


@pytest.mark.parametrize("kind", ["ggn", "exact"])
@pytest.mark.parametrize("batch", [5, 40])  # Gram route (B + 1 < p) and dense route
def test_bias_group_eigvals_match_the_dense_transform(kind, batch):
    from trajscope.curvature.spectra import bias_group_eigvals, preconditioned_eigvals
    from trajscope.nodes import find_node_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    x, y = torch.randn(batch, 9, dtype=F64), torch.randint(0, 3, (batch,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    layers = find_node_layers(model)
    cr = node_curvature(model, params, {}, x, y, nn.CrossEntropyLoss(), layers, kind=kind)
    for layer in layers:
        f, p = cr.factors[layer.name], layer.node_dim
        for sign, wd, wd_b, a in [(1.0, 0.3, 0.0, 1.0), (1.0, 0.1, 0.5, 2.5), (-1.0, 0.2, 0.0, 0.4)]:
            scale = torch.ones(layer.n_nodes, p, dtype=F64)
            scale[:, -1] = a
            shift = torch.full((p,), wd, dtype=F64)
            shift[-1] = wd_b
            want = (
                preconditioned_eigvals(f, scale, shift=shift)
                if sign > 0
                else -preconditioned_eigvals(f, scale, shift=-shift).flip(1)
            )
            fast = bias_group_eigvals(f, sign, wd, wd_b, a)
            got = torch.cat([fast, torch.zeros(layer.n_nodes, p - fast.shape[1], dtype=F64)], 1) + wd
            got = got.sort(dim=1, descending=True).values
            scale_ = want.abs().amax(1, keepdim=True)
            assert float(((got - want).abs() / scale_).max()) < 1e-9, (kind, layer.name, sign, wd, wd_b, a)


def test_node_map_cases():
    sgd = update_rule("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, {"momentum_buffer": torch.zeros(1)})
    same = node_map(sgd, sgd, 4)
    assert not same.transformed and same.lr_scale is None and same.note == ""
    assert node_map(sgd, None, 4) == same
    other_beta = update_rule("SGD", {"lr": 0.1, "momentum": 0.5}, {"momentum_buffer": torch.zeros(1)})
    approx = node_map(sgd, other_beta, 4)
    assert "momentum" in approx.note and approx.rule == sgd and not approx.transformed
    no_decay = update_rule("SGD", {"lr": 0.2, "momentum": 0.9}, {"momentum_buffer": torch.zeros(1)})
    exact = node_map(sgd, no_decay, 4)
    assert exact.transformed and exact.note == ""
    assert exact.lr_scale.tolist() == [1.0, 1.0, 1.0, 2.0] and exact.shift.tolist() == [0.01, 0.01, 0.01, 0.0]
    assert exact.rule.weight_decay == 0 and exact.rule.momentum == 0.9
    st = {"exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1), "step": torch.tensor(3.0)}
    adamw = update_rule("AdamW", {"lr": 1e-3, "weight_decay": 0.01}, st)
    adamw_nodecay = update_rule("AdamW", {"lr": 1e-3, "weight_decay": 0.0}, st)
    assert "decoupled decay" in node_map(adamw, adamw_nodecay, 4).note  # not decomposable: approximate
    adamw_lr = update_rule("AdamW", {"lr": 2e-3, "weight_decay": 0.005}, st)  # same 1 - lr*wd
    m = node_map(adamw, adamw_lr, 4)
    assert m.transformed and m.note == "" and m.lr_scale[-1] == 2.0 and float(m.shift.abs().max()) == 0.0


def test_adam_two_groups_match_the_real_step_where_v_decouples():
    """The loss is ½θᵀHθ: at θ = 0 and m = 0 the gradient is 0, so the real Adam step's coupling
    through v (proportional to g and m) vanishes and its Jacobian is exactly the frozen-v map."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(9, 3, generator=g, dtype=F64)
    Xt = torch.cat([X, torch.ones(9, 1, dtype=F64)], 1)
    H = 2 * Xt.T @ Xt / 9  # the MSE Hessian of a Linear(3, 1) node
    v = torch.rand(4, generator=g, dtype=F64) + 0.1
    hw = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.2}
    hb = {"lr": 0.04, "betas": (0.9, 0.99), "eps": 1e-3, "weight_decay": 0.0}

    def step(z):  # z = (θ (4), m (4)); v fixed, g = Hθ
        leaves = [z[:3].clone().requires_grad_(True), z[3:4].clone().requires_grad_(True)]
        full = torch.cat(leaves)
        grad = H @ full
        leaves[0].grad, leaves[1].grad = grad[:3].detach().clone(), grad[3:].detach().clone()
        opt = torch.optim.Adam([{"params": [leaves[0]], **hw}, {"params": [leaves[1]], **hb}])
        for k, leaf in enumerate(leaves):
            sl = slice(0, 3) if k == 0 else slice(3, 4)
            opt.state[leaf] = {"step": torch.tensor(10.0), "exp_avg": z[4:][sl].clone(), "exp_avg_sq": v[sl].clone()}
        opt.step()
        return torch.cat(
            [leaves[0].detach(), leaves[1].detach(), opt.state[leaves[0]]["exp_avg"], opt.state[leaves[1]]["exp_avg"]]
        )

    z0 = torch.zeros(8, dtype=F64)
    jac = torch.stack([(step(z0 + e) - step(z0 - e)) / 2e-6 for e in torch.eye(8, dtype=F64) * 1e-6], dim=1)
    want = np.sort(np.abs(np.linalg.eigvals(jac.numpy())))
    st = {"exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1), "step": torch.tensor(10.0)}
    nm = node_map(update_rule("Adam", hw, st), update_rule("Adam", hb, st), 4)
    assert nm.transformed and nm.note == ""
    # the frozen preconditioner at this step: 1/(sqrt(v_hat) + eps), v_hat = β2 v /(1 - β2^t) (g = 0)
    vhat = 0.99 * v / (1 - 0.99**11)
    d = (1 / (vhat.sqrt() + 1e-3)) * nm.lr_scale
    K = d.sqrt()[:, None] * (H + torch.diag(nm.shift)) * d.sqrt()[None, :]
    lam = torch.linalg.eigvalsh(K).flip(0)[None, :]
    sp = node_update_spectra(lam, 4, nm.rule)
    got = np.sort(np.concatenate([sp.mu_abs[0, : int(sp.acted[0])].numpy(), np.ones(int(sp.null_dims[0]))]))
    np.testing.assert_allclose(got, want, atol=1e-6)
