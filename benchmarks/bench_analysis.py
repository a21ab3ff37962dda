"""Benchmark of the per-node curvature core and of global sharpness (script, not a test).

Setup: MLP 784-512-512-10 (ReLU), batch 128 of synthetic data, CrossEntropyLoss, float32.

* ``node_curvature`` (GGN = exact for ReLU) for all 1034 nodes of the 3 layers: full spectrum
  of every node block, loss and all gradients; median wall time of several runs;
* a naive loop of ``torch.func.hessian`` restricted to θ_i + ``eigvalsh`` on a sample of nodes,
  extrapolated to every node (and the spectra compared with ours);
* BackPACK ``DiagGGNExact`` (diagonal of the GGN only) on the same batch; runs are interleaved
  with ours so that machine noise hits both alike; so is ``node_curvature`` with
  ``TRAJSCOPE_EIGENSOLVER=lapack`` (every eigensolve by LAPACK instead of the C kernel);
* ``sharpness`` (Lanczos at tol 1e-4): time and Hessian-vector products, against a
  100-iteration power method and scipy's ARPACK (``eigsh``, tol 1e-4); all compared with a
  tight reference (ARPACK at tol 1e-10).

Run: ``.venv/bin/python benchmarks/bench_analysis.py [--reps N] [--naive-per-layer K]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, hessian

from trajscope.curvature.node import node_curvature
from trajscope.curvature.sharpness import sharpness
from trajscope.linalg import eigen
from trajscope.nodes import find_node_layers, node_matrix
from trajscope.replay.problem import Problem


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(128, 784, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    return model, x, y, nn.CrossEntropyLoss()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def naive_node_spectrum(model, params, x, y, loss_fn, layer, i):
    """torch.func.hessian of L restricted to θ_i, then its eigenvalues (the per-node baseline)."""

    def f(th):
        p = dict(params)
        W = p[layer.weight]
        n = W.shape[1]
        p[layer.weight] = torch.cat([W[:i], th[None, :n], W[i + 1 :]])
        p[layer.bias] = torch.cat([p[layer.bias][:i], th[n:], p[layer.bias][i + 1 :]])
        return loss_fn(functional_call(model, p, (x,)), y)

    H = hessian(f)(node_matrix(params, layer)[i])
    return torch.linalg.eigvalsh(H.double()).flip(0)


def power_method(mv, dim, iters=100, seed=0):
    v = torch.from_numpy(np.random.default_rng(seed).standard_normal(dim)).float()
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = mv(v)
        lam = float(v.double() @ w.double())
        v = w / w.norm()
    return lam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="timed runs of ours and BackPACK each")
    ap.add_argument("--naive-per-layer", type=int, default=2, help="nodes per layer for the naive loop")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    model, x, y, loss_fn = build()
    params = {k: v.detach() for k, v in model.named_parameters()}
    layers = find_node_layers(model)
    n_nodes = sum(l.n_nodes for l in layers)

    # --- ours vs BackPACK, interleaved -------------------------------------------------------
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    bp_model = extend(copy.deepcopy(model))
    bp_loss = extend(nn.CrossEntropyLoss())

    def run_ours():
        return node_curvature(Problem(model, params, {}, x, y, loss_fn), layers, kind="ggn")

    def run_backpack():
        bp_model.zero_grad()
        loss = bp_loss(bp_model(x), y)
        with backpack(DiagGGNExact()):
            loss.backward()
        return [p.diag_ggn_exact for p in bp_model.parameters()]

    def run_lapack():  # the same, with LAPACK for every eigensolve (no C kernel)
        os.environ["TRAJSCOPE_EIGENSOLVER"] = "lapack"
        try:
            return run_ours()
        finally:
            del os.environ["TRAJSCOPE_EIGENSOLVER"]

    for _ in range(2):  # warm-up (thread pools, allocator)
        res = run_ours()
        bp = run_backpack()
        res_lapack = run_lapack()
    t_ours, t_bp, t_lapack = [], [], []
    for _ in range(args.reps):
        t_ours.append(timed(run_ours)[0])
        t_bp.append(timed(run_backpack)[0])
        t_lapack.append(timed(run_lapack)[0])
    kern_err = max(
        float((res.eigvals[l.name] - res_lapack.eigvals[l.name]).abs().max() / res_lapack.eigvals[l.name].abs().max())
        for l in layers
    )
    # consistency: trace of our GGN blocks == sum of BackPACK's diagonal, per layer
    tr_err = 0.0
    for l, (wd, bd) in zip(layers, zip(bp[0::2], bp[1::2])):
        ours_tr = float(res.eigvals[l.name].sum())
        bp_tr = float(wd.sum() + bd.sum())
        tr_err = max(tr_err, abs(ours_tr - bp_tr) / abs(bp_tr))

    t_exact, _ = timed(lambda: node_curvature(Problem(model, params, {}, x, y, loss_fn), layers, kind="exact"))

    # --- naive per-node torch.func.hessian loop ---------------------------------------------
    naive_layer_t = []
    spec_err = 0.0
    for l in layers:
        ts = []
        for i in range(min(args.naive_per_layer, l.n_nodes)):
            t, ev = timed(lambda: naive_node_spectrum(model, params, x, y, loss_fn, l, i))
            ts.append(t)
            mine = res.eigvals[l.name][i]
            full = torch.cat([mine, mine.new_zeros(l.node_dim - mine.numel())])
            spec_err = max(spec_err, float((full - ev).abs().max() / ev.abs().max()))
        naive_layer_t.append(statistics.median(ts) * l.n_nodes)
    naive_total = sum(naive_layer_t)

    # --- sharpness ---------------------------------------------------------------------------
    mv, dim = Problem(model, params, {}, x, y, loss_fn).hvp_operator()

    def arpack(tol):
        from scipy.sparse.linalg import LinearOperator, eigsh

        n0 = mv.count
        A = LinearOperator((dim, dim), matvec=mv, dtype=np.float64)
        val = eigsh(
            A, k=1, which="LA", tol=tol, v0=np.random.default_rng(0).standard_normal(dim), return_eigenvectors=False
        )[0]
        return float(val), mv.count - n0

    ref_value, ref_hvp = arpack(1e-10)
    v = torch.randn(dim)

    def grad_once():
        p = {k: t.detach().requires_grad_() for k, t in params.items()}
        return torch.autograd.grad(loss_fn(functional_call(model, p, (x,)), y), list(p.values()))

    t_sh, t_pm, t_ar, t_hvp, t_grad = [], [], [], [], []
    for _ in range(3):  # interleaved
        t, sh = timed(lambda: sharpness(Problem(model, params, {}, x, y, loss_fn), tol=1e-4))
        t_sh.append(t)
        t, lam_pm = timed(lambda: power_method(mv, dim, 100))
        t_pm.append(t)
        t, (lam_ar, n_ar) = timed(lambda: arpack(1e-4))
        t_ar.append(t)
        t_hvp += [timed(lambda: mv(v))[0] for _ in range(5)]
        t_grad += [timed(grad_once)[0] for _ in range(5)]

    # --- table ---------------------------------------------------------------------------------
    def ms(ts):
        return f"{min(ts) * 1e3:8.1f} {statistics.median(ts) * 1e3:8.1f}"

    naive_ms = f"{naive_total:8.0f} s" + " " * 7
    rows = [
        (
            "node_curvature, all nodes (GGN, full spectra)",
            ms(t_ours),
            f"{n_nodes} nodes, {min(t_ours) / n_nodes * 1e6:.0f} us/node",
        ),
        (
            "BackPACK DiagGGNExact (diagonal only)",
            ms(t_bp),
            f"ours/BackPACK {min(t_ours) / min(t_bp):.1f}x (min), "
            f"{statistics.median(t_ours) / statistics.median(t_bp):.1f}x (median); target <= 5x",
        ),
        (
            "  the same with LAPACK eigensolves (no kernel)",
            ms(t_lapack),
            f"{statistics.median(t_lapack) / statistics.median(t_ours):.1f}x ours; spectra agree to "
            f"{kern_err:.1e} (rel. to each layer's max)",
        ),
        (
            "naive torch.func.hessian loop (extrapolated)",
            naive_ms,
            f"{args.naive_per_layer} nodes/layer timed; ours is {naive_total / min(t_ours):,.0f}x faster",
        ),
        (
            "node_curvature, all nodes (exact, full spectra)",
            ms([t_exact]),
            f"one run; {n_nodes} HVPs w.r.t. z, batched",
        ),
        (
            "sharpness, Lanczos tol 1e-4",
            ms(t_sh),
            f"{sh.n_hvp} HVPs, rel.err {abs(sh.value - ref_value) / ref_value:.1e}",
        ),
        ("power method, 100 iterations", ms(t_pm), f"100 HVPs, rel.err {abs(lam_pm - ref_value) / ref_value:.1e}"),
        (
            "scipy ARPACK eigsh, tol 1e-4 (ncv 20)",
            ms(t_ar),
            f"{n_ar} HVPs, rel.err {abs(lam_ar - ref_value) / ref_value:.1e}",
        ),
        (
            "one HVP (double backward) / one gradient",
            f"{min(t_hvp) * 1e3:8.1f} {min(t_grad) * 1e3:8.1f}",
            "min of 15 each",
        ),
    ]
    print(
        f"trajscope analysis benchmark: MLP 784-512-512-10 ReLU, batch 128, CE, float32; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load avg {load:.2f} at start"
    )
    print(f"{'':<48} {'min ms':>8} {'median':>8}")
    print("-" * 110)
    for a_, b_, c_ in rows:
        print(f"{a_:<48} {b_}  {c_}")
    print("-" * 110)
    print(
        f"eigensolver: {'C kernel (trajscope.linalg._smalleig)' if eigen.kernel_available() else 'LAPACK (kernel not built)'}"
    )
    print(
        f"ours, LAPACK variant and BackPACK: {args.reps} runs each, interleaved; sharpness/power "
        f"method: 3 runs each, interleaved; reference lambda_max {ref_value:.6g} (ARPACK, {ref_hvp} HVPs at tol 1e-10)"
    )
    print(
        f"checks: our spectra vs naive hessian max rel.err {spec_err:.1e}; per-layer trace of our "
        f"GGN blocks vs sum of BackPACK's diagonal max rel.err {tr_err:.1e}"
    )


if __name__ == "__main__":
    main()
