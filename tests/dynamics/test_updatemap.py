"""Update-map spectra (docs/spec.md §5) against finite-difference Jacobians of real torch.optim steps.

The step of a real optimizer is a function F of (parameters, optimizer state). Its central
finite-difference Jacobian, restricted to one node's coordinates (its parameters and the
same entries of each state tensor), must have the eigenvalues that
`update_map_eigenvalues` / `node_update_spectra` predict from the node's curvature
eigenvalues, computed here with dense `torch.func.hessian` in float64.

Long (over 400 lines) because it holds every case of trajscope.dynamics.updatemap: the review
cases (per optimizer, then the pipeline feeding them) follow the fold marker.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

# imports of the cases folded from test_updatemap_review (below)
from torch import nn

from trajscope.dynamics.kinematics import node_kinematics
from trajscope.dynamics.labels import (
    LABELS,
    REASONS,
    LabelConfig,
    classify,
    collapse_reference_norm,
    resolve_delta,
    stable_labels,
)
from trajscope.dynamics.optimizers import UpdateRule, adam_preconditioner, preconditioner, update_rule
from trajscope.dynamics.updatemap import NodeSpectra, node_update_spectra, stability_threshold, update_map_eigenvalues

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
            th = torch.cat([th[:i], row[None], th[i + 1 :]])
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
            w1 = torch.cat([params[0][:i], row[None, :-1], params[0][i + 1 :]])
            b1 = torch.cat([params[1][:i], row[-1:], params[1][i + 1 :]])
            return self.loss([w1, b1, params[2], params[3]])

        return torch.func.hessian(f)(torch.cat([params[0][i], params[1][i : i + 1]]))

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
            out.append(z[off : off + n].reshape(p.shape))
            off += n
        st = [dict(base_state[j]) if base_state is not None else {} for j in range(len(params))]
        for k in keys:
            for j, (p, n) in enumerate(zip(params, sizes)):
                st[j][k] = z[off : off + n].reshape(p.shape).clone()
                off += n
        return out, st

    def F(z):
        ps, st = unpack(z)
        new_p, new_st = real_step(model, opt_cls, hp, ps, st if keys or base_state else None, keys, group_overrides)
        return pack(new_p, [[s[k] for k in range(len(keys))] for s in new_st])

    z0 = pack(params, [[s[k] for k in keys] for s in state] if keys else [])
    jac = torch.empty(z0.numel(), z0.numel(), dtype=F64)
    for c in range(z0.numel()):
        e = torch.zeros_like(z0)
        e[c] = h
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
    (
        "nesterov_damp_wd",
        dict(lr=0.05, momentum=0.7, nesterov=True, weight_decay=0.2),
        ["momentum_buffer"],
        {"dampening": 0.4},
    ),
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


@pytest.mark.parametrize(
    "hp,keys",
    [
        (dict(lr=0.1, weight_decay=0.1), []),
        (dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1), ["momentum_buffer"]),
        (dict(lr=0.1, momentum=0.9, nesterov=True), ["momentum_buffer"]),
    ],
    ids=["sgd_wd", "momentum", "nesterov"],
)
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


@pytest.mark.parametrize(
    "hp,overrides",
    [
        (dict(lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.2), None),
        (dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.2), None),
    ],
    ids=["momentum", "nesterov"],
)
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
    (
        "adam_decoupled_flag",
        torch.optim.Adam,
        dict(lr=0.02, betas=(0.8, 0.999), weight_decay=1.0, decoupled_weight_decay=True),
    ),
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
    st = {
        "step": torch.tensor(7.0),
        "exp_avg": torch.randn(3, 4, generator=g, dtype=F64),
        "exp_avg_sq": torch.rand(3, 4, generator=g, dtype=F64),
    }
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
    r = update_rule(
        "torch.optim.adamw.AdamW",
        {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.01},
        {"step": torch.tensor(9.0), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)},
    )
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
    for rule in [
        UpdateRule("sgd", 0.1),
        UpdateRule("sgd_momentum", 0.1, momentum=0.9, has_buffer=True),
        UpdateRule("nesterov", 0.1, momentum=0.9, has_buffer=True, weight_decay=0.1),
        UpdateRule("adam", 0.01, step=3, has_buffer=True),
        UpdateRule("adamw", 0.01, 0.1, has_buffer=True),
    ]:
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
    sp = node_update_spectra(
        torch.zeros(2, 0, dtype=F64), 3, UpdateRule("sgd_momentum", 0.1, momentum=0.9, has_buffer=True)
    )
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
    probe = update_rule(
        "SGD", {"lr": 1.0, **opt_hp}, {"momentum_buffer": torch.zeros(1)} if opt_hp.get("momentum") else {}
    )
    thr1 = stability_threshold(probe)  # at lr = 1: threshold ∝ 1/lr
    lr = lr_factor * thr1 / lam_max  # so that λmax = threshold(lr) / lr_factor
    leaf = (theta_star + torch.randn(theta_star.shape, generator=model.gen, dtype=F64)).requires_grad_(True)
    opt = torch.optim.SGD([leaf], lr=lr, **opt_hp)
    d0 = float((leaf.detach() - theta_star).norm())
    for _ in range(steps):
        opt.zero_grad()
        model.loss([leaf]).backward()
        opt.step()
    rule = update_rule("SGD", {"lr": lr, **opt_hp}, opt.state[leaf])
    return float((leaf.detach() - theta_star).norm()) / d0, stability_threshold(rule), lam_max


@pytest.mark.parametrize(
    "opt_hp",
    [{}, {"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.6, "nesterov": True}],
    ids=["gd", "heavy_ball", "nesterov"],
)
def test_threshold_separates_convergence_from_divergence(opt_hp):
    ratio, thr, lam_max = _run(opt_hp, 0.98)
    assert lam_max < thr and ratio < 1e-3
    ratio, thr, lam_max = _run(opt_hp, 1.02)
    assert lam_max > thr and ratio > 1e3


@pytest.mark.parametrize(
    "rule",
    [
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
    ],
    ids=lambda r: f"{r.kind}-{r.has_buffer}-{r.dampening}",
)
def test_threshold_is_where_the_radius_crosses_one(rule):
    thr = stability_threshold(rule)
    shift = 0.0 if rule.preconditioned else rule.coupled_shift
    lam = torch.tensor([[thr * (1 - 1e-6) - shift], [thr * (1 + 1e-6) - shift]], dtype=F64)
    sp = node_update_spectra(lam, 1, rule)
    assert float(sp.radius[0]) < 1.0 < float(sp.radius[1])


def test_adam_threshold_is_38_over_lr_at_large_t():
    assert stability_threshold(UpdateRule("adam", 0.01, has_buffer=True, step=10_000)) == pytest.approx(3800.0)
    assert (
        stability_threshold(UpdateRule("sgd_momentum", 0.1, momentum=0.9, dampening=1.0, has_buffer=True)) == math.inf
    )


# ----------------------------------------------------------------------------- RMSprop, Adagrad
RMS_CASES = [
    # id, class, hp, state keys, extra eigenvalues per parameter (the frozen moments)
    ("rmsprop", torch.optim.RMSprop, dict(lr=0.01, alpha=0.9), ["square_avg"], [0.9]),
    ("rmsprop_wd", torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, weight_decay=0.5), ["square_avg"], [0.9]),
    (
        "rmsprop_centered",
        torch.optim.RMSprop,
        dict(lr=0.01, alpha=0.9, centered=True),
        ["square_avg", "grad_avg"],
        [0.9, 0.9],
    ),
    (
        "rmsprop_momentum",
        torch.optim.RMSprop,
        dict(lr=0.01, alpha=0.9, momentum=0.8, weight_decay=0.2),
        ["square_avg", "momentum_buffer"],
        [0.9],
    ),
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
    st = {
        "step": torch.tensor(40.0),
        "square_avg": 0.005 + 0.05 * torch.rand(theta.shape, generator=g, dtype=F64),
        "sum": 0.01 + 0.1 * torch.rand(theta.shape, generator=g, dtype=F64),
        "grad_avg": 1e-8 * torch.randn(theta.shape, generator=g, dtype=F64),
        "momentum_buffer": 1e-7 * torch.randn(theta.shape, generator=g, dtype=F64),
    }
    st = {k: v for k, v in st.items() if k in keys or k == "step"}
    jac, sizes = fd_jacobian(model, cls, hp, [theta], [st], keys)
    rule = update_rule(f"torch.optim.{cls.__name__}", hp, st)
    assert rule.preconditioned and "unsupported" not in rule.note
    assert rule.kind == (
        "adagrad" if cls is torch.optim.Adagrad else "rmsprop_momentum" if hp.get("momentum") else "rmsprop"
    )
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


@pytest.mark.parametrize(
    "cls,hp",
    [
        (torch.optim.RMSprop, dict(lr=0.1, alpha=0.9, eps=1e-3, weight_decay=0.3)),
        (torch.optim.RMSprop, dict(lr=0.1, alpha=0.9, eps=1e-3, centered=True)),
        (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, eps=1e-3, weight_decay=0.3)),
    ],
)
def test_rmsprop_adagrad_preconditioner_is_the_real_denominator(cls, hp):
    """θ' − θ = −α_t·D·g' for one real step (no momentum): recover D and compare."""
    gen = torch.Generator().manual_seed(11)
    theta, grad = torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64)
    st = {
        "step": torch.tensor(7.0),
        "square_avg": torch.rand(3, 4, generator=gen, dtype=F64) + 1,
        "grad_avg": 0.1 * torch.randn(3, 4, generator=gen, dtype=F64),
        "sum": torch.rand(3, 4, generator=gen, dtype=F64),
    }
    st = {
        k: v
        for k, v in st.items()
        if k == "step"
        or k == ("sum" if cls is torch.optim.Adagrad else "square_avg")
        or (k == "grad_avg" and hp.get("centered"))
    }
    leaf = theta.clone().requires_grad_(True)
    leaf.grad = grad.clone()
    opt = cls([leaf], **hp)
    opt.state[leaf] = {k: v.clone() for k, v in st.items()}
    opt.step()
    rule = update_rule(cls.__name__, hp, st)
    gg = grad + hp.get("weight_decay", 0.0) * theta
    d_real = (theta - leaf.detach()) / (rule.step_lr * gg)
    assert torch.allclose(preconditioner(rule, st, grad, param=theta), d_real, rtol=1e-9)


# ==============================================================================================
# folded from test_updatemap_review:
# Review of the per-node analysis (docs/spec.md §5-§7) against independent references.
#
# References used here never go through trajscope's closed forms:
#
# * SGD family: on the quadratic L = ½ θᵀHθ one real ``torch.optim.SGD`` step is *exactly* linear in
#   (θ, momentum buffer), so applying the real optimizer to basis vectors gives the exact matrix of
#   the step (no finite differences); its eigenvalues come from ``numpy.linalg.eigvals``.
# * Adam family: central differences of one real ``torch.optim.Adam/AdamW`` step over (θ, exp_avg) at
#   θ = 0, exp_avg = 0. There g = 0 and m' = 0, so the coupling through v (∂D/∂g · m') vanishes and the
#   real Jacobian *is* the frozen-v map with D = 1/(√(β2·v/bc2) + ε); the step is odd in (θ, m), so
#   the central difference is exact to O(h²) (D varies with g² only).
# * Thresholds: bisection of the spectral radius of those real-step matrices.
# * Labels / kinematics: hand-computed cases of the docs/spec.md §6/§7 rules.
#
# Tests marked "Regression test" failed before the fixes this review led to.
# ==============================================================================================

L = {name: i for i, name in enumerate(LABELS)}
R = {name: i for i, name in enumerate(REASONS)}


# ============================================================================ independent references
def sym(eigs, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with exactly the given spectrum (random orthogonal basis)."""
    p = len(eigs)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))
    return q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ q.T


