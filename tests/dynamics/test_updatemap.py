"""Update-map spectra (SPEC §5) against finite-difference Jacobians of real torch.optim steps.

The step of a real optimizer is a function F of (parameters, optimizer state). Its central
finite-difference Jacobian, restricted to one node's coordinates (its parameters and the
same entries of each state tensor), must have the eigenvalues that
`update_map_eigenvalues` / `node_update_spectra` predict from the node's curvature
eigenvalues, computed here with dense `torch.func.hessian` in float64.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from trajscope.dynamics.updatemap import (
    UpdateRule,
    adam_preconditioner,
    node_update_spectra,
    preconditioner,
    stability_threshold,
    update_map_eigenvalues,
    update_rule,
)

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
class LinReg:
    """Linear regression, MSE: one parameter Θ (n_out, n_in + 1) = [W | b]; node i = row i."""

    def __init__(self, n_out: int, n_in: int, batch: int, seed: int, scale: float = 3.0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, n_in, generator=g, dtype=F64) * torch.logspace(0, math.log10(scale), n_in, dtype=F64)
        self.xa = torch.cat([x, torch.ones(batch, 1, dtype=F64)], dim=1)
        self.y = torch.randn(batch, n_out, generator=g, dtype=F64)
        self.shapes = [(n_out, n_in + 1)]
        self.gen = g

    def loss(self, params: list[torch.Tensor]) -> torch.Tensor:
        return torch.mean((self.xa @ params[0].T - self.y) ** 2)

    def minimiser(self, wd: float = 0.0) -> torch.Tensor:
        """argmin L + wd/2 ‖Θ‖² (minimum-norm least squares when wd = 0)."""
        n = self.xa.shape[0] * self.y.shape[1]
        a = 2.0 / n * self.xa.T @ self.xa + wd * torch.eye(self.xa.shape[1], dtype=F64)
        rhs = 2.0 / n * self.xa.T @ self.y
        return torch.linalg.lstsq(a, rhs).solution.T.contiguous()

    def node_hessian(self, params: list[torch.Tensor], i: int) -> torch.Tensor:
        def f(row):
            th = params[0].clone()
            th = torch.cat([th[:i], row[None], th[i + 1:]])
            return self.loss([th])
        return torch.func.hessian(f)(params[0][i].clone())

    def node_index(self, i: int) -> list[tuple[int, torch.Tensor]]:
        p = self.shapes[0][1]
        return [(0, torch.arange(i * p, (i + 1) * p))]


class MLP:
    """tanh MLP (non-quadratic): nodes of its first layer, row of W1 plus b1[i]."""

    def __init__(self, seed: int, n_in: int = 3, hidden: int = 3, batch: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, n_in, generator=g, dtype=F64)
        self.y = torch.randn(batch, 1, generator=g, dtype=F64)
        self.shapes = [(hidden, n_in), (hidden,), (1, hidden), (1,)]
        self.n_in = n_in

    def loss(self, params):
        w1, b1, w2, b2 = params
        return torch.mean((torch.tanh(self.x @ w1.T + b1) @ w2.T + b2 - self.y) ** 2)

    def node_hessian(self, params, i):
        def f(row):
            w1 = torch.cat([params[0][:i], row[None, :-1], params[0][i + 1:]])
            b1 = torch.cat([params[1][:i], row[-1:], params[1][i + 1:]])
            return self.loss([w1, b1, params[2], params[3]])
        return torch.func.hessian(f)(torch.cat([params[0][i], params[1][i:i + 1]]))

    def node_index(self, i):
        return [(0, torch.arange(i * self.n_in, (i + 1) * self.n_in)), (1, torch.tensor([i]))]


def real_step(model, opt_cls, hp, params, state, keys, group_overrides=None):
    """One real optimizer step from (params, state): returns new params and state tensors."""
    leaves = [p.clone().requires_grad_(True) for p in params]
    grads = torch.autograd.grad(model.loss(leaves), leaves)
    for leaf, g in zip(leaves, grads):
        leaf.grad = g
    opt = opt_cls(leaves, **hp)
    for k, v in (group_overrides or {}).items():
        opt.param_groups[0][k] = v
    for j, leaf in enumerate(leaves):
        if state is not None:
            opt.state[leaf] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state[j].items()}
    opt.step()
    new_state = [[opt.state[leaf][k] for k in keys] for leaf in leaves]
    return [leaf.detach() for leaf in leaves], new_state


def fd_jacobian(model, opt_cls, hp, params, state, keys, h=1e-6, group_overrides=None):
    """Central-difference Jacobian of the step over z = (params, state[keys]) (flat)."""
    sizes = [p.numel() for p in params]

    def pack(ps, st):
        parts = [p.reshape(-1) for p in ps]
        for k in range(len(keys)):
            parts += [s[k].reshape(-1) for s in st]
        return torch.cat(parts)

    base_state = state

    def unpack(z):
        out, off = [], 0
        for p, n in zip(params, sizes):
            out.append(z[off:off + n].reshape(p.shape)); off += n
        st = [dict(base_state[j]) if base_state is not None else {} for j in range(len(params))]
        for k in keys:
            for j, (p, n) in enumerate(zip(params, sizes)):
                st[j][k] = z[off:off + n].reshape(p.shape).clone(); off += n
        return out, st

    def F(z):
        ps, st = unpack(z)
        new_p, new_st = real_step(model, opt_cls, hp, ps, st if keys or base_state else None, keys, group_overrides)
        return pack(new_p, [[s[k] for k in range(len(keys))] for s in new_st])

    z0 = pack(params, [[s[k] for k in keys] for s in state] if keys else [])
    jac = torch.empty(z0.numel(), z0.numel(), dtype=F64)
    for c in range(z0.numel()):
        e = torch.zeros_like(z0); e[c] = h
        jac[:, c] = (F(z0 + e) - F(z0 - e)) / (2 * h)
    return jac, sizes


def node_coords(model, i, sizes, n_keys):
    """Flat indices of node i in z = (params..., state_key0 params..., ...)."""
    offsets = np.cumsum([0] + sizes)
    total = offsets[-1]
    base = [offsets[j] + idx for j, idx in model.node_index(i)]
    base = torch.cat([torch.as_tensor(b) for b in base])
    return torch.cat([base + k * total for k in range(n_keys + 1)])


def match(pred: np.ndarray, got: np.ndarray) -> float:
    """Max distance of the best one-to-one matching of two eigenvalue multisets."""
    assert pred.shape == got.shape, (pred.shape, got.shape)
    cost = np.abs(pred[:, None] - got[None, :])
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].max())


def eig_desc(h: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Eigenvalues, descending, exact zeros (|λ| <= tol·max) dropped, shape (1, r)."""
    ev = torch.linalg.eigvalsh(h).flip(0)
    keep = ev.abs() > tol * ev.abs().max()
    return ev[keep][None, :]


