"""Global sharpness (docs/spec.md §8) against the dense float64 Hessian of all parameters.

Long (over 400 lines) because it holds every case of trajscope.curvature.sharpness: the review
cases follow the fold marker.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

# imports of the cases folded from test_sharpness_review (below)
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.func import functional_call, hessian

from tests.helpers.calls import hvp_operator, node_curvature, sharpness
from trajscope.curvature.sharpness import _DENSE_DIM, _lanczos_max, _NonFinite
from trajscope.nodes import find_node_layers

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
        "indefinite, larger |negative| end": torch.cat(
            [torch.linspace(-9, 2, 299, dtype=DT), torch.tensor([3.0], dtype=DT)]
        ),
        "clustered top": torch.cat(
            [torch.linspace(0, 1, 297, dtype=DT), torch.tensor([5.0, 5.0 - 1e-3, 5.0 - 2e-3], dtype=DT)]
        ),
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


# ==============================================================================================
# folded from test_sharpness_review:
# Review of the Lanczos sharpness (``_lanczos_max`` without restarts, docs/spec.md §8).
#
# References: dense float64 Hessians (``torch.func.hessian``) of small nets and
# ``scipy.sparse.linalg.eigsh`` (ARPACK, which the code used before) on the same matrices.
# Tests marked "Regression test" failed before the fixes this review led to.
# ==============================================================================================


def dense_hessian64(model, params, x, y, loss_fn):
    """Float64 Hessian of the loss over every parameter (``params`` order), the model run in float64."""
    model = model.to(DT) if any(v.dtype != DT for v in params.values()) else model
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].reshape(-1).to(DT) for k in names])
    x = x.to(DT) if x.is_floating_point() else x
    y = y.to(DT) if y.is_floating_point() else y

    def f(v):
        p = {k: t.reshape(s) for k, t, s in zip(names, v.split(sizes), shapes)}
        return loss_fn(functional_call(model, p, (x,)), y)

    H = hessian(f)(flat)
    return 0.5 * (H + H.T)


def top(H: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(H)[-1])


def arpack_top(H: torch.Tensor, tol: float = 1e-10) -> float:
    """An independent reference: ARPACK on the dense matrix."""
    n = H.shape[0]
    v0 = np.random.default_rng(7).standard_normal(n)
    return float(eigsh(H.numpy(), k=1, which="LA", tol=tol, v0=v0, ncv=min(n - 1, 20), return_eigenvectors=False)[0])


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def neg_mse(out, t):
    """A concave loss (maximising the squared error): the Hessian of a linear model is -2/N XᵀX."""
    return -((out - t) ** 2).mean()


def spectrum_op(lam: torch.Tensor, seed: int = 0):
    n = lam.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    count = [0]

    def op(v):
        count[0] += 1
        return A @ v

    return A, op, count


def v0_of(n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal(n))


# --------------------------------------------------------------------------- small nets vs dense
NETS = {
    "tanh-ce": (lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)), "ce"),
    "relu-mse": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), "mse"),
    "gelu-ce": (lambda: nn.Sequential(nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 4)), "ce"),
    "33-params-tanh": (
        lambda: nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)),
        "ce",
    ),
}


def net_case(name: str, seed: int, dtype=DT, batch: int = 12):
    make, loss = NETS[name]
    torch.manual_seed(seed)
    model = make().to(dtype)
    d_in = model[0].in_features
    d_out = model[-1].out_features
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, d_in, generator=g, dtype=DT).to(dtype)
    if loss == "ce":
        y, loss_fn = torch.randint(0, d_out, (batch,), generator=g), nn.CrossEntropyLoss()
    else:
        y, loss_fn = torch.randn(batch, d_out, generator=g, dtype=DT).to(dtype), nn.MSELoss()
    return model, params_of(model), x, y, loss_fn


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(NETS))
def test_sharpness_matches_dense_and_arpack(name, seed):
    model, params, x, y, loss_fn = net_case(name, seed)
    H = dense_hessian64(model, params, x, y, loss_fn)
    assert H.shape[0] > _DENSE_DIM  # the Lanczos path
    lam = top(H)
    assert abs(arpack_top(H) - lam) <= 1e-9 * abs(lam)
    res = sharpness(model, params, {}, x, y, loss_fn)
    assert res.converged and 0 < res.n_hvp <= 300
    # residual <= 1e-4 |theta| bounds the error by ~ residual^2 / gap in practice; 1e-4 relative always
    assert abs(res.value - lam) <= 1e-4 * abs(lam), (res.value, lam)
    assert res.value <= lam * (1 + 1e-12) + 1e-14  # a Ritz value never exceeds lambda_max
    tight = sharpness(model, params, {}, x, y, loss_fn, tol=1e-10)
    assert tight.converged and abs(tight.value - lam) <= 1e-9 * abs(lam), (tight.value, lam)


def test_exactly_33_parameters_just_above_dense_threshold():
    model, params, x, y, loss_fn = net_case("33-params-tanh", 5)
    assert sum(p.numel() for p in params.values()) == _DENSE_DIM + 1
    H = dense_hessian64(model, params, x, y, loss_fn)
    res = sharpness(model, params, {}, x, y, loss_fn, tol=1e-8)
    assert res.converged and res.n_hvp <= 33 + 5
    assert abs(res.value - top(H)) <= 1e-7 * abs(top(H))


def test_dense_threshold_uses_dim_products():
    torch.manual_seed(0)
    model = nn.Linear(31, 1).to(DT)  # exactly 32 parameters: dense path
    params = params_of(model)
    x, y = torch.randn(40, 31, dtype=DT), torch.randn(40, 1, dtype=DT)
    res = sharpness(model, params, {}, x, y, nn.MSELoss())
    assert res.n_hvp == 32 and res.converged
    assert math.isclose(res.value, top(dense_hessian64(model, params, x, y, nn.MSELoss())), rel_tol=1e-12)


# --------------------------------------------------------------------------- negative and zero tops
def test_concave_region_negative_top():
    """An all-negative Hessian (concave loss, full rank): the largest algebraic eigenvalue is the
    negative one closest to 0, found to 1e-4 relative and converged."""
    torch.manual_seed(0)
    model = nn.Linear(40, 1).to(DT)
    params = params_of(model)
    x, y = torch.randn(64, 40, dtype=DT), torch.randn(64, 1, dtype=DT)
    H = dense_hessian64(model, params, x, y, neg_mse)
    lam = top(H)
    assert lam < -1e-3
    res = sharpness(model, params, {}, x, y, neg_mse)
    assert res.converged
    assert abs(res.value - lam) <= 1e-4 * abs(lam), (res.value, lam)
    assert abs(arpack_top(H) - lam) <= 1e-8 * abs(lam)


@pytest.mark.parametrize("case", ["negative definite", "wide, top near the bulk", "indefinite, dominant negative end"])
def test_lanczos_negative_and_indefinite_spectra_vs_arpack(case):
    n = 300
    lam = {
        "negative definite": -torch.linspace(1, 10, n, dtype=DT),
        "wide, top near the bulk": torch.cat(
            [torch.linspace(-1000, 0, n - 1, dtype=DT), torch.tensor([1.0], dtype=DT)]
        ),
        "indefinite, dominant negative end": torch.cat(
            [torch.linspace(-50, 2, n - 1, dtype=DT), torch.tensor([2.5], dtype=DT)]
        ),
    }[case]
    A, op, count = spectrum_op(lam)
    want = float(lam.max())
    val, ok = _lanczos_max(op, v0_of(n), 1e-4, 300)
    assert ok and abs(val - want) <= 1e-3 * abs(want), (val, want)
    assert val <= want + 1e-12 * float(lam.abs().max())
    assert abs(arpack_top(A, 1e-4) - want) <= 1e-3 * abs(want)


def test_zero_hessian_linear_model_and_linear_loss():
    """A linear model with a loss linear in its output: H = 0 exactly; one product, converged."""
    torch.manual_seed(0)
    model = nn.Linear(40, 2).to(DT)
    params = params_of(model)
    x, y = torch.randn(8, 40, dtype=DT), torch.randn(8, 2, dtype=DT)
    res = sharpness(model, params, {}, x, y, lambda o, t: (o * t).mean())
    assert res.value == 0.0 and res.converged and res.n_hvp == 1


def test_zero_hessian_through_a_live_graph():
    """Piecewise-linear net, loss linear in the output, products through a live (but zero in the
    first layer) graph: value 0 or the true top, never NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).to(DT)
    params = params_of(model)
    x, y = torch.randn(8, 6, dtype=DT), torch.randn(8, 2, dtype=DT)
    lf = lambda o, t: (o * t).mean()  # noqa: E731
    H = dense_hessian64(model, params, x, y, lf)
    res = sharpness(model, params, {}, x, y, lf, tol=1e-8)
    assert res.converged and abs(res.value - top(H)) <= 1e-7 * max(abs(top(H)), 1e-12)


