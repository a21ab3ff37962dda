"""Global sharpness (SPEC §8) against the dense float64 Hessian of all parameters."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from trajscope.nodes import find_node_layers
from trajscope.curvature import node as _curv_node
from trajscope.curvature import sharpness as _curv_sharpness
from trajscope.replay.problem import Problem


def node_curvature(model, params, buffers, inputs, targets, loss_fn, *args, replay=None, **kw):
    """node_curvature on the old argument list (the cases here are written that way)."""
    return _curv_node.node_curvature(Problem(model, params, buffers, inputs, targets, loss_fn, replay), *args, **kw)


def sharpness(model, params, buffers, inputs, targets, loss_fn, *, replay=None, **kw):
    """sharpness on the old argument list (the cases here are written that way)."""
    return _curv_sharpness.sharpness(Problem(model, params, buffers, inputs, targets, loss_fn, replay), **kw)


def hvp_operator(model, params, buffers, inputs, targets, loss_fn, names=None, replay=None):
    """hvp_operator on the old argument list (the cases here are written that way)."""
    return _curv_sharpness.hvp_operator(Problem(model, params, buffers, inputs, targets, loss_fn, replay), names)


pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
DT = torch.float64


def setup(act=nn.Tanh, loss="ce", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 4), act(), nn.Linear(4, 3)).to(DT)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(8, 5, generator=g, dtype=DT)
    if loss == "ce":
        y, loss_fn = torch.randint(0, 3, (8,), generator=g), nn.CrossEntropyLoss()
    else:
        y, loss_fn = torch.randn(8, 3, generator=g, dtype=DT), nn.MSELoss()
    return model, params, x, y, loss_fn


def dense_hessian(model, params, x, y, loss_fn):
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def f(v):
        p = {k: t.reshape(s) for k, t, s in zip(names, v.split(sizes), shapes)}
        return loss_fn(functional_call(model, p, (x,)), y)

    return hessian(f)(flat)


def test_hvp_operator_matches_dense_hessian():
    model, params, x, y, loss_fn = setup()
    H = dense_hessian(model, params, x, y, loss_fn)
    mv, dim = hvp_operator(model, params, {}, x, y, loss_fn)
    assert dim == H.shape[0]
    v = torch.randn(dim, dtype=DT)
    assert torch.allclose(mv(v), H @ v, rtol=1e-10, atol=1e-12)
    vn = np.random.default_rng(1).standard_normal(dim)
    assert np.allclose(mv(vn), (H @ torch.from_numpy(vn)).numpy(), rtol=1e-10, atol=1e-12)
    assert mv.count == 2
    # a subset of the parameters: the principal block of H
    mv2, d2 = hvp_operator(model, params, {}, x, y, loss_fn, names=["2.weight", "2.bias"])
    start = params["0.weight"].numel() + params["0.bias"].numel()
    sl = slice(start, start + d2)
    u = torch.randn(d2, dtype=DT)
    assert torch.allclose(mv2(u), H[sl, sl] @ u, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act,loss", [(nn.Tanh, "ce"), (nn.ReLU, "mse")])
def test_sharpness_matches_dense(act, loss):
    model, params, x, y, loss_fn = setup(act, loss)
    H = dense_hessian(model, params, x, y, loss_fn)
    lam = float(torch.linalg.eigvalsh(H)[-1])
    res = sharpness(model, params, {}, x, y, loss_fn)
    assert res.converged and res.n_hvp > 0
    assert abs(res.value - lam) <= 1e-4 * abs(lam), (res.value, lam)


def test_node_blocks_below_sharpness():
    """Cauchy interlacing: every node block is a principal submatrix of the full Hessian."""
    model, params, x, y, loss_fn = setup(nn.Tanh, "ce")
    s = sharpness(model, params, {}, x, y, loss_fn, tol=1e-6).value
    res = node_curvature(model, params, {}, x, y, loss_fn, find_node_layers(model), kind="exact")
    for name, ev in res.eigvals.items():
        assert float(ev.max()) <= s * (1 + 1e-6) + 1e-12, name


def test_preconditioned_sharpness():
    model, params, x, y, loss_fn = setup(nn.Tanh, "ce")
    H = dense_hessian(model, params, x, y, loss_fn)
    g = torch.Generator().manual_seed(3)
    precond = {k: torch.rand(v.shape, generator=g, dtype=DT) * 5 + 0.2 for k, v in params.items()}
    d = torch.cat([precond[k].reshape(-1) for k in params]).sqrt()
    lam = float(torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1])
    res = sharpness(model, params, {}, x, y, loss_fn, precond=precond)
    assert res.converged
    assert abs(res.value - lam) <= 1e-4 * abs(lam), (res.value, lam)


def test_preconditioned_sharpness_with_coupled_decay():
    """Adam's coupled L2 decay: the map sees P^{1/2}(H + diag(w))P^{1/2}, w per parameter."""
    model, params, x, y, loss_fn = setup(nn.Tanh, "ce")
    H = dense_hessian(model, params, x, y, loss_fn)
    g = torch.Generator().manual_seed(4)
    precond = {k: torch.rand(v.shape, generator=g, dtype=DT) * 5 + 0.2 for k, v in params.items()}
    shift = {"0.weight": 0.5, "2.weight": 0.5, "4.weight": 0.5}  # no decay on biases
    d = torch.cat([precond[k].reshape(-1) for k in params]).sqrt()
    w = torch.cat([torch.full((params[k].numel(),), shift.get(k, 0.0), dtype=DT) for k in params])
    lam = float(torch.linalg.eigvalsh(d[:, None] * (H + torch.diag(w)) * d[None, :])[-1])
    res = sharpness(model, params, {}, x, y, loss_fn, precond=precond, shift=shift)
    assert res.converged and abs(res.value - lam) <= 1e-4 * abs(lam), (res.value, lam)
    plain = sharpness(model, params, {}, x, y, loss_fn, precond=precond).value
    assert abs(plain - lam) > 1e-2 * abs(lam)  # the decay matters here: the test is not vacuous