def check_node(model, rule, params, i, jac, sizes, n_keys, eig, extra=(), tol=1e-6):
    p = sum(len(idx) for _, idx in model.node_index(i))
    idx = node_coords(model, i, sizes, n_keys)
    sub = jac[idx][:, idx].numpy()
    got = np.linalg.eigvals(sub)
    mu, null = update_map_eigenvalues(eig, p, rule)
    pred = np.concatenate([mu[0].numpy(), np.asarray(extra, dtype=complex)])
    assert match(pred, got) < tol, (np.sort_complex(pred), np.sort_complex(got))
    # node_update_spectra: |μ| of acted-on directions + null ones (μ = 1)
    sp = node_update_spectra(eig, p, rule)
    acted = int(sp.acted[0])
    mags = np.concatenate([sp.mu_abs[0, :acted].numpy(), np.ones(int(sp.null_dims[0])), np.abs(extra)])
    assert np.allclose(np.sort(mags), np.sort(np.abs(got)), atol=tol)
    assert math.isclose(float(sp.radius[0]), max(np.abs(pred[: mu.shape[1]])), abs_tol=1e-12)
    return sp


# ----------------------------------------------------------------------------- SGD family
SGD_CASES = [
    # id, hp, keys, overrides
    ("sgd", dict(lr=0.05), [], None),
    ("sgd_wd", dict(lr=0.05, weight_decay=0.3), [], None),
    ("momentum_damp", dict(lr=0.05, momentum=0.8, dampening=0.3), ["momentum_buffer"], None),
    ("momentum_damp_wd", dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.3), ["momentum_buffer"], None),
    ("nesterov", dict(lr=0.05, momentum=0.7, nesterov=True), ["momentum_buffer"], None),
    ("nesterov_wd", dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.3), ["momentum_buffer"], None),
    # torch forbids dampening with Nesterov at construction only; the step honours it
    ("nesterov_damp_wd", dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.2), ["momentum_buffer"], {"dampening": 0.4}),
    ("momentum_maximize_wd", dict(lr=0.05, momentum=0.6, weight_decay=0.5, maximize=True), ["momentum_buffer"], None),
]


