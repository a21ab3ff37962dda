"""The batched small-matrix eigensolver (C kernel) against float64 LAPACK and closed forms.

Long (over 400 lines) because it holds every case of trajscope.linalg.eigen: the adversarial
accuracy and robustness cases (ill-conditioned, graded, subnormal, non-finite input) follow the
fold marker.
"""

from __future__ import annotations

# imports of the cases folded from test_eigen_adversarial (below)
import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.scripts import run_script
from trajscope.linalg import eigen

EPS32 = float(np.finfo(np.float32).eps)


def kernel(K: torch.Tensor) -> torch.Tensor:
    """Call the kernel directly, whatever the batch size."""
    K = K.contiguous()
    out = torch.empty(K.shape[0], K.shape[-1], dtype=torch.float32)
    eigen._smalleig.eigvalsh(K.numpy(), out.numpy(), K.shape[0], K.shape[-1])
    return out


def reference(K: torch.Tensor) -> np.ndarray:
    return np.linalg.eigvalsh(K.double().numpy())


def sym(b: int, n: int, seed: int, psd: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if psd:
        M = torch.randn(b, n, n + 3, generator=g) * torch.rand(b, 1, n + 3, generator=g) ** 4
        return M @ M.mT
    M = torch.randn(b, n, n, generator=g)
    return 0.5 * (M + M.mT)


def max_err(ev: torch.Tensor, ref: np.ndarray) -> float:
    """Largest eigenvalue error relative to each matrix's spectral norm."""
    nrm = np.abs(ref).max(axis=1, keepdims=True)
    nrm[nrm == 0] = 1
    return float((np.abs(ev.double().numpy() - ref) / nrm).max())


def test_kernel_is_built():
    # CI has a C compiler: a kernel that silently failed to build would make analyses ~4x slower
    assert eigen._smalleig is not None, "trajscope.linalg._smalleig was not compiled (pip install -e .)"


@pytest.mark.parametrize("n", [1, 2, 3, 15, 16, 17, 64, 73, 128, 200])
@pytest.mark.parametrize("psd", [False, True])
def test_random_matrices_match_lapack(n, psd):
    for b in (1, 5, 16, 37):  # partial and full blocks of 16 lanes
        K = sym(b, n, seed=n * 100 + b, psd=psd)
        ev = kernel(K)
        err = max_err(ev, reference(K))
        assert err < 8 * EPS32 * max(n, 8) ** 0.5, (n, b, err)
        assert bool((ev[:, 1:] >= ev[:, :-1]).all())  # ascending


@pytest.mark.parametrize("n", [289, 512])
def test_large_orders_match_lapack(n):  # conv filters: 32 x 3 x 3 + 1, and the kernel's limit
    K = sym(16, n, seed=n, psd=True)
    ev = kernel(K)
    assert max_err(ev, reference(K)) < 8 * EPS32 * n**0.5
    assert bool((ev[:, 1:] >= ev[:, :-1]).all())


def test_accuracy_is_not_vacuous():
    K = sym(16, 64, seed=3)
    ev = kernel(K)
    ev[3, 10] += 1e-4 * float(ev[3].abs().max())
    assert max_err(ev, reference(K)) > 8 * EPS32 * 8


def test_closed_forms():
    n = 40
    diag = torch.linspace(-3, 5, n)
    K = torch.stack(
        [
            torch.zeros(n, n),  # exact zeros, not ±tiny
            torch.diag(diag[torch.randperm(n)]),  # already tridiagonal (no reflections)
            2.5 * torch.eye(n),  # one eigenvalue of multiplicity n
            torch.outer(torch.arange(n) + 1.0, torch.arange(n) + 1.0),  # rank one
            -torch.eye(n) - torch.ones(n, n),  # negative definite: -1 (n-1 times), -1-n
            torch.diag(torch.ones(n - 1), 1) + torch.diag(torch.ones(n - 1), -1),  # path graph
        ]
        + [torch.zeros(n, n)] * 10
    )
    ev = kernel(K).double()
    assert bool((ev[0] == 0).all())
    tol = 16 * EPS32
    assert torch.allclose(ev[1], diag.double(), atol=tol * 5)
    assert torch.allclose(ev[2], torch.full((n,), 2.5, dtype=torch.float64), atol=tol * 2.5)
    rank1 = float(((torch.arange(n) + 1.0) ** 2).sum())
    assert abs(float(ev[3, -1]) - rank1) <= tol * rank1
    assert float(ev[3, :-1].abs().max()) <= tol * rank1
    assert abs(float(ev[4, 0]) + 1 + n) <= tol * n and torch.allclose(
        ev[4, 1:], -torch.ones(n - 1, dtype=torch.float64), atol=tol * n
    )
    k = torch.arange(1, n + 1, dtype=torch.float64)
    path = (2 * torch.cos(k * torch.pi / (n + 1))).sort().values
    assert torch.allclose(ev[5], path, atol=tol * 2)


def test_each_matrix_keeps_its_own_scale():
    # lanes of one SIMD block holding 1e-30 and 1e+30 matrices: each scaled on its own
    base = sym(16, 24, seed=7)
    scales = torch.tensor([10.0**s for s in (-30, 30, -20, 20, 0, -10, 10, 1) * 2])
    K = base * scales[:, None, None]
    ev = kernel(K).double() / scales[:, None].double()
    assert max_err(ev, reference(base)) < 8 * EPS32 * 5
    assert bool(torch.isfinite(ev).all())


def test_reads_only_the_lower_triangle():
    K = sym(16, 30, seed=11)
    garbage = K.clone()
    iu = torch.triu_indices(30, 30, offset=1)
    garbage[:, iu[0], iu[1]] = 1e6
    assert torch.equal(kernel(garbage), kernel(K))


def test_bad_buffer_sizes_raise():
    K = torch.zeros(4, 8, 8)
    with pytest.raises(ValueError):
        eigen._smalleig.eigvalsh(K.numpy(), torch.empty(4, 7).numpy(), 4, 8)
    with pytest.raises(ValueError):
        eigen._smalleig.eigvalsh(K.numpy(), torch.empty(4, 8).numpy(), 5, 8)


def test_threads_get_the_same_answers():
    Ks = [sym(40, 50, seed=s, psd=True) for s in range(6)]
    want = [kernel(K) for K in Ks]
    got = [None] * len(Ks)

    def work(i):
        for _ in range(3):
            got[i] = kernel(Ks[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(Ks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_routing(monkeypatch):
    K = sym(20, 32, seed=5)
    assert torch.equal(eigen.eigvalsh(K), kernel(K))  # float32, enough matrices: the kernel
    assert torch.equal(eigen.eigvalsh(K.double()), torch.linalg.eigvalsh(K.double()))  # float64: LAPACK
    assert torch.equal(eigen.eigvalsh(K[:2]), torch.linalg.eigvalsh(K[:2]))  # too few for 16 lanes
    big = sym(8, eigen.KERNEL_MAX_N + 1, seed=1)
    assert torch.equal(eigen.eigvalsh(big), torch.linalg.eigvalsh(big))
    stacked = sym(24, 10, seed=6).reshape(2, 3, 4, 10, 10)  # any leading shape, as torch's
    assert torch.equal(eigen.eigvalsh(stacked), kernel(stacked.reshape(24, 10, 10)).reshape(2, 3, 4, 10))
    assert eigen.eigvalsh(torch.eye(8)).shape == (8,)
    monkeypatch.setenv("TRAJSCOPE_EIGENSOLVER", "lapack")
    assert not eigen.kernel_available()
    assert torch.equal(eigen.eigvalsh(K), torch.linalg.eigvalsh(K))


def test_node_spectra_same_with_kernel_and_lapack(monkeypatch):
    from tests.helpers.calls import node_curvature
    from trajscope.nodes import find_node_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 48), torch.nn.ReLU(), torch.nn.Linear(48, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5)
    )
    x, y = torch.randn(40, 20), torch.randint(0, 5, (40,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    layers = find_node_layers(model)
    for kind in ("ggn", "exact"):
        fast = node_curvature(model, params, {}, x, y, torch.nn.CrossEntropyLoss(), layers, kind=kind)
        monkeypatch.setenv("TRAJSCOPE_EIGENSOLVER", "lapack")
        slow = node_curvature(model, params, {}, x, y, torch.nn.CrossEntropyLoss(), layers, kind=kind)
        monkeypatch.delenv("TRAJSCOPE_EIGENSOLVER")
        for l in layers:
            a, b = fast.eigvals[l.name], slow.eigvals[l.name]
            scale = b.abs().amax(1, keepdim=True).clamp_min(1e-30)
            assert float(((a - b).abs() / scale).max()) < 1e-4, (kind, l.name)


# ==============================================================================================
# folded from test_eigen_adversarial:
# Adversarial accuracy and robustness tests for the batched small-matrix eigensolver (C kernel).
#
# Every accuracy check compares the kernel against float64 LAPACK (``numpy.linalg.eigvalsh``) run
# on the *float32 input* cast to float64, i.e. against the exact spectrum of the matrix the kernel
# was given, and asks for the normwise backward-stability bound the kernel claims:
#
#     max_l |lambda_l(kernel) - lambda_l(exact)| <= C * n_eff * eps32 * ||K||_2,  n_eff = max(n, 4).
#
# Choice of C = 2: on every passing family below, LAPACK's own float32 solver
# (``torch.linalg.eigvalsh``, ssyevd) stays under 0.72 * n_eff * eps32 * ||K||_2 and the kernel
# under 0.75 (worst: n = 3; for n >= 10 the kernel stays under 0.47, mostly under 0.1), so C = 2
# is ~2.7x LAPACK's worst case and leaves room for the other x86-64 ``target_clones`` variants
# (checked: x86-64, -v3, -v4 builds give the same outcome), while the bugs fixed after review
# exceeded it by 10x to 10^5x. n_eff >= 4 because bisection alone stops at an absolute
# width of 2 eps ||T||_Gershgorin <= 6 eps ||K||_2, whatever n (so n = 1, 2, 3 need a floor).
# Failure messages report LAPACK float32's error on the same input for comparison.
#
# Cases marked "Regression test" failed before the fixes that review led to (see each comment).
# ==============================================================================================

C = 2.0
TINY32 = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------------- helpers


def kernel_np(K: np.ndarray) -> np.ndarray:
    K = np.ascontiguousarray(K, dtype=np.float32)
    b, n = K.shape[0], K.shape[-1]
    out = np.full((b, n), np.nan, dtype=np.float32)
    eigen._smalleig.eigvalsh(K, out, b, n)
    return out


def rel_errors(ev: np.ndarray, K32: np.ndarray) -> np.ndarray:
    """Per-matrix error in units of n_eff * eps32 * ||K||_2 (K32 is the float32 input)."""
    ref = np.linalg.eigvalsh(K32.astype(np.float64))
    n = K32.shape[-1]
    nrm = np.abs(ref).max(axis=1)
    nrm[nrm == 0] = 1.0
    return np.abs(ev.astype(np.float64) - ref).max(axis=1) / (max(n, 4) * EPS32 * nrm)


def check(Ks, what: str, c: float = C) -> np.ndarray:
    """Kernel on the float32 stack Ks: finite, ascending, within c * n_eff * eps32 * ||K||_2."""
    K32 = np.ascontiguousarray(np.asarray(Ks, dtype=np.float64).astype(np.float32))
    assert np.isfinite(K32).all(), f"{what}: test input overflowed float32"
    ev = kernel_np(K32)
    assert np.isfinite(ev).all(), f"{what}: non-finite eigenvalues for finite input"
    assert (np.diff(ev, axis=1) >= 0).all(), f"{what}: eigenvalues not ascending"
    err = rel_errors(ev, K32)
    bad = np.flatnonzero(err > c)
    if bad.size:
        lap = rel_errors(torch.linalg.eigvalsh(torch.from_numpy(K32)).numpy(), K32)
        pytest.fail(
            f"{what} (n={K32.shape[-1]}): kernel error / (n_eff eps ||K||) = "
            f"{err[bad].max():.3g} at matrices {bad[:8].tolist()} (bound {c}); "
            f"LAPACK float32 on the same matrices: {lap[bad].max():.3g}"
        )
    return ev


def sym_np(A: np.ndarray) -> np.ndarray:
    return 0.5 * (A + np.swapaxes(A, -1, -2))


def rand_orth(rng, n: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def with_spectrum(rng, lam) -> np.ndarray:
    Q = rand_orth(rng, len(lam))
    return (Q * np.asarray(lam)) @ Q.T


def wilkinson(m: int) -> np.ndarray:
    """W_{2m+1}^+: pairs of eigenvalues agreeing to ~1/m! (W21: to ~1e-14)."""
    n = 2 * m + 1
    return np.diag(np.abs(np.arange(n) - m).astype(float)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)


def glued_wilkinson(m: int, k: int, delta: float) -> np.ndarray:
    W = wilkinson(m)
    p = W.shape[0]
    G = np.zeros((p * k, p * k))
    for i in range(k):
        G[i * p : (i + 1) * p, i * p : (i + 1) * p] = W
    for i in range(1, k):
        G[i * p - 1, i * p] = G[i * p, i * p - 1] = delta
    return G


def graded(rng, n: int, b: int, lo_exp: float, increasing: bool) -> np.ndarray:
    g = np.logspace(0, lo_exp, n)
    if increasing:
        g = g[::-1]
    A = sym_np(rng.standard_normal((b, n, n)))
    return g[:, None] * A * g[None, :]


# ------------------------------------------------------------------------- classic hard cases


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("m", [10, 20, 50])
def test_wilkinson(m):
    W = wilkinson(m)
    check([W, -W, 1e-3 * W, 1e3 * W] * 4 + [W], f"Wilkinson W{2 * m + 1}+")  # 17: partial block


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("k,delta", [(5, 1e-4), (5, 1e-7), (5, 1e-14), (10, 1e-7)])
def test_glued_wilkinson(k, delta):
    G = glued_wilkinson(10, k, delta)
    check([G, -G] * 8, f"glued W21 x{k}, delta={delta}")


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [10, 40, 100])
def test_graded_decreasing(n):
    # big entries top-left, 1e-20 bottom-right: columns reduced first carry the big entries
    rng = np.random.default_rng(n)
    check(graded(rng, n, 16, -20, increasing=False), "graded 1 .. 1e-20 (decreasing)")
    check(graded(rng, n, 16, -10, increasing=True), "graded 1e-10 .. 1 (increasing)")


# Regression test (bug found in review, fixed): the Householder norm sqrtf(alpha^2 + s) is formed
# without scaling; when a column below the diagonal has all entries < ~1e-19 * max|K| (after the
# per-matrix scaling), alpha^2 + s is subnormal and has few significant bits, so the reflector is
# not orthogonal and the trailing block is changed by up to ~10% of ||K||.
@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [10, 40, 100])
def test_graded_increasing_1e20(n):
    rng = np.random.default_rng(100 + n)
    check(graded(rng, n, 16, -20, increasing=True), "graded 1e-20 .. 1 (increasing)")


# Regression test (bug found in review, fixed): column 0 below the diagonal is [0, x] with x in
# ~[3e-23, 1e-19] relative to max|K| -> s = x^2 subnormal -> non-orthogonal reflector; up to ~1e6
# eps relative eigenvalue error (at x = 1e-22: 14%).
@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_tiny_first_column_subnormal_householder_norm():
    xs = [1e-20, 3e-21, 1e-21, 3e-22, 1e-22, 1e-19, 1e-18, 3e-23, 1e-23, 0.0, 5e-20, 2e-20, 5e-21, 2e-21, 5e-22, 2e-22]
    K = np.zeros((16, 3, 3))
    K[:, 0, 0], K[:, 1, 1], K[:, 2, 2], K[:, 1, 2] = 0.5, 1.0, 1.998, 0.3
    K[:, 2, 0] = xs
    K = K + np.tril(K, -1).transpose(0, 2, 1)
    check(K, "tiny first column")


# ---------------------------------------------------------------------- scale and subnormals


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_subnormal_entries_in_normal_matrix():
    rng = np.random.default_rng(1)
    n = 12
    A = sym_np(rng.standard_normal((16, n, n)))
    mask = rng.random((16, n, n)) < 0.5
    mask = mask | mask.transpose(0, 2, 1)
    A[mask] *= 1e-40  # half the entries subnormal in float32
    K = A.astype(np.float32)
    assert (np.abs(K[K != 0]) < TINY32).any()
    check(K, "subnormal entries")


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_smallest_normal_scale_matrices():
    # max |K| down to ~3e-39 (just above 2^-128) still works; see the regression test below for smaller
    rng = np.random.default_rng(2)
    base = sym_np(rng.standard_normal((16, 6, 6)))
    base /= np.abs(base).max(axis=(1, 2), keepdims=True)
    scales = [1e-36, 1e-37, 1e-38, 5e-39, 4e-39, 1.2e-38, 3e-39, 1e-35] * 2
    check(base * np.array(scales)[:, None, None], "matrices of norm ~1e-38")


# Regression test (bug found in review, fixed): for max|K| < 2^-128 (~2.9e-39, all entries
# subnormal) frexpf gives ex <= -128 and sc = ldexpf(1, -ex) overflows to +inf, so every
# eigenvalue is NaN (0 * inf for zero entries, inf - inf later). Other lanes of the block are
# fine.
@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_all_subnormal_matrices():
    A = np.tile(np.array([[2.0, 1.0], [1.0, 3.0]]), (16, 1, 1))
    K = A * np.array([1e-40, 1e-41, 1e-42, 5e-43] * 4)[:, None, None]
    check(K, "all-subnormal matrices", c=1e3)  # even a loose bound fails: the output is NaN


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_huge_and_tiny_norms_in_one_block():
    rng = np.random.default_rng(3)
    n = 24
    base = sym_np(rng.standard_normal((16, n, n)))
    base /= np.abs(base).max(axis=(1, 2), keepdims=True)
    exps = [30, -30, 37, -37, 0, 20, -20, 1, 30, -30, 36, -36, 10, -10, -25, 25]
    scales = 10.0 ** np.array(exps, dtype=float)
    K = base * scales[:, None, None]
    K[4] = 0.0  # and a zero matrix
    ev = check(K, "1e30 / 1e-30 / 1e37 / 1e-37 mixed in one block")
    assert (ev[4] == 0).all()


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_zero_lanes_in_block():
    rng = np.random.default_rng(4)
    n = 17
    K = sym_np(rng.standard_normal((21, n, n)))
    zero = [0, 3, 7, 15, 16, 20]
    K[zero] = 0.0
    ev = check(K, "zero lanes")
    assert (ev[zero] == 0).all()


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_results_do_not_depend_on_block_neighbours():
    # each lane is independent (only the shared bisection count could couple them)
    rng = np.random.default_rng(5)
    n = 20
    K = sym_np(rng.standard_normal((16, n, n))) * (10.0 ** rng.uniform(-30, 30, 16))[:, None, None]
    K = K.astype(np.float32)
    K[9] = 0.0
    together = kernel_np(K)
    for i in (0, 5, 9, 15):
        alone = kernel_np(K[i : i + 1])
        assert np.array_equal(alone[0], together[i]), i


# ---------------------------------------------------------------------- structured inputs


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [3, 10, 40, 100])
def test_nearly_diagonal(n):
    rng = np.random.default_rng(10 + n)
    Ks = []
    for i in range(16):
        A = np.diag(rng.standard_normal(n))
        e = rng.standard_normal(n - 1) * 10.0 ** rng.uniform(-30, -4, n - 1)
        A += np.diag(e, -1) + np.diag(e, 1)
        if i % 2:  # a tiny full off-diagonal part too, 1e-6 .. 1e-17
            A += sym_np(rng.standard_normal((n, n))) * 10.0 ** (-5 - 0.8 * i)
        Ks.append(A)
    check(Ks, "nearly diagonal")


# Regression test (bug found in review, fixed): same root cause as the
# graded failures: a nearly diagonal matrix whose off-diagonal entries are ~1e-20..1e-22 * max|K|
# gives subnormal Householder norms and non-orthogonal reflectors (errors ~10..1e5 x the bound,
# LAPACK float32 ~0.1).
@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [3, 10, 40])
def test_nearly_diagonal_1e21_off_diagonal(n):
    rng = np.random.default_rng(15 + n)
    Ks = [
        np.diag(rng.standard_normal(n)) + sym_np(rng.standard_normal((n, n))) * 10.0 ** -(20 + i / 8) for i in range(16)
    ]
    check([np.tril(K) + np.tril(K, -1).T for K in Ks], "nearly diagonal, 1e-21 off-diagonal")


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [1, 2, 3, 10, 64])
def test_tridiagonal_and_diagonal(n):
    rng = np.random.default_rng(20 + n)
    tri = [
        np.diag(rng.standard_normal(n)) + np.diag(x, 1) + np.diag(x, -1)
        for x in rng.standard_normal((16, max(n - 1, 0)))
    ]
    check(tri, "tridiagonal")
    diag = [np.diag(d) for d in rng.standard_normal((17, n)) * 10.0 ** rng.uniform(-5, 5, (17, 1))]
    check(diag, "diagonal")


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [10, 40, 100])
def test_clusters(n):
    rng = np.random.default_rng(30 + n)
    Ks = []
    for i in range(16):
        h = n // 2
        lam = np.r_[1 + 10.0 ** -(4 + i % 5) * rng.standard_normal(h), -1 + 1e-7 * rng.standard_normal(n - h - 1), 3.0]
        Ks.append(with_spectrum(rng, lam))
    check(Ks, "clusters of nearly equal eigenvalues")
    check(
        [2.5 * np.eye(n) + 1e-6 * sym_np(rng.standard_normal((n, n))) for _ in range(16)],
        "multiple eigenvalue + 1e-6 perturbation",
    )


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n,r", [(10, 3), (48, 5), (48, 47), (100, 20)])
def test_psd_gram_dead_samples(n, r):
    # D A A^T D with D having zeros (ReLU-dead samples): many exact/tiny zero eigenvalues
    rng = np.random.default_rng(40 + n + r)
    Ks = []
    for i in range(16):
        A = rng.standard_normal((n, r)) * 10.0 ** rng.uniform(-3, 0, r)
        d = rng.standard_normal(n) * (rng.random(n) > (0.2 + 0.05 * i))
        Ks.append((d[:, None] * A) @ (A.T * d[None, :]))
    ev = check(Ks, "PSD Gram with dead samples")
    # for PSD input, no eigenvalue may fall below -bound
    nrm = np.abs(ev).max(axis=1, keepdims=True)
    assert (ev >= -C * max(n, 4) * EPS32 * nrm).all()


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [5, 40, 100])
def test_negative_definite(n):
    rng = np.random.default_rng(50 + n)
    A = rng.standard_normal((16, n, n))
    check(-(A @ A.transpose(0, 2, 1)) - 1e-3 * np.eye(n), "negative definite")


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [8, 50, 128])
def test_known_spectrum_under_orthogonal_similarity(n):
    rng = np.random.default_rng(60 + n)
    lams = [np.sort(rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 0, n)) for _ in range(15)]
    lams.append(np.r_[np.zeros(n - 2), 1.0, -1.0])
    Ks = [with_spectrum(rng, lam) for lam in lams]
    ev = check(Ks, "random orthogonal similarity of a known spectrum")
    # and the known spectrum itself, to float32 rounding of the input (~n eps ||K||)
    for lam, e in zip(lams, ev):
        assert np.abs(np.sort(lam) - e).max() <= 4 * C * n * EPS32 * np.abs(lam).max()


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 201])
def test_all_equal_entries_rank_one(n):
    vals = np.array([1.0, -1.0, 3.7, -1e-20, 1e20, 0.1, 7.0, -2.5] * 2)
    K = vals[:, None, None] * np.ones((16, n, n))
    ev = check(K, "all-equal entries")
    v32 = vals.astype(np.float32).astype(np.float64)
    top = np.where(v32 > 0, ev[:, -1], ev[:, 0])
    assert np.allclose(top, n * v32, rtol=C * max(n, 4) * EPS32, atol=0)