def _rank_deficient_concave():
    """-MSE on a linear model with more parameters (41) than samples (8): H = -2/N X̃ᵀX̃ is negative
    semidefinite with a 33-dimensional null space, so lambda_max = 0 exactly."""
    torch.manual_seed(0)
    model = nn.Linear(40, 1).to(DT)
    params = params_of(model)
    x, y = torch.randn(8, 40, dtype=DT), torch.randn(8, 1, dtype=DT)
    return model, params, x, y


def test_zero_top_value_is_right():
    model, params, x, y = _rank_deficient_concave()
    H = dense_hessian64(model, params, x, y, neg_mse)
    ev = torch.linalg.eigvalsh(H)
    assert abs(float(ev[-1])) < 1e-12 and float(ev[0]) < -10
    res = sharpness(model, params, {}, x, y, neg_mse)
    assert abs(res.value) <= 1e-12 * float(ev.abs().max()), res


# Regression test (found in review, fixed): the stopping test beta*|s| <= tol*|theta| cannot hold
# when lambda_max = 0 (theta ~ 1e-15, residual ~ 1e-15): Lanczos runs all maxiter=300 products and
# reports converged=False; ARPACK (before 47cc356) floors |theta| at eps^(2/3) and converged in 13
# products. sharpness.py:69
@pytest.mark.parametrize("case", ["rank-deficient concave loss", "preconditioner with zeros"])
def test_zero_top_converges_in_few_products(case):
    if case == "rank-deficient concave loss":
        model, params, x, y = _rank_deficient_concave()
        precond = None
    else:  # full-rank concave loss, but P^{1/2} H P^{1/2} has zero rows: lambda_max = 0
        torch.manual_seed(0)
        model = nn.Linear(40, 1).to(DT)
        params = params_of(model)
        x, y = torch.randn(64, 40, dtype=DT), torch.randn(64, 1, dtype=DT)
        w = torch.ones_like(params["weight"])
        w[0, :5] = 0.0
        precond = {"weight": w}
    res = sharpness(model, params, {}, x, y, neg_mse, precond=precond)
    assert abs(res.value) < 1e-10
    assert res.converged and res.n_hvp <= 60, res