@pytest.mark.parametrize("name,hp,keys,overrides", SGD_CASES, ids=[c[0] for c in SGD_CASES])
@pytest.mark.parametrize("rank_deficient", [False, True], ids=["full", "B<p"])
def test_sgd_family_matches_fd_jacobian(name, hp, keys, overrides, rank_deficient):
    # B < p: p - r exact zero eigenvalues (null directions without wd)
    model = LinReg(n_out=2, n_in=4, batch=3 if rank_deficient else 12, seed=1)
    g = model.gen
    params = [torch.randn(*model.shapes[0], generator=g, dtype=F64)]
    state = [{k: torch.randn(*model.shapes[0], generator=g, dtype=F64) for k in keys}]
    jac, sizes = fd_jacobian(model, torch.optim.SGD, hp, params, state, keys, group_overrides=overrides)
    rule = update_rule("torch.optim.sgd.SGD", {**hp, **(overrides or {})}, state[0])
    assert rule.has_buffer == bool(keys)
    for i in range(2):
        eig = eig_desc(model.node_hessian(params, i))
        assert eig.shape[1] == (3 if rank_deficient else 5)
        sp = check_node(model, rule, params, i, jac, sizes, len(keys), eig)
        if rank_deficient and rule.weight_decay == 0:
            assert int(sp.null_dims[0]) == 2  # λ' = 0 -> μ = 1 exactly, not acted on
        else:
            assert int(sp.null_dims[0]) == 0


@pytest.mark.parametrize("hp,keys", [
    (dict(lr=0.1, weight_decay=0.1), []),
    (dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1), ["momentum_buffer"]),
    (dict(lr=0.1, momentum=0.9, nesterov=True), ["momentum_buffer"]),
], ids=["sgd_wd", "momentum", "nesterov"])
def test_restriction_to_a_node_of_a_nonquadratic_mlp(hp, keys):
    """Restricted to θ_i the linearised step only sees the exact block H_ii, any loss."""
    model = MLP(seed=3)
    g = torch.Generator().manual_seed(4)
    params = [torch.randn(*s, generator=g, dtype=F64) for s in model.shapes]
    state = [{k: torch.randn(*s, generator=g, dtype=F64) for k in keys} for s in model.shapes]
    jac, sizes = fd_jacobian(model, torch.optim.SGD, hp, params, state, keys, h=1e-5)
    rule = update_rule("SGD", hp, state[0])
    for i in range(3):
        h = model.node_hessian(params, i)
        eig = torch.linalg.eigvalsh(h).flip(0)[None]  # indefinite exact block: keep all p
        check_node(model, rule, params, i, jac, sizes, len(keys), eig, tol=1e-6)


@pytest.mark.parametrize("hp,overrides", [
    (dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.2), None),
    (dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.2), None),
], ids=["momentum", "nesterov"])
def test_first_step_without_buffer_is_a_single_step_map(hp, overrides):
    model = LinReg(n_out=2, n_in=4, batch=12, seed=2)
    params = [torch.randn(*model.shapes[0], generator=model.gen, dtype=F64)]
    jac, sizes = fd_jacobian(model, torch.optim.SGD, hp, params, None, [])
    rule = update_rule("SGD", hp, None)
    assert not rule.has_buffer and "first step" in rule.note
    for i in range(2):
        eig = eig_desc(model.node_hessian(params, i))
        check_node(model, rule, params, i, jac, sizes, 0, eig)
        lam = eig[0] + 0.2
        coef = hp["lr"] * (1 + hp["momentum"]) if hp.get("nesterov") else hp["lr"]
        mu, _ = update_map_eigenvalues(eig, 5, rule)
        assert torch.allclose(mu[0].real, 1 - coef * lam)