def test_small_model_dense_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(DT)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    H = dense_hessian(model, params, x, y, nn.MSELoss())
    res = sharpness(model, params, {}, x, y, nn.MSELoss())
    assert res.n_hvp == H.shape[0]
    assert math.isclose(res.value, float(torch.linalg.eigvalsh(H)[-1]), rel_tol=1e-10)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_params_give_nan(bad):
    model, params, x, y, loss_fn = setup()
    params["2.weight"] = params["2.weight"].clone()
    params["2.weight"][0, 0] = bad
    res = sharpness(model, params, {}, x, y, loss_fn)
    assert math.isnan(res.value) and not res.converged


def test_nonfinite_loss_gives_nan():
    model, params, x, y, loss_fn = setup()
    x = x.clone()
    x[0, 0] = math.nan
    res = sharpness(model, params, {}, x, y, loss_fn)
    assert math.isnan(res.value)


def _sym_op(A):
    return lambda v: A @ v


def test_lanczos_on_explicit_spectra():
    from trajscope.curvature.sharpness import _lanczos_max

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=DT))
    v0 = torch.randn(300, generator=g, dtype=DT)
    cases = {
        "indefinite, larger |negative| end": torch.cat([torch.linspace(-9, 2, 299, dtype=DT),
                                                        torch.tensor([3.0], dtype=DT)]),
        "clustered top": torch.cat([torch.linspace(0, 1, 297, dtype=DT),
                                    torch.tensor([5.0, 5.0 - 1e-3, 5.0 - 2e-3], dtype=DT)]),
        "ill-conditioned PSD": torch.logspace(-8, 2, 300, dtype=DT),
    }
    for name, lam in cases.items():
        A = (Q * lam) @ Q.T
        top = float(lam.max())
        val, ok = _lanczos_max(_sym_op(A), v0.clone(), 1e-10, 300)
        assert ok and abs(val - top) <= 1e-8 * abs(top), (name, val, top)
        val4, ok4 = _lanczos_max(_sym_op(A), v0.clone(), 1e-4, 300)
        assert ok4 and abs(val4 - top) <= 2e-3 * abs(top), (name, val4, top)  # residual 1e-4
    # too few products: reported as not converged
    A = (Q * cases["clustered top"]) @ Q.T
    assert _lanczos_max(_sym_op(A), v0.clone(), 1e-12, 3)[1] is False


def test_lanczos_stops_exactly_on_an_invariant_subspace():
    from trajscope.curvature.sharpness import _lanczos_max

    A = torch.diag(torch.tensor([4.0, 1.0, -2.0] + [0.5] * 60, dtype=DT))
    v0 = torch.zeros(63, dtype=DT)
    v0[:3] = 1.0  # the Krylov space is 3-dimensional: breakdown at step 3, T_3 is exact
    val, ok = _lanczos_max(_sym_op(A), v0, 1e-14, 50)
    assert ok and abs(val - 4.0) <= 1e-12