# --------------------------------------------------------------------------- float32 / float16 models
@pytest.mark.parametrize("name", ["tanh-ce", "relu-mse"])
def test_float32_model_reaches_tol(name):
    """Products in float32 (noise ~1e-7 relative): tol 1e-4 is reached and the value is within
    float32 accuracy of the float64 dense Hessian at the same (float32) parameters."""
    model, params, x, y, loss_fn = net_case(name, 3, dtype=torch.float32, batch=32)
    H = dense_hessian64(model, params, x, y, loss_fn)
    lam = top(H)
    res = sharpness(model, params, {}, x, y, loss_fn)
    assert res.converged and res.n_hvp < 100
    assert abs(res.value - lam) <= 1e-5 * abs(lam), (res.value, lam)


def _float16_overflow_case():
    """A float16 linear model whose Hessian has one entry beyond float16's range (feature 0 scaled
    by 220: H[0,0] = 2 mean x0^2 ~ 1e5 > 65504), finite loss: the first product (a random unit
    vector) is finite, the second (q_2 is dominated by coordinate 0) overflows to inf."""
    torch.manual_seed(0)
    model = nn.Linear(40, 1).half()
    params = params_of(model)
    x = torch.randn(16, 40)
    x[:, 0] *= 220
    x, y = x.half(), torch.randn(16, 1).half()
    return model, params, x, y, nn.MSELoss()


def test_float16_case_is_what_it_claims():
    model, params, x, y, loss_fn = _float16_overflow_case()
    mv, dim = hvp_operator(model, params, {}, x, y, loss_fn)
    assert bool(torch.isfinite(mv.loss))
    v = v0_of(dim)
    assert bool(torch.isfinite(mv(v / v.norm())).all())
    e0 = torch.zeros(dim, dtype=DT)
    e0[0] = 1
    assert not bool(torch.isfinite(mv(e0)).all())