# ----------------------------------------------------------------------------- Adam family
ADAM_CASES = [
    ("adam", torch.optim.Adam, dict(lr=0.02, betas=(0.9, 0.999))),
    ("adam_wd", torch.optim.Adam, dict(lr=0.02, betas=(0.9, 0.999), weight_decay=0.5)),
    ("adam_b1_0.5", torch.optim.Adam, dict(lr=0.05, betas=(0.5, 0.999), weight_decay=0.2)),
    ("adamw", torch.optim.AdamW, dict(lr=0.02, betas=(0.9, 0.999), weight_decay=0.0)),
    ("adamw_wd", torch.optim.AdamW, dict(lr=0.02, betas=(0.9, 0.999), weight_decay=2.0)),
    ("adam_decoupled_flag", torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.999), weight_decay=1.0, decoupled_weight_decay=True)),
    ("adam_maximize", torch.optim.Adam, dict(lr=0.02, betas=(0.9, 0.999), maximize=True)),
]


@pytest.mark.parametrize("name,cls,hp", ADAM_CASES, ids=[c[0] for c in ADAM_CASES])
@pytest.mark.parametrize("rank_deficient", [False, True], ids=["full", "B<p"])
def test_adam_family_matches_fd_jacobian(name, cls, hp, rank_deficient):
    """Regime where v barely moves: near the minimiser (|g| ~ 1e-7), small m, v ≫ g².

    Then the Jacobian over (θ, m, v) is block triangular up to O(1e-7) couplings
    (2(1−β2)·g·H and m'·∂D/∂v): its eigenvalues are the frozen-v map's μ plus β2 (p times,
    the v directions). Tolerance 1e-6.
    """
    model = LinReg(n_out=2, n_in=4, batch=3 if rank_deficient else 12, seed=5, scale=4.0)
    g = model.gen
    decoupled = cls is torch.optim.AdamW or hp.get("decoupled_weight_decay", False)
    wd = hp.get("weight_decay", 0.0)
    theta = model.minimiser(0.0 if decoupled else wd)
    theta = theta + 1e-7 * torch.randn(theta.shape, generator=g, dtype=F64)
    step = 50
    st = {
        "step": torch.tensor(float(step)),
        "exp_avg": 1e-7 * torch.randn(theta.shape, generator=g, dtype=F64),
        "exp_avg_sq": 0.005 + 0.05 * torch.rand(theta.shape, generator=g, dtype=F64),
    }
    keys = ["exp_avg", "exp_avg_sq"]
    params = [theta]
    jac, sizes = fd_jacobian(model, cls, hp, params, [st], keys)
    rule = update_rule(f"torch.optim.{cls.__name__}", hp, st)
    assert rule.kind == ("adamw" if decoupled else "adam") and rule.step == step and rule.has_buffer
    leaf = theta.clone().requires_grad_(True)
    grad = torch.autograd.grad(model.loss([leaf]), leaf)[0]
    dmat = adam_preconditioner(rule, st["exp_avg_sq"], grad, param=theta)
    b2 = hp["betas"][1]
    s = rule.curvature_sign
    kinds_seen = set()
    for i in range(2):
        h = model.node_hessian(params, i)
        d_half = dmat[i].sqrt()
        k = d_half[:, None] * (s * h + rule.coupled_shift * torch.eye(5, dtype=F64)) * d_half[None, :]
        eig = eig_desc(k)
        sp = check_node(model, rule, params, i, jac, sizes, 2, eig, extra=[b2] * 5, tol=1e-6)
        mu, _ = update_map_eigenvalues(eig, 5, rule)
        kinds_seen |= {"complex" if bool((mu.imag != 0).any()) else "real"}
        if rank_deficient and rule.coupled_shift == 0 and rule.decay_factor == 1.0:
            assert int(sp.null_dims[0]) == 2
        if rule.decay_factor != 1.0 and rank_deficient:
            # AdamW: zero-curvature directions decay with μ = c = 1 − α·wd (acted on)
            assert int(sp.null_dims[0]) == 0
            assert torch.isclose(sp.mu_abs[0], torch.tensor(rule.decay_factor, dtype=F64)).any()
    if not rule.maximize:  # ascent on a convex loss: λ̃ < 0, real roots only
        assert "complex" in kinds_seen  # the test exercises complex pairs, not only real roots