# -------------------------------------------------------------------- sizes and batch shapes


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("b", [1, 15, 16, 17, 33])
def test_tiny_orders_and_partial_blocks(n, b):
    rng = np.random.default_rng(n * 100 + b)
    K = sym_np(rng.standard_normal((b, n, n))) * 10.0 ** rng.uniform(-20, 20, (b, 1, 1))
    check(K, f"n={n} b={b}")


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_n1_is_the_entry():
    x = np.array([0.0, 1.0, -1.0, 3.0e38, -1.5e-38, 1e-30, 7.25, -0.0] * 2, dtype=np.float32)
    ev = kernel_np(x[:, None, None])[:, 0]
    assert (np.abs(ev.astype(np.float64) - x) <= 4 * EPS32 * np.abs(x)).all(), (ev, x)


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_batch_zero():
    out = np.empty((0, 5), np.float32)
    eigen._smalleig.eigvalsh(np.empty((0, 5, 5), np.float32), out, 0, 5)


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_n256_one_block():
    rng = np.random.default_rng(256)
    n = 256
    A = rng.standard_normal((4, n, n // 8))
    Ks = list(sym_np(rng.standard_normal((4, n, n)))) + list(A @ A.transpose(0, 2, 1))
    Ks += [wilkinson(128)[:n, :n]]
    check(Ks, "n=256 (partial block of 9)")


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_scratch_regrowth_across_sizes_and_threads():
    rng = np.random.default_rng(7)
    sizes = [200, 3, 64, 1, 130, 17]
    Ks = [sym_np(rng.standard_normal((18, n, n))).astype(np.float32) for n in sizes]
    want = [kernel_np(K) for K in Ks]
    got: dict = {}

    def work(j):
        for i in list(range(len(sizes)))[j:] + list(range(len(sizes)))[:j]:
            got[(j, i)] = kernel_np(Ks[i])

    threads = [threading.Thread(target=work, args=(j,)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[(j, i)], want[i]) for j in range(3) for i in range(len(sizes)))


# ---------------------------------------------------------------------- non-finite input


def _run_isolated(check: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """Run one check of kernel_isolated.py in a fresh interpreter (numpy + the bare extension, no
    torch): crashes and hangs of the kernel become a return code / timeout instead of killing the
    test session."""
    return run_script(Path(__file__).parent / "kernel_isolated.py", eigen._smalleig.__file__, check, timeout=timeout)


@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_nan_inf_input_returns_promptly_and_leaves_other_lanes_alone():
    # The values returned for a non-finite matrix are unspecified (observed: NaN, but also
    # silently finite values such as all zeros or a repeated garbage number); the call must
    # return, and the other matrices of the same 16-block must be unaffected.
    res = _run_isolated("nonfinite_lanes")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["worst"] == 0.0, r  # bit-identical for the finite lanes
    assert r["slowest"] < 1.0, r  # each call is ~10 us; 1 s only guards against a hang


# Regression test (bug found in review, fixed): the scaling exponent is the max over ALL n*n
# entries, but only the lower triangle is solved; a large (1e38) or infinite upper triangle makes
# the lower-triangle entries underflow or leaves them unscaled (frexpf(inf) -> ex = 0), e.g.
# eigenvalues collapse to one value. Contradicts 'only the lower triangle is read'.
@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
@pytest.mark.parametrize("upper,lower_scale", [(1e38, 1.0), (np.inf, 1e-25)])
def test_upper_triangle_is_not_read(upper, lower_scale):
    rng = np.random.default_rng(8)
    n = 7
    K = sym_np(rng.standard_normal((16, n, n))) * lower_scale
    K32 = K.astype(np.float32)
    G = K32.copy()
    iu = np.triu_indices(n, 1)
    G[:, iu[0], iu[1]] = upper
    ev = kernel_np(G)
    err = rel_errors(ev, K32)
    assert np.isfinite(ev).all() and err.max() <= C, err.max()


# Regression test (bug found in review, fixed): sizeof(float) * nb * n * n overflows Py_ssize_t
# (signed, UB) for huge nb, so e.g. nb = 2**62, n = 1 with empty buffers passes the size check and
# the kernel reads/writes far out of bounds: segfault instead of ValueError.
@pytest.mark.skipif(eigen._smalleig is None, reason="C kernel not built")
def test_overflowing_batch_size_is_rejected():
    res = _run_isolated("overflowing_batch")
    assert res.returncode == 0 and "ValueError" in res.stdout, (res.returncode, res.stderr[-500:])