# Regression test (found in review, fixed): a non-finite Hessian-vector product after the first
# one reaches scipy's eigh_tridiagonal (check_finite) and raises ValueError out of sharpness()
# instead of value=nan (docstring: 'does not raise'); the ARPACK version checked every product.
# sharpness.py:54-66
def test_nonfinite_product_mid_iteration_gives_nan_float16():
    model, params, x, y, loss_fn = _float16_overflow_case()
    res = sharpness(model, params, {}, x, y, loss_fn)
    assert math.isnan(res.value) and not res.converged


# Regression test (found in review, fixed): _lanczos_max raises scipy's ValueError, not
# _NonFinite, when a product after the first is NaN/inf (sharpness.py:64)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("at_call", [2, 4])
def test_lanczos_nonfinite_product_raises_nonfinite(bad, at_call):
    lam = torch.linspace(-1, 3, 100, dtype=DT)
    A, op, count = spectrum_op(lam)

    def flaky(v):
        w = op(v)
        if count[0] == at_call:
            w = w.clone()
            w[7] = bad
        return w

    with pytest.raises(_NonFinite):
        _lanczos_max(flaky, v0_of(100), 1e-12, 50)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_lanczos_nonfinite_first_product_raises_nonfinite(bad):
    lam = torch.linspace(-1, 3, 100, dtype=DT)
    A, op, count = spectrum_op(lam)

    def flaky(v):
        w = op(v).clone()
        w[3] = bad
        return w

    with pytest.raises(_NonFinite):
        _lanczos_max(flaky, v0_of(100), 1e-12, 50)


# --------------------------------------------------------------------------- orthogonality loss, ghosts
@pytest.mark.parametrize("maxiter", [100, 600])
@pytest.mark.parametrize("case", ["separated top", "logspace PSD", "wide negative bulk"])
def test_no_overestimate_from_lost_orthogonality(case, maxiter):
    """tol=0: the process runs far past convergence (and past n=200 steps) without full
    re-orthogonalisation; ghost copies appear but no Ritz value exceeds lambda_max (beyond
    rounding), and the top stays found."""
    n = 200
    lam = {
        "separated top": torch.cat([torch.linspace(0, 1, n - 2, dtype=DT), torch.tensor([10.0, 20.0], dtype=DT)]),
        "logspace PSD": torch.logspace(-10, 3, n, dtype=DT),
        "wide negative bulk": torch.cat([torch.linspace(-1000, 0, n - 1, dtype=DT), torch.tensor([1.0], dtype=DT)]),
    }[case]
    A, op, count = spectrum_op(lam)
    want, norm = float(lam.max()), float(lam.abs().max())
    val, ok = _lanczos_max(op, v0_of(n), 0.0, maxiter)
    assert not ok and count[0] == maxiter
    assert val <= want + 1e-12 * norm, (val, want)
    if maxiter >= 600:
        assert abs(val - want) <= 1e-12 * norm, (val, want)


def test_float32_products_long_run_bounded_by_noise():
    n = 200
    lam = torch.cat([torch.linspace(-1000, 0, n - 1, dtype=DT), torch.tensor([1.0], dtype=DT)])
    A, _, _ = spectrum_op(lam)
    A32 = A.float()
    val, ok = _lanczos_max(lambda v: (A32 @ v.float()).double(), v0_of(n), 0.0, 800)
    assert abs(val - 1.0) <= 1e-6 * 1000  # float32 rounding of ||A|| = 1000


# --------------------------------------------------------------------------- maxiter, degenerate starts
def test_maxiter_is_the_number_of_products():
    model, params, x, y, loss_fn = net_case("tanh-ce", 0)
    H = dense_hessian64(model, params, x, y, loss_fn)
    for m in (1, 2, 5):
        res = sharpness(model, params, {}, x, y, loss_fn, tol=1e-14, maxiter=m)
        assert res.n_hvp == m and not res.converged
        assert res.value <= top(H) * (1 + 1e-12)
    one = sharpness(model, params, {}, x, y, loss_fn, tol=1e-14, maxiter=1)
    v = v0_of(H.shape[0])
    v = v / v.norm()
    assert math.isclose(one.value, float(v @ H @ v), rel_tol=1e-10)  # the Rayleigh quotient of v0
    zero = sharpness(model, params, {}, x, y, loss_fn, maxiter=0)
    assert math.isnan(zero.value) and zero.n_hvp == 0 and not zero.converged