def test_adam_first_step_with_large_eps():
    """First step (no state): D depends on g itself; with eps ≫ |g| it is frozen to O(|g|/eps)."""
    model = LinReg(n_out=1, n_in=3, batch=10, seed=7)
    theta = model.minimiser(0.1) + 1e-6 * torch.randn(1, 4, generator=model.gen, dtype=F64)
    hp = dict(lr=3.0, betas=(0.9, 0.999), eps=10.0, weight_decay=0.1)
    jac, sizes = fd_jacobian(model, torch.optim.Adam, hp, [theta], None, [])
    rule = update_rule("Adam", hp, {})
    assert not rule.has_buffer and rule.step == 0
    leaf = theta.clone().requires_grad_(True)
    grad = torch.autograd.grad(model.loss([leaf]), leaf)[0]
    d = adam_preconditioner(rule, None, grad, param=theta)[0]
    k = d.sqrt()[:, None] * (model.node_hessian([theta], 0) + 0.1 * torch.eye(4, dtype=F64)) * d.sqrt()[None, :]
    check_node(model, rule, [theta], 0, jac, sizes, 0, eig_desc(k), tol=1e-5)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd,maximize", [(0.0, False), (0.3, False), (0.3, True)])
def test_adam_preconditioner_is_the_real_denominator(amsgrad, wd, maximize):
    """θ' − θ = −a·D·m' for Adam: recover D from one real step and compare."""
    g = torch.Generator().manual_seed(11)
    theta = torch.randn(3, 4, generator=g, dtype=F64)
    grad = torch.randn(3, 4, generator=g, dtype=F64)
    st = {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, 4, generator=g, dtype=F64),
          "exp_avg_sq": torch.rand(3, 4, generator=g, dtype=F64)}
    if amsgrad:
        st["max_exp_avg_sq"] = torch.rand(3, 4, generator=g, dtype=F64) * 2
    hp = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-3, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
    leaf = theta.clone().requires_grad_(True)
    leaf.grad = grad.clone()
    opt = torch.optim.Adam([leaf], **hp)
    opt.state[leaf] = {k: v.clone() for k, v in st.items()}
    opt.step()
    rule = update_rule("torch.optim.adam.Adam", hp, st)
    gg = (-grad if maximize else grad) + wd * theta
    m_new = 0.9 * st["exp_avg"] + 0.1 * gg
    d_real = (theta - leaf.detach()) / (rule.bias_corrected_lr * m_new)
    d = adam_preconditioner(rule, st["exp_avg_sq"], grad, st.get("max_exp_avg_sq"), param=theta)
    assert d.shape == theta.shape
    assert torch.allclose(d, d_real, rtol=1e-9)
    assert rule.maximize == maximize and ("maximize" in rule.note) == maximize