def sgd_step_matrix(H: torch.Tensor, hp: dict, with_buffer: bool) -> np.ndarray:
    """Exact matrix of one real torch.optim.SGD step on L = ½θᵀHθ over (θ[, buf])."""
    p = H.shape[0]
    dim = 2 * p if with_buffer else p
    M = np.zeros((dim, dim))
    for j in range(dim):
        z = torch.zeros(dim, dtype=F64)
        z[j] = 1.0
        th = z[:p].clone().requires_grad_(True)
        th.grad = (H @ z[:p]).clone()
        opt = torch.optim.SGD([th], **{k: v for k, v in hp.items() if k != "dampening"})
        if "dampening" in hp:  # torch refuses Nesterov + dampening at construction only
            opt.param_groups[0]["dampening"] = hp["dampening"]
        if with_buffer:
            opt.state[th] = {"momentum_buffer": z[p:].clone()}
        opt.step()
        out = [th.detach()] + ([opt.state[th]["momentum_buffer"]] if with_buffer else [])
        M[:, j] = torch.cat(out).numpy()
    return M


def adam_step_jacobian(
    cls,
    H: torch.Tensor,
    hp: dict,
    v: torch.Tensor | None,
    step: int,
    h: float = 1e-6,
    max_v: torch.Tensor | None = None,
) -> np.ndarray:
    """Central-difference Jacobian of one real Adam/AdamW step over (θ[, exp_avg]) at θ = 0, exp_avg = 0."""
    p = H.shape[0]
    buf = v is not None
    dim = 2 * p if buf else p

    def F(z):
        th = z[:p].clone().requires_grad_(True)
        th.grad = (H @ z[:p]).clone()
        opt = cls([th], **hp)
        if buf:
            opt.state[th] = {"step": torch.tensor(float(step)), "exp_avg": z[p:].clone(), "exp_avg_sq": v.clone()}
            if hp.get("amsgrad"):
                opt.state[th]["max_exp_avg_sq"] = max_v.clone()
        opt.step()
        return torch.cat([th.detach()] + ([opt.state[th]["exp_avg"]] if buf else []))

    J = np.zeros((dim, dim))
    for j in range(dim):
        e = torch.zeros(dim, dtype=F64)
        e[j] = h
        J[:, j] = ((F(e) - F(-e)) / (2 * h)).numpy()
    return J