def test_lanczos_few_distinct_eigenvalues_breakdown():
    """Few distinct eigenvalues (high multiplicity): the Krylov space of a random start closes after
    as many steps; T_m is exact there and the top is returned, converged."""
    n = 120
    lam = torch.cat(
        [torch.full((60,), -3.0, dtype=DT), torch.full((50,), 0.5, dtype=DT), torch.full((10,), 2.0, dtype=DT)]
    )
    A, op, count = spectrum_op(lam)
    val, ok = _lanczos_max(op, v0_of(n), 1e-14, 100)
    assert ok and abs(val - 2.0) <= 1e-12 and count[0] <= 4


def test_lanczos_low_rank_psd_from_a_linear_model():
    """MSE on a linear model with 41 parameters and 4 samples: rank 4, top found in <= 6 products."""
    torch.manual_seed(1)
    model = nn.Linear(40, 1).to(DT)
    params = params_of(model)
    x, y = torch.randn(4, 40, dtype=DT), torch.randn(4, 1, dtype=DT)
    H = dense_hessian64(model, params, x, y, nn.MSELoss())
    res = sharpness(model, params, {}, x, y, nn.MSELoss(), tol=1e-10)
    assert res.converged and res.n_hvp <= 6
    assert abs(res.value - top(H)) <= 1e-10 * top(H)


def test_lanczos_start_vector_is_not_modified():
    lam = torch.linspace(0, 1, 50, dtype=DT)
    _, op, _ = spectrum_op(lam)
    v0 = v0_of(50)
    keep = v0.clone()
    _lanczos_max(op, v0, 1e-8, 60)
    assert torch.equal(v0, keep)


# --------------------------------------------------------------------------- preconditioner
def _precond_case():
    model, params, x, y, loss_fn = net_case("tanh-ce", 4)
    H = dense_hessian64(model, params, x, y, loss_fn)
    return model, params, x, y, loss_fn, H


def _scaled_top(H, params, precond):
    d = torch.cat(
        [
            precond[k].to(DT).clamp_min(0).reshape(-1) if k in precond else torch.ones(v.numel(), dtype=DT)
            for k, v in params.items()
        ]
    ).sqrt()
    return top(d[:, None] * H * d[None, :])


def test_preconditioner_with_zeros_negatives_and_missing_names():
    model, params, x, y, loss_fn, H = _precond_case()
    g = torch.Generator().manual_seed(9)
    pc = {k: torch.rand(v.shape, generator=g, dtype=DT) * 5 for k, v in params.items()}
    pc["0.weight"][:3] = 0.0  # zero rows/columns of P^{1/2} H P^{1/2}
    pc["2.weight"] = -pc["2.weight"]  # negative: clamped to 0
    del pc["4.bias"]  # missing: 1
    lam = _scaled_top(H, params, pc)
    res = sharpness(model, params, {}, x, y, loss_fn, precond=pc)
    assert res.converged and abs(res.value - lam) <= 1e-4 * abs(lam), (res.value, lam)
    # float32 preconditioner tensors (as Adam's state would be) give the same answer
    pc32 = {k: v.float() for k, v in pc.items()}
    res32 = sharpness(model, params, {}, x, y, loss_fn, precond=pc32)
    assert abs(res32.value - _scaled_top(H, params, pc32)) <= 1e-4 * abs(lam)


def test_preconditioner_all_zero_and_nonfinite():
    model, params, x, y, loss_fn, H = _precond_case()
    zero = sharpness(model, params, {}, x, y, loss_fn, precond={k: torch.zeros_like(v) for k, v in params.items()})
    assert zero.value == 0.0 and zero.converged
    for bad in (math.inf, math.nan):
        pc = {k: torch.ones_like(v) for k, v in params.items()}
        pc["2.bias"] = torch.full_like(params["2.bias"], bad)
        res = sharpness(model, params, {}, x, y, loss_fn, precond=pc)
        assert math.isnan(res.value) and not res.converged