# ----------------------------------------------------------------------------- rules
def test_update_rule_parsing():
    r = update_rule("torch.optim.sgd.SGD", {"lr": torch.tensor(0.1), "momentum": 0.0, "weight_decay": 1e-4}, {})
    assert r.kind == "sgd" and r.lr == pytest.approx(0.1) and r.coupled_shift == 1e-4 and not r.preconditioned
    r = update_rule("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, {"momentum_buffer": torch.zeros(2)})
    assert r.kind == "nesterov" and r.has_buffer
    r = update_rule("SGD", {"lr": 0.1, "momentum": 0.9}, {"momentum_buffer": None})
    assert r.kind == "sgd_momentum" and not r.has_buffer
    r = update_rule("torch.optim.adamw.AdamW", {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.01},
                    {"step": torch.tensor(9.0), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)})
    assert r.kind == "adamw" and r.preconditioned and r.coupled_shift == 0 and r.step == 9 and r.beta2 == 0.95
    assert r.decay_factor == pytest.approx(1 - 1e-5)
    r = update_rule("Adam", {"lr": 1e-3, "weight_decay": 0.01}, None)
    assert r.kind == "adam" and r.coupled_shift == 0.01 and r.step == 0 and not r.has_buffer
    r = update_rule("torch.optim.adadelta.Adadelta", {"lr": 0.01, "rho": 0.9}, {"square_avg": torch.ones(1)})
    assert r.kind == "gd_fallback" and "unsupported optimizer Adadelta" in r.note and r.lr == 0.01
    r = update_rule("torch.optim.rmsprop.RMSprop", {"lr": 0.01, "alpha": 0.99}, {"square_avg": torch.ones(1)})
    assert r.kind == "rmsprop" and r.preconditioned and r.beta2 == 0.99 and r.lr == 0.01
    r = update_rule("LBFGS", {}, None)
    assert r.kind == "gd_fallback" and math.isnan(r.lr)
    sp = node_update_spectra(torch.tensor([[2.0, 1.0]], dtype=F64), 3, update_rule("Lion", {"lr": 0.1}, None))
    assert torch.allclose(sp.mu_abs[0], torch.tensor([0.8, 0.9], dtype=F64)) and int(sp.null_dims[0]) == 1


def test_spectra_vectorised_and_nonfinite_safe():
    eig = torch.tensor([[4.0, 1.0, 0.0], [math.nan, 1.0, 0.0], [math.inf, 2.0, 1.0], [0.0, 0.0, 0.0]], dtype=F64)
    for rule in [UpdateRule("sgd", 0.1), UpdateRule("sgd_momentum", 0.1, momentum=0.9, has_buffer=True),
                 UpdateRule("nesterov", 0.1, momentum=0.9, has_buffer=True, weight_decay=0.1),
                 UpdateRule("adam", 0.01, step=3, has_buffer=True), UpdateRule("adamw", 0.01, 0.1, has_buffer=True)]:
        sp = node_update_spectra(eig[:, :2], 4, rule)
        assert sp.mu_abs.shape[0] == 4 and sp.radius.dtype == F64 and sp.acted.dtype == torch.int32
        assert bool(torch.isfinite(sp.radius[0])) and not bool(torch.isfinite(sp.radius[1]))
        k = 4 if rule.kind == "sgd" else 8
        assert torch.equal(sp.acted + sp.null_dims, torch.full((4,), k, dtype=torch.int32))
        # padding is NaN, valid entries first
        for row in range(4):
            a = int(sp.acted[row])
            assert bool(torch.isnan(sp.mu_abs[row, a:]).all())
    # momentum: every λ' = 0 gives μ = 1 (null) and μ = β (acted)
    sp = node_update_spectra(torch.zeros(2, 0, dtype=F64), 3, UpdateRule("sgd_momentum", 0.1, momentum=0.9, has_buffer=True))
    assert sp.null_dims.tolist() == [3, 3] and sp.acted.tolist() == [3, 3]
    assert torch.allclose(sp.mu_abs, torch.full((2, 3), 0.9, dtype=F64)) and sp.radius.tolist() == [1.0, 1.0]
    # all-dead SGD layer: no acted direction at all
    sp = node_update_spectra(torch.zeros(2, 0, dtype=F64), 3, UpdateRule("sgd", 0.1))
    assert sp.mu_abs.shape == (2, 0) and sp.acted.tolist() == [0, 0] and sp.zero_eig_dims.tolist() == [3, 3]


