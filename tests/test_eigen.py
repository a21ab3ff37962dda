"""The batched small-matrix eigensolver (C kernel) against float64 LAPACK and closed forms."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from trajscope.linalg import eigen
from trajscope.curvature import node as _curv_node
from trajscope.replay.problem import Problem


def node_curvature(model, params, buffers, inputs, targets, loss_fn, *args, replay=None, **kw):
    """node_curvature on the old argument list (the cases here are written that way)."""
    return _curv_node.node_curvature(Problem(model, params, buffers, inputs, targets, loss_fn, replay), *args, **kw)


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
    assert max_err(ev, reference(K)) < 8 * EPS32 * n ** 0.5
    assert bool((ev[:, 1:] >= ev[:, :-1]).all())


def test_accuracy_is_not_vacuous():
    K = sym(16, 64, seed=3)
    ev = kernel(K)
    ev[3, 10] += 1e-4 * float(ev[3].abs().max())
    assert max_err(ev, reference(K)) > 8 * EPS32 * 8


def test_closed_forms():
    n = 40
    diag = torch.linspace(-3, 5, n)
    K = torch.stack([
        torch.zeros(n, n),                        # exact zeros, not ±tiny
        torch.diag(diag[torch.randperm(n)]),      # already tridiagonal (no reflections)
        2.5 * torch.eye(n),                       # one eigenvalue of multiplicity n
        torch.outer(torch.arange(n) + 1.0, torch.arange(n) + 1.0),  # rank one
        -torch.eye(n) - torch.ones(n, n),         # negative definite: -1 (n-1 times), -1-n
        torch.diag(torch.ones(n - 1), 1) + torch.diag(torch.ones(n - 1), -1),  # path graph
    ] + [torch.zeros(n, n)] * 10)
    ev = kernel(K).double()
    assert bool((ev[0] == 0).all())
    tol = 16 * EPS32
    assert torch.allclose(ev[1], diag.double(), atol=tol * 5)
    assert torch.allclose(ev[2], torch.full((n,), 2.5, dtype=torch.float64), atol=tol * 2.5)
    rank1 = float(((torch.arange(n) + 1.0) ** 2).sum())
    assert abs(float(ev[3, -1]) - rank1) <= tol * rank1
    assert float(ev[3, :-1].abs().max()) <= tol * rank1
    assert abs(float(ev[4, 0]) + 1 + n) <= tol * n and torch.allclose(ev[4, 1:], -torch.ones(n - 1, dtype=torch.float64), atol=tol * n)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    path = (2 * torch.cos(k * torch.pi / (n + 1))).sort().values
    assert torch.allclose(ev[5], path, atol=tol * 2)


def test_each_matrix_keeps_its_own_scale():
    # lanes of one SIMD block holding 1e-30 and 1e+30 matrices: each scaled on its own
    base = sym(16, 24, seed=7)
    scales = torch.tensor([10.0 ** s for s in (-30, 30, -20, 20, 0, -10, 10, 1) * 2])
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
    from trajscope.nodes import find_node_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.ReLU(), torch.nn.Linear(48, 48),
                                torch.nn.Tanh(), torch.nn.Linear(48, 5))
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