def fixed_dims(M: np.ndarray, tol: float = 1e-9) -> int:
    """dim ker(M − I): directions the step leaves exactly fixed (geometric multiplicity of μ = 1)."""
    s = np.linalg.svd(M - np.eye(M.shape[0]), compute_uv=False)
    return int((s <= tol * max(1.0, s.max())).sum())


def all_abs(sp: NodeSpectra, row: int = 0) -> np.ndarray:
    """The |μ| multiset a NodeSpectra row stands for: acted entries plus null_dims ones."""
    a = int(sp.acted[row])
    return np.sort(np.concatenate([sp.mu_abs[row, :a].numpy(), np.ones(int(sp.null_dims[row]))]))


def explicit(eigs) -> torch.Tensor:
    """The row node_update_spectra is given: non-zero eigenvalues, descending (zeros implicit)."""
    ev = sorted((e for e in eigs if e != 0.0), reverse=True)
    return torch.tensor([ev], dtype=F64).reshape(1, len(ev))


# ============================================================================ 1. SGD family vs real steps
SGD_HP = [
    ("gd", dict(lr=0.1)),
    ("gd_wd", dict(lr=0.1, weight_decay=0.3)),
    ("heavy_ball_damp", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("heavy_ball_damp_wd", dict(lr=0.05, momentum=0.8, dampening=0.5, weight_decay=0.3)),
    ("nesterov", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("nesterov_damp_wd", dict(lr=0.1, momentum=0.7, nesterov=True, dampening=0.4, weight_decay=0.3)),
    ("heavy_ball_maximize_wd", dict(lr=0.1, momentum=0.6, weight_decay=0.5, maximize=True)),
    ("nesterov_maximize", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
]
# p = 3..8; exact zeros (implicit and explicit), a negative λ (exact Hessian; −0.3 = −wd gives λ' = 0),
# curvature far beyond 2/α, repeated eigenvalues
EIG_SETS = [
    ("p3_full", [4.0, 1.0, 0.25]),
    ("p5_zeros", [30.0, 5.0, 0.0, 0.0, 0.0]),
    ("p8_mixed", [500.0, 30.0, 5.0, 1.0, -0.3, -2.0, 0.0, 0.0]),
    ("p6_repeated", [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]),
    ("p4_all_zero", [0.0, 0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("name,hp", SGD_HP, ids=[c[0] for c in SGD_HP])
@pytest.mark.parametrize("eid,eigs", EIG_SETS, ids=[c[0] for c in EIG_SETS])
def test_sgd_family_against_exact_real_step_matrix(name, hp, eid, eigs):
    p = len(eigs)
    H = sym(eigs, seed=p)
    for with_buf in [False, True] if hp.get("momentum") else [False]:
        M = sgd_step_matrix(H, hp, with_buf)
        ref = np.sort(np.abs(np.linalg.eigvals(M)))
        rule = update_rule("torch.optim.sgd.SGD", hp, {"momentum_buffer": torch.zeros(1)} if with_buf else {})
        sp = node_update_spectra(explicit(eigs), p, rule)
        got = all_abs(sp)
        scale = max(1.0, ref.max())
        np.testing.assert_allclose(got, ref, atol=1e-11 * scale, rtol=0)
        assert float(sp.radius[0]) == pytest.approx(ref.max(), rel=1e-12, abs=1e-12)
        assert int(sp.acted[0]) + int(sp.null_dims[0]) == M.shape[0]
        # null_dims is the number of fixed directions of the real step
        assert int(sp.null_dims[0]) == fixed_dims(M)
        assert int(sp.zero_eig_dims[0]) == sum(e == 0.0 for e in eigs)
        # the inspection path agrees too (complex values, not only magnitudes)
        mu, null = update_map_eigenvalues(explicit(eigs), p, rule)
        ref_c = np.linalg.eigvals(M)
        cost = np.abs(mu[0].numpy()[:, None] - ref_c[None, :])
        r_, c_ = linear_sum_assignment(cost)
        assert cost[r_, c_].max() < 1e-10 * scale
        assert int(null.sum()) == int(sp.null_dims[0])


# ============================================================================ 2. Adam family vs real steps
ADAM_HP = [
    ("adam", torch.optim.Adam, dict(lr=0.01, betas=(0.9, 0.999))),
    ("adam_wd", torch.optim.Adam, dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.5)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.0)),
    ("adamw_wd", torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=3.0)),
    ("adam_maximize_wd", torch.optim.Adam, dict(lr=0.01, betas=(0.9, 0.999), maximize=True, weight_decay=0.2)),
    ("adam_amsgrad", torch.optim.Adam, dict(lr=0.01, betas=(0.9, 0.999), amsgrad=True)),
    ("adamw_amsgrad_wd", torch.optim.AdamW, dict(lr=0.02, betas=(0.5, 0.9), amsgrad=True, weight_decay=1.0)),
]


@pytest.mark.parametrize("name,cls,hp", ADAM_HP, ids=[c[0] for c in ADAM_HP])
def test_adam_family_against_real_step_jacobian(name, cls, hp):
    p = 6
    eigs = [50.0, 4.0, -2.0, 0.0, 0.0, 0.0]  # indefinite exact block with 3 exact zeros
    H = sym(eigs, seed=2)
    g = torch.Generator().manual_seed(3)
    v = 0.5 + torch.rand(p, generator=g, dtype=F64)
    max_v = v * (1 + torch.rand(p, generator=g, dtype=F64)) if hp.get("amsgrad") else None
    step = 7
    J = adam_step_jacobian(cls, H, hp, v, step, max_v=max_v)
    st = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros(p, dtype=F64), "exp_avg_sq": v}
    rule = update_rule(f"torch.optim.{cls.__name__}", hp, st)
    assert rule.has_buffer and rule.step == step
    D = adam_preconditioner(rule, v, torch.zeros(p, dtype=F64), max_v, param=torch.zeros(p, dtype=F64))
    K = D.sqrt()[:, None] * (rule.curvature_sign * H + rule.coupled_shift * torch.eye(p, dtype=F64)) * D.sqrt()[None, :]
    ev = torch.linalg.eigvalsh(K).flip(0)
    ev = ev[ev.abs() > 1e-12 * ev.abs().max()][None, :]
    sp = node_update_spectra(ev, p, rule)
    ref = np.sort(np.abs(np.linalg.eigvals(J)))
    np.testing.assert_allclose(all_abs(sp), ref, atol=1e-8, rtol=0)
    assert float(sp.radius[0]) == pytest.approx(ref.max(), abs=1e-8)
    assert int(sp.null_dims[0]) == fixed_dims(J, tol=1e-7)
    # without coupled L2 or decoupled decay the 3 zero-curvature directions are null; AdamW decay acts on them
    expect_null = 3 if (rule.coupled_shift == 0 and rule.decay_factor == 1.0) else 0
    assert int(sp.null_dims[0]) == expect_null


def test_adam_first_step_against_real_step_jacobian():
    """No state yet: μ = c − αλ̃ with D = 1/(|g| + ε); at g → 0 and ε = 1e3 the real step is that map."""
    p = 4
    H = sym([3.0, 1.0, 0.0, 0.0], seed=5)
    for cls, hp in [
        (torch.optim.Adam, dict(lr=50.0, eps=1e3, weight_decay=0.1)),
        (torch.optim.AdamW, dict(lr=50.0, eps=1e3, weight_decay=0.004)),
    ]:
        J = adam_step_jacobian(cls, H, hp, None, 0, h=1e-7)
        rule = update_rule(cls.__name__, hp, {})
        assert not rule.has_buffer
        D = adam_preconditioner(rule, None, torch.zeros(p, dtype=F64), param=torch.zeros(p, dtype=F64))
        K = D.sqrt()[:, None] * (H + rule.coupled_shift * torch.eye(p, dtype=F64)) * D.sqrt()[None, :]
        ev = torch.linalg.eigvalsh(K).flip(0)
        ev = ev[ev.abs() > 1e-12][None, :]
        sp = node_update_spectra(ev, p, rule)
        np.testing.assert_allclose(all_abs(sp), np.sort(np.abs(np.linalg.eigvals(J))), atol=1e-7)
        assert int(sp.null_dims[0]) == fixed_dims(J, tol=1e-7)


def test_unknown_optimizer_is_plain_gd_map():
    eigs = [3.0, 1.0, 0.0, 0.0, -0.5]
    rule = update_rule("torch.optim.adadelta.Adadelta", {"lr": 0.2, "weight_decay": 0.7, "rho": 0.9}, {})
    assert rule.kind == "gd_fallback" and "unsupported optimizer Adadelta" in rule.note
    sp = node_update_spectra(explicit(eigs), 5, rule)
    # plain gradient descent with the group's lr on the loss curvature (no wd, no momentum)
    ref = np.sort(np.abs(np.linalg.eigvals(np.eye(5) - 0.2 * sym(eigs).numpy())))
    np.testing.assert_allclose(all_abs(sp), ref, atol=1e-12)
    assert int(sp.null_dims[0]) == 2 and stability_threshold(rule) == pytest.approx(10.0)


# Regression test (found in review, fixed): the fallback rule drops maximize (kind gd_fallback
# never mirrors) but its note still claims 'curvature enters mirrored' (updatemap.update_rule)
def test_fallback_note_matches_the_map_under_maximize():
    rule = update_rule("Adadelta", {"lr": 0.1, "maximize": True}, {})
    mirrored_map = node_update_spectra(torch.tensor([[1.0]], dtype=F64), 1, rule).mu_abs[0, 0].item() == pytest.approx(
        1.1
    )
    assert ("mirrored" in rule.note) == mirrored_map


# ============================================================================ 3. compaction / ordering contract
ORDER_RULES = [
    UpdateRule("sgd", 0.1),
    UpdateRule("sgd", 0.1, weight_decay=0.2),
    UpdateRule("sgd_momentum", 0.1, momentum=0.9, dampening=0.2, has_buffer=True),
    UpdateRule("sgd_momentum", 0.1, momentum=0.9, has_buffer=False),
    UpdateRule("nesterov", 0.1, momentum=0.8, has_buffer=True, weight_decay=0.1),
    UpdateRule("nesterov", 0.1, momentum=0.8, has_buffer=False),
    UpdateRule("adam", 0.01, has_buffer=True, step=4),
    UpdateRule("adamw", 0.01, weight_decay=5.0, has_buffer=True, step=4),
    UpdateRule("adamw", 0.01, weight_decay=5.0, has_buffer=False),
    UpdateRule("gd_fallback", 0.3),
]


def _naive_row(row: torch.Tensor, p: int, rule: UpdateRule):
    """Per-node loop over explicitly padded p eigenvalues: the ordering contract of NodeSpectra."""
    mu, null = update_map_eigenvalues(torch.cat([row, row.new_zeros(p - row.numel())])[None], p, rule)
    mu, null = mu[0], null[0]
    keep = [abs(complex(m)) for m, n in zip(mu.tolist(), null.tolist()) if not n]
    return keep, int(null.sum())


@pytest.mark.parametrize("rule", ORDER_RULES, ids=lambda r: f"{r.kind}-{r.has_buffer}-{r.weight_decay}")
def test_compaction_matches_a_per_node_loop(rule):
    """Rows with different null counts, explicit zeros, NaN/Inf, all-zero rows, in one batch."""
    p, r = 7, 4
    eig = torch.tensor(
        [
            [5.0, 2.0, 1.0, 0.5],
            [3.0, 0.0, 0.0, 0.0],  # explicit zeros on top of p − r implicit ones
            [0.0, 0.0, 0.0, 0.0],  # dead
            [-0.2, 0.0, 1.0, -0.2],  # wd cancels −0.2 for sgd wd 0.2 (λ' = 0), unsorted
            [math.nan, 1.0, 0.0, 0.0],
            [math.inf, -math.inf, 1.0, 0.0],
            [1e3, 1e-300, 0.0, 7.0],
        ],
        dtype=F64,
    )
    sp = node_update_spectra(eig, p, rule)
    k = 2 * p if rule.kind in ("sgd_momentum", "nesterov", "adam", "adamw") and rule.has_buffer else p
    assert torch.equal(sp.acted + sp.null_dims, torch.full((eig.shape[0],), k, dtype=torch.int32))
    assert sp.mu_abs.shape == (eig.shape[0], int(sp.acted.max()))
    for i in range(eig.shape[0]):
        keep, nnull = _naive_row(eig[i], p, rule)
        a = int(sp.acted[i])
        assert a == len(keep) and int(sp.null_dims[i]) == nnull
        got = sp.mu_abs[i, :a].tolist()
        assert np.allclose(got, keep, rtol=1e-14, atol=0, equal_nan=True), (i, got, keep)
        assert bool(torch.isnan(sp.mu_abs[i, a:]).all())
        assert int(sp.zero_eig_dims[i]) == int((eig[i] == 0).sum()) + (p - r)
        # single-row call gives the same row
        one = node_update_spectra(eig[i : i + 1], p, rule)
        assert np.allclose(one.mu_abs[0, :a].tolist(), got, rtol=0, atol=0, equal_nan=True)
        rad = max([1.0] * nnull + keep) if (nnull or keep) else float("nan")
        if any(math.isnan(x) for x in keep):
            assert math.isnan(float(sp.radius[i]))
        else:
            assert float(sp.radius[i]) == rad


def test_mixed_rank_rows_and_multiplicity():
    """r < p rows: the p − r implicit zeros get one μ with multiplicity p − r in both roots."""
    rule = UpdateRule("sgd_momentum", 0.1, momentum=0.5, has_buffer=True, weight_decay=1.0)
    sp = node_update_spectra(torch.tensor([[4.0, 2.0]], dtype=F64), 6, rule)
    # λ' = wd = 1 on the 4 implicit zero directions: μ² − (1.5 − 0.1)μ + 0.5 = 0 (complex, |μ| = √0.5)
    assert int(sp.acted[0]) == 12 and int(sp.null_dims[0]) == 0
    assert int((sp.mu_abs[0] - math.sqrt(0.5)).abs().lt(1e-14).sum()) == 2 * 2 + 2 * 4  # all pairs complex
    sp = node_update_spectra(torch.tensor([[4.0, 2.0]], dtype=F64), 6, UpdateRule("sgd", 0.1))
    assert sp.mu_abs[0].tolist() == pytest.approx([0.6, 0.8]) and int(sp.null_dims[0]) == 4


# ============================================================================ 4. stability thresholds
def _radius_sgd(lam_eff: float, hp: dict, with_buf: bool) -> float:
    """Radius of the real SGD step on a 1-parameter quadratic with λ' = lam_eff (wd folded in by torch)."""
    wd = hp.get("weight_decay", 0.0)
    M = sgd_step_matrix(torch.tensor([[lam_eff - wd]], dtype=F64), hp, with_buf)
    return float(np.abs(np.linalg.eigvals(M)).max())


def _bisect(f, lo, hi, it=80):
    for _ in range(it):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) <= 1.0 + 1e-13 else (lo, mid)
    return 0.5 * (lo + hi)


THR_CASES = [
    (dict(lr=0.1), False),
    (dict(lr=0.1, weight_decay=0.5), False),
    (dict(lr=0.1, momentum=0.9), False),
    (dict(lr=0.1, momentum=0.9), True),
    (dict(lr=0.1, momentum=0.9, dampening=0.6, weight_decay=0.2), True),
    (dict(lr=0.1, momentum=0.9, nesterov=True), False),
    (dict(lr=0.1, momentum=0.9, nesterov=True), True),
    (dict(lr=0.1, momentum=0.99, nesterov=True, dampening=0.9), True),
    (dict(lr=0.1, momentum=0.5, nesterov=True, dampening=1.0), True),
]


@pytest.mark.parametrize("hp,with_buf", THR_CASES, ids=lambda x: str(x))
def test_sgd_threshold_is_the_first_crossing_of_the_real_step(hp, with_buf):
    rule = update_rule("SGD", hp, {"momentum_buffer": torch.zeros(1)} if with_buf else {})
    thr = stability_threshold(rule)  # on λ' = λ + wd
    f = lambda le: _radius_sgd(le, hp, with_buf)
    # stable on a grid of (0, thr), unstable just above
    for le in np.linspace(0, thr, 41)[1:-1]:
        assert f(le) < 1.0
    assert f(thr * (1 + 1e-6)) > 1.0
    assert _bisect(f, 0.5 * thr, 2.0 * thr) == pytest.approx(thr, rel=1e-9)
    # docs/spec.md §5 closed forms
    a, b, d = hp["lr"], hp.get("momentum", 0.0), hp.get("dampening", 0.0)
    if not with_buf:
        spec = 2 / (a * (1 + b)) if hp.get("nesterov") else 2 / a
    elif hp.get("nesterov"):
        spec = 2 * (1 + b) / (a * (1 + 2 * b - b * d))
    else:
        spec = 2 * (1 + b) / (a * (1 - d))
    assert thr == pytest.approx(spec, rel=1e-14)


@pytest.mark.parametrize(
    "cls,hp,step",
    [
        (torch.optim.Adam, dict(lr=0.01, betas=(0.9, 0.999)), 5),
        (torch.optim.Adam, dict(lr=0.01, betas=(0.9, 0.999)), 10_000),
        (torch.optim.AdamW, dict(lr=0.01, betas=(0.9, 0.999), weight_decay=10.0), 50),
        (torch.optim.AdamW, dict(lr=0.05, betas=(0.5, 0.99), weight_decay=4.0), 3),
    ],
)
def test_adam_threshold_is_the_crossing_of_the_real_step(cls, hp, step):
    v = torch.tensor([1.0], dtype=F64)
    rule = update_rule(
        cls.__name__, hp, {"step": torch.tensor(float(step)), "exp_avg": torch.zeros(1), "exp_avg_sq": v}
    )
    d = float(adam_preconditioner(rule, v, torch.zeros(1, dtype=F64)))
    thr = stability_threshold(rule)  # on λ̃ = d·λ

    def f(lt):
        return float(
            np.abs(np.linalg.eigvals(adam_step_jacobian(cls, torch.tensor([[lt / d]], dtype=F64), hp, v, step))).max()
        )

    assert f(thr * (1 - 1e-5)) < 1.0 < f(thr * (1 + 1e-5))
    for lt in np.linspace(0, thr, 9)[1:-1]:
        assert f(lt) < 1.0
    if step == 10_000:
        assert thr == pytest.approx(38 / 0.01, rel=1e-12)  # (2 + 2β1)/(α(1 − β1)), Cohen et al.


def test_threshold_agrees_with_node_update_spectra_radius():
    for rule in ORDER_RULES:
        thr = stability_threshold(rule)
        shift = 0.0 if rule.preconditioned else rule.coupled_shift
        lam = torch.tensor([[thr * (1 - 1e-9) - shift], [thr * (1 + 1e-9) - shift]], dtype=F64)
        sp = node_update_spectra(lam, 3, rule)
        assert float(sp.radius[0]) <= 1.0 + 1e-12 and float(sp.radius[1]) > 1.0, rule
    assert stability_threshold(UpdateRule("sgd", 0.0)) == math.inf


# Regression test (found in review, fixed): _roots forms t*t - 4*dt, which overflows for |T| >
# ~1.3e154: a 2x2 block then gets |mu1| = inf (true ~alpha*lambda) and |mu2| = 0 (Nesterov: true
# ~beta/(1+beta(1-d)) = 0.47) (updatemap.py:299-305)
def test_momentum_roots_do_not_overflow_for_huge_finite_curvature():
    for rule, lam in [
        (UpdateRule("sgd_momentum", 0.1, momentum=0.9, has_buffer=True), 1e160),
        (UpdateRule("nesterov", 0.1, momentum=0.9, has_buffer=True), 1e156),
    ]:
        sp = node_update_spectra(torch.tensor([[lam]], dtype=F64), 1, rule)
        x = 0.1 * lam
        if rule.kind == "nesterov":
            M = np.array([[1 - x * 1.9, -0.1 * 0.81], [lam, 0.9]])
        else:
            M = np.array([[1 - x, -0.09], [lam, 0.9]])
        ref = np.sort(np.abs(np.linalg.eigvals(M)))
        assert np.isfinite(sp.radius[0].item())
        np.testing.assert_allclose(np.sort(sp.mu_abs[0].numpy()), ref, rtol=1e-9, atol=1e-150)  # numpy: 0 for 9e-160


# ============================================================================ 5. labels
def spectra_of(mu_rows, null=None, p=None, zero=None) -> NodeSpectra:
    """A NodeSpectra from explicit acted |μ| rows (NaN-padded)."""
    m = max(len(r) for r in mu_rows)
    mu = torch.full((len(mu_rows), m), math.nan, dtype=F64)
    for i, r in enumerate(mu_rows):
        mu[i, : len(r)] = torch.tensor(r, dtype=F64)
    acted = torch.tensor([len(r) for r in mu_rows], dtype=torch.int32)
    null = torch.zeros(len(mu_rows), dtype=torch.int32) if null is None else torch.tensor(null, dtype=torch.int32)
    rad = torch.tensor(
        [max(list(r) + ([1.0] if int(n) else [])) if (len(r) or int(n)) else math.nan for r, n in zip(mu_rows, null)],
        dtype=F64,
    )
    return NodeSpectra(
        mu,
        null,
        rad,
        acted,
        p=p or int((acted + null).max()),
        zero_eig_dims=torch.zeros(len(mu_rows), dtype=torch.int32)
        if zero is None
        else torch.tensor(zero, dtype=torch.int32),
    )


def run_classify(sp, cfg=None, delta=1e-3, pn=None, ref=None, grad=None, hmin=None, loss=1.0):
    cfg = cfg or LabelConfig(preset="acted")
    n = sp.radius.shape[0]
    one = torch.ones(n, dtype=F64)
    return classify(
        sp,
        one if pn is None else pn,
        one if ref is None else ref,
        one if grad is None else grad,
        one if hmin is None else hmin,
        loss,
        cfg,
        delta,
    )


def test_label_precedence_and_neutral_counts():
    d = 0.01
    sp = spectra_of(
        [
            [1.5, 1.0, 0.5],  # expanding + neutral -> source
            [1.005, 0.999, 0.5],  # two neutral -> plateau, neutral_dims 2
            [0.5, 0.2],  # sink, collapsed norm -> degenerate
            [1.005, 0.3],  # neutral + collapsed -> plateau beats degenerate
            [0.98, 0.2],  # sink
            [1.02, 0.1],  # collapsed but expanding -> source
            [0.75, 1.25],  # |μ| = 1 ∓ δ exactly (δ = 0.25 below): neutral (inclusive band)
        ]
    )
    pn = torch.tensor([1.0, 1.0, 0.01, 0.01, 1.0, 0.01, 1.0], dtype=F64)
    lab, why, neu = run_classify(sp, delta=d, pn=pn)
    assert [LABELS[i] for i in lab.tolist()] == [
        "source",
        "plateau",
        "degenerate_sink",
        "plateau",
        "healthy_sink",
        "source",
        "source",
    ]
    assert [REASONS[i] for i in why.tolist()] == [
        "expanding",
        "neutral_direction",
        "collapsed",
        "neutral_direction",
        "contracting",
        "expanding",
        "expanding",
    ]
    assert neu.tolist() == [1, 2, 0, 1, 0, 0, 0]
    lab, why, neu = run_classify(spectra_of([[0.75, 1.25]]), delta=0.25)  # binary-exact band edges
    assert (int(lab[0]), int(why[0]), int(neu[0])) == (L["plateau"], R["neutral_direction"], 2)


def test_dead_and_drifting_nodes_through_real_spectra():
    p = 5
    z = torch.zeros(3, 0, dtype=F64)
    grad = torch.tensor([0.0, 1e-3, math.nan], dtype=F64)
    for rule in [
        UpdateRule("sgd", 0.1),
        UpdateRule("nesterov", 0.1, momentum=0.9, has_buffer=True),
        UpdateRule("adamw", 0.01, has_buffer=True, step=3),
        UpdateRule("gd_fallback", 0.2),
    ]:
        sp = node_update_spectra(z, p, rule)
        assert sp.null_dims.tolist() == [p] * 3 and sp.zero_eig_dims.tolist() == [p] * 3
        lab, why, neu = run_classify(sp, grad=grad)
        assert lab.tolist() == [L["plateau"]] * 3
        assert [REASONS[i] for i in why.tolist()[:2]] == ["dead", "drifting"]
        assert neu.tolist() == [0, 0, 0]
    # AdamW decay acts on a zero-curvature node: μ = c = 1 − α·wd, neutral when α·wd ≤ δ, a sink otherwise
    sp = node_update_spectra(
        torch.zeros(2, 0, dtype=F64), p, UpdateRule("adamw", 0.01, weight_decay=0.05, has_buffer=True, step=3)
    )
    assert sp.null_dims.tolist() == [0, 0]
    lab, why, neu = run_classify(sp, delta=1e-3, grad=torch.zeros(2, dtype=F64))
    assert (
        lab.tolist() == [L["plateau"]] * 2 and why.tolist() == [R["neutral_direction"]] * 2 and neu.tolist() == [p, p]
    )
    lab, _, _ = run_classify(sp, delta=1e-4, grad=torch.zeros(2, dtype=F64))
    assert lab.tolist() == [L["healthy_sink"]] * 2


def test_degenerate_collapse_rule_and_references():
    sp = spectra_of([[0.5]] * 4)
    pn = torch.tensor([0.0, 0.05, 0.2, 0.099], dtype=F64)
    ref = torch.tensor([0.0, 1.0, 1.0, 0.99], dtype=F64)
    lab, why, _ = run_classify(sp, pn=pn, ref=ref)
    # ‖θ‖ <= collapse_ratio · reference (0 <= 0 for a node that starts at zero)
    assert lab.tolist() == [L["degenerate_sink"], L["degenerate_sink"], L["healthy_sink"], L["degenerate_sink"]]
    cfg = LabelConfig(preset="acted", collapse_reference="layer_median")
    ref = collapse_reference_norm(cfg, torch.tensor([1.0, 2.0, 3.0, 0.1, 5.0, math.nan], dtype=F64))
    assert ref.tolist() == [2.0] * 6  # odd count of finite norms: the middle one, NaN ignored
    assert collapse_reference_norm(LabelConfig(preset="acted"), torch.ones(2), torch.tensor([3.0, 4.0])).tolist() == [
        3.0,
        4.0,
    ]


# Regression test (found in review, fixed): collapse_reference 'layer_median' uses
# torch.nanmedian, the LOWER median for an even node count: in a 2-node layer the smaller node is
# its own reference and can never collapse (labels.py:133, pipeline.py:249)
def test_layer_median_reference_for_an_even_layer():
    cfg = LabelConfig(preset="acted", collapse_reference="layer_median")
    norms = torch.tensor([0.01, 1.0], dtype=F64)
    ref = collapse_reference_norm(cfg, norms)
    lab, why, _ = run_classify(spectra_of([[0.5], [0.5]]), cfg, pn=norms, ref=ref)
    # median 0.505: the node at 0.01 has collapsed below 0.1 x median
    assert int(lab[0]) == L["degenerate_sink"]


def test_seed_preset_literal_rules_over_all_directions():
    cfg = LabelConfig(preset="seed")
    eps = resolve_delta(cfg, 10**6)
    assert eps == 0.01
    rule = UpdateRule("sgd_momentum", 1.0, momentum=0.5, has_buffer=True)
    eig = torch.tensor([[1.2, 0.6], [1.2, 0.6], [1.2, 0.0], [1.2, 0.6], [1.2, 0.6], [3.1, 0.6]], dtype=F64)
    sp = node_update_spectra(eig, 2, rule)
    pn = torch.tensor([1.0, 5e-5, 1.0, 1.0, 1.0, 1.0], dtype=F64)
    grad = torch.tensor([1.0, 1.0, 1.0, 1e-7, 1.0, 1.0], dtype=F64)
    hmin = torch.tensor([0.6, 0.6, 0.0, 0.6, 5e-5, 0.6], dtype=F64)
    lab, why, neu = run_classify(sp, cfg, eps, pn=pn, grad=grad, hmin=hmin, loss=0.3)
    assert float(sp.radius[0]) < 0.99  # |μ| = √0.5 for the complex pairs
    assert [LABELS[i] for i in lab.tolist()] == [
        "healthy_sink",
        "degenerate_sink",
        "plateau",
        "plateau",
        "plateau",
        "source",
    ]
    # row 2: a null direction (μ = 1) and σ_min = 0: the curvature test names the reason
    assert [REASONS[i] for i in why.tolist()] == [
        "contracting",
        "collapsed",
        "seed_zero_curvature",
        "seed_flat_gradient",
        "seed_zero_curvature",
        "expanding",
    ]
    assert neu.tolist() == [0] * 6
    # eps_param is absolute: the acted preset's relative collapse does not apply
    lab, _, _ = run_classify(
        sp,
        cfg,
        eps,
        pn=torch.full((6,), 1e-3, dtype=F64),
        ref=torch.full((6,), 1e3, dtype=F64),
        hmin=torch.ones(6, dtype=F64),
    )
    assert lab.tolist()[0] == L["healthy_sink"]


def test_nonfinite_labels():
    sp = node_update_spectra(
        torch.tensor([[math.nan, 1.0], [1.0, 0.5], [-math.inf, 0.5]], dtype=F64), 3, UpdateRule("sgd", 0.5)
    )
    pn = torch.tensor([1.0, math.inf, 1.0], dtype=F64)
    for cfg in [LabelConfig(preset="acted"), LabelConfig(preset="seed")]:
        lab, why, _ = run_classify(sp, cfg, resolve_delta(cfg, 10), pn=pn)
        assert lab.tolist() == [L["source"]] * 3
        assert why.tolist()[:2] == [R["nonfinite"], R["nonfinite"]]


# Regression test (found in review, fixed): |mu| == fl(1+delta) falls between the neutral test
# (|mu|-1 <= delta, exact) and the source test (|mu| > fl(1+delta)): a growing direction is
# labelled healthy_sink (labels.py:156/175, seed: 179/188)
@pytest.mark.parametrize("preset", ["acted", "seed"])
def test_boundary_growth_is_never_a_healthy_sink(preset):
    # exact (indefinite) Hessian, λ = −0.1, plain SGD α = 0.1: μ = 1 + 0.01 = 1.01 (fl); δ = 0.01 for T <= 100 steps
    cfg = LabelConfig(preset=preset)
    delta = resolve_delta(cfg, 100)
    assert delta == 0.01
    sp = node_update_spectra(torch.tensor([[0.5, -0.1]], dtype=F64), 2, update_rule("SGD", {"lr": 0.1}, None))
    assert sp.mu_abs[0].tolist() == [0.95, 1.01]
    lab, why, neu = run_classify(sp, cfg, delta, hmin=torch.ones(1, dtype=F64))
    assert int(lab[0]) in (L["plateau"], L["source"])  # inclusive band: plateau
    assert int(neu[0]) + int(lab[0] == L["source"]) >= 1


def test_stable_labels_persistence():
    seq = torch.tensor([[0, 0], [2, 0], [2, 3], [2, 3], [0, 3], [0, 3]], dtype=torch.uint8)
    # window 2: a label must hold 2 consecutive checkpoints
    stable, hist = None, []
    got = []
    for t in range(len(seq)):
        h = torch.stack(hist) if hist else None
        stable = stable_labels(h, stable, seq[t], 2)
        got.append(stable.tolist())
        hist = (hist + [seq[t]])[-1:]
    assert got == [[0, 0], [0, 0], [2, 0], [2, 3], [2, 3], [0, 3]]
    # a longer history than needed: only the last window − 1 rows count
    h = torch.tensor([[1], [0], [0]], dtype=torch.uint8)
    assert stable_labels(h, torch.tensor([1], dtype=torch.uint8), torch.tensor([0], dtype=torch.uint8), 3).tolist() == [
        0
    ]
    assert stable_labels(h, torch.tensor([1], dtype=torch.uint8), torch.tensor([0], dtype=torch.uint8), 4).tolist() == [
        1
    ]


# ============================================================================ 6. kinematics
def test_kinematics_geometric_mean_and_drift_range():
    g = torch.Generator().manual_seed(0)
    th = torch.randn(6, 5, generator=g, dtype=F64)
    ratios = torch.tensor(
        [[0.5, 2.0, 0.9], [1.1, 1.1, 1.1], [0.1, 0.2, 0.3], [3.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.7, 0.7, 0.7]],
        dtype=F64,
    )
    cur = th.clone()
    for k in range(3):
        cur = cur * ratios[:, k : k + 1]
    cur[4] = -cur[4]  # a sign flip: drift 2, ρ 1
    out = node_kinematics(th, cur, k=3)
    np.testing.assert_allclose(out["rho"].double(), ratios.prod(dim=1) ** (1 / 3), rtol=1e-6)
    np.testing.assert_allclose(out["drift"].double()[:4], 0.0, atol=1e-6)
    assert float(out["drift"][4]) == 2.0
    # random and near-antipodal pairs: drift in [0, 2] and equal to the chord 2 sin(φ/2)
    a = torch.randn(200, 4, generator=g, dtype=F64)
    b = torch.where(
        torch.arange(200)[:, None] % 2 == 0,
        -a + 1e-9 * torch.randn(200, 4, generator=g, dtype=F64),
        torch.randn(200, 4, generator=g, dtype=F64),
    )
    out = node_kinematics(a.float(), b.float())
    assert bool(((out["drift"] >= 0) & (out["drift"] <= 2)).all())
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    np.testing.assert_allclose(out["drift"].double(), (2 - 2 * cos).clamp(min=0).sqrt(), atol=1e-5)
    # zero norms: NaN, never a crash
    z = node_kinematics(torch.zeros(2, 3), torch.stack([torch.zeros(3), torch.ones(3)]), k=4)
    assert torch.isnan(z["rho"]).all() and torch.isnan(z["drift"]).all()
    with pytest.raises(ValueError):
        node_kinematics(th, cur, k=0)


# ============================================================================ 7. pipeline feeding (end to end)
# Regression test (found in review, fixed): pipeline._layer takes the update rule of the weight's
# param group for the whole node (pipeline.py:232); a bias in another group (own lr/wd) is
# analysed with the weight's lr: the real map diag(alpha)(H + diag(wd)) is a source, the result
# says healthy_sink
def test_node_spanning_two_param_groups(tmp_path):
    import trajscope
    from tests.helpers.analysis import linear_spec, make_linear, record

    # orthogonal zero-mean columns: H = (2/B)ÃᵀÃ = diag(4, 2.25, 1.5625 | bias 2), axis-aligned
    B = 8
    g = torch.Generator().manual_seed(3)
    ones = torch.ones(B, 1, dtype=F64)
    q, _ = torch.linalg.qr(torch.cat([ones, torch.randn(B, 3, generator=g, dtype=F64)], dim=1))
    X = q[:, 1:] * torch.tensor([4.0, 3.0, 2.5], dtype=F64)
    y = (X @ torch.tensor([0.0, 1.0, -1.0], dtype=F64) + 0.5)[:, None]
    model = make_linear(3, 1)
    lr_w, lr_b = 0.25, 1.2  # weights: μ = 0, 0.4375, 0.609; bias: μ = 1 − 1.2·2 = −1.4
    opt = torch.optim.SGD([{"params": [model.weight], "lr": lr_w}, {"params": [model.bias], "lr": lr_b}])
    record(tmp_path / "run", model, opt, nn.MSELoss(), [(X, y)] * 3, **linear_spec(3))
    res = trajscope.analyze(tmp_path / "run", dtype="float64", sharpness=False)
    res = next(iter(res.values()))
    radius = res.node("", "spectral_radius")[:, 0]
    np.testing.assert_allclose(radius, 1.4, rtol=1e-6)
    assert (res.node("", "label")[:, 0] == L["source"]).all()