# ----------------------------------------------------------------------------- thresholds
def _run(opt_hp, lr_factor, steps=1500, momentum_kind="sgd"):
    """GD-type trajectory of torch.optim.SGD on linear regression; returns (‖θ−θ*‖ ratio, threshold, λmax)."""
    model = LinReg(n_out=1, n_in=3, batch=20, seed=13)
    theta_star = model.minimiser()
    h = model.node_hessian([theta_star], 0)
    lam_max = float(torch.linalg.eigvalsh(h)[-1])
    probe = update_rule("SGD", {"lr": 1.0, **opt_hp}, {"momentum_buffer": torch.zeros(1)} if opt_hp.get("momentum") else {})
    thr1 = stability_threshold(probe)  # at lr = 1: threshold ∝ 1/lr
    lr = lr_factor * thr1 / lam_max    # so that λmax = threshold(lr) / lr_factor
    leaf = (theta_star + torch.randn(theta_star.shape, generator=model.gen, dtype=F64)).requires_grad_(True)
    opt = torch.optim.SGD([leaf], lr=lr, **opt_hp)
    d0 = float((leaf.detach() - theta_star).norm())
    for _ in range(steps):
        opt.zero_grad()
        model.loss([leaf]).backward()
        opt.step()
    rule = update_rule("SGD", {"lr": lr, **opt_hp}, opt.state[leaf])
    return float((leaf.detach() - theta_star).norm()) / d0, stability_threshold(rule), lam_max


@pytest.mark.parametrize("opt_hp", [{}, {"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.6, "nesterov": True}],
                         ids=["gd", "heavy_ball", "nesterov"])
def test_threshold_separates_convergence_from_divergence(opt_hp):
    ratio, thr, lam_max = _run(opt_hp, 0.98)
    assert lam_max < thr and ratio < 1e-3
    ratio, thr, lam_max = _run(opt_hp, 1.02)
    assert lam_max > thr and ratio > 1e3


@pytest.mark.parametrize("rule", [
    UpdateRule("sgd", 0.1),
    UpdateRule("sgd_momentum", 0.1, momentum=0.9, has_buffer=False),
    UpdateRule("sgd_momentum", 0.1, momentum=0.9, dampening=0.4, has_buffer=True),
    UpdateRule("nesterov", 0.1, momentum=0.9, has_buffer=True),
    UpdateRule("nesterov", 0.1, momentum=0.8, dampening=0.5, has_buffer=True),
    UpdateRule("nesterov", 0.1, momentum=0.9, has_buffer=False),
    UpdateRule("adam", 0.01, has_buffer=True, step=5),
    UpdateRule("adam", 0.01, has_buffer=False, step=0),
    UpdateRule("adamw", 0.01, 3.0, has_buffer=True, step=100),
    UpdateRule("gd_fallback", 0.3),
], ids=lambda r: f"{r.kind}-{r.has_buffer}-{r.dampening}")
def test_threshold_is_where_the_radius_crosses_one(rule):
    thr = stability_threshold(rule)
    shift = 0.0 if rule.preconditioned else rule.coupled_shift
    lam = torch.tensor([[thr * (1 - 1e-6) - shift], [thr * (1 + 1e-6) - shift]], dtype=F64)
    sp = node_update_spectra(lam, 1, rule)
    assert float(sp.radius[0]) < 1.0 < float(sp.radius[1])


def test_adam_threshold_is_38_over_lr_at_large_t():
    assert stability_threshold(UpdateRule("adam", 0.01, has_buffer=True, step=10_000)) == pytest.approx(3800.0)
    assert stability_threshold(UpdateRule("sgd_momentum", 0.1, momentum=0.9, dampening=1.0, has_buffer=True)) == math.inf


# ----------------------------------------------------------------------------- RMSprop, Adagrad
RMS_CASES = [
    # id, class, hp, state keys, extra eigenvalues per parameter (the frozen moments)
    ("rmsprop", torch.optim.RMSprop, dict(lr=0.01, alpha=0.9), ["square_avg"], [0.9]),
    ("rmsprop_wd", torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, weight_decay=0.5), ["square_avg"], [0.9]),
    ("rmsprop_centered", torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, centered=True),
     ["square_avg", "grad_avg"], [0.9, 0.9]),
    ("rmsprop_momentum", torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.8, weight_decay=0.2),
     ["square_avg", "momentum_buffer"], [0.9]),
    ("rmsprop_maximize", torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, maximize=True), ["square_avg"], [0.9]),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.05), ["sum"], [1.0]),
    ("adagrad_decay_wd", torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=0.3), ["sum"], [1.0]),
]


@pytest.mark.parametrize("name,cls,hp,keys,extra", RMS_CASES, ids=[c[0] for c in RMS_CASES])
@pytest.mark.parametrize("rank_deficient", [False, True], ids=["full", "B<p"])
def test_rmsprop_and_adagrad_match_fd_jacobian(name, cls, hp, keys, extra, rank_deficient):
    """Near the minimiser (|g| ~ 1e-7) the moments barely move: the Jacobian over (θ, moments[, buf])
    has the frozen-moment map's μ plus the moments' own (ρ for RMSprop, 1 for Adagrad's sum)."""
    model = LinReg(n_out=2, n_in=4, batch=3 if rank_deficient else 12, seed=5, scale=4.0)
    g = model.gen
    wd = hp.get("weight_decay", 0.0)
    theta = model.minimiser(wd) + 1e-7 * torch.randn(2, 5, generator=g, dtype=F64)
    st = {"step": torch.tensor(40.0), "square_avg": 0.005 + 0.05 * torch.rand(theta.shape, generator=g, dtype=F64),
          "sum": 0.01 + 0.1 * torch.rand(theta.shape, generator=g, dtype=F64),
          "grad_avg": 1e-8 * torch.randn(theta.shape, generator=g, dtype=F64),
          "momentum_buffer": 1e-7 * torch.randn(theta.shape, generator=g, dtype=F64)}
    st = {k: v for k, v in st.items() if k in keys or k == "step"}
    jac, sizes = fd_jacobian(model, cls, hp, [theta], [st], keys)
    rule = update_rule(f"torch.optim.{cls.__name__}", hp, st)
    assert rule.preconditioned and "unsupported" not in rule.note
    assert rule.kind == ("adagrad" if cls is torch.optim.Adagrad else
                         "rmsprop_momentum" if hp.get("momentum") else "rmsprop")
    leaf = theta.clone().requires_grad_(True)
    grad = torch.autograd.grad(model.loss([leaf]), leaf)[0]
    dmat = preconditioner(rule, st, grad, param=theta)
    s = rule.curvature_sign
    for i in range(2):
        h = model.node_hessian([theta], i)
        d_half = dmat[i].sqrt()
        k = d_half[:, None] * (s * h + rule.coupled_shift * torch.eye(5, dtype=F64)) * d_half[None, :]
        check_node(model, rule, [theta], i, jac, sizes, len(keys), eig_desc(k), extra=extra * 5, tol=1e-6)
    # the threshold is where the map's μ reaches −1
    lam = stability_threshold(rule)
    mu, _ = update_map_eigenvalues(torch.tensor([[lam]], dtype=F64), 1, rule)
    assert torch.isclose(mu.real.min(), torch.tensor(-1.0, dtype=F64), atol=1e-9)


@pytest.mark.parametrize("cls,hp", [(torch.optim.RMSprop, dict(lr=0.1, alpha=0.9, eps=1e-3, weight_decay=0.3)),
                                    (torch.optim.RMSprop, dict(lr=0.1, alpha=0.9, eps=1e-3, centered=True)),
                                    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, eps=1e-3, weight_decay=0.3))])
def test_rmsprop_adagrad_preconditioner_is_the_real_denominator(cls, hp):
    """θ' − θ = −α_t·D·g' for one real step (no momentum): recover D and compare."""
    gen = torch.Generator().manual_seed(11)
    theta, grad = torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64)
    st = {"step": torch.tensor(7.0), "square_avg": torch.rand(3, 4, generator=gen, dtype=F64) + 1,
          "grad_avg": 0.1 * torch.randn(3, 4, generator=gen, dtype=F64), "sum": torch.rand(3, 4, generator=gen, dtype=F64)}
    st = {k: v for k, v in st.items() if k == "step" or k == ("sum" if cls is torch.optim.Adagrad else "square_avg")
          or (k == "grad_avg" and hp.get("centered"))}
    leaf = theta.clone().requires_grad_(True)
    leaf.grad = grad.clone()
    opt = cls([leaf], **hp)
    opt.state[leaf] = {k: v.clone() for k, v in st.items()}
    opt.step()
    rule = update_rule(cls.__name__, hp, st)
    gg = grad + hp.get("weight_decay", 0.0) * theta
    d_real = (theta - leaf.detach()) / (rule.step_lr * gg)
    assert torch.allclose(preconditioner(rule, st, grad, param=theta), d_real, rtol=1e-9)
